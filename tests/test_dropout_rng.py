"""The dropout decisions against their specification (docs/kernels.md, "Dropout: the RNG scheme").

An independent NumPy Philox-4x32-10 (tests/dropout_spec.py), checked here against the Random123 known-answer
vectors, plus the documented counter scheme must reproduce `dropout_keep_mask` bit for bit, and the fused
kernels must apply exactly those decisions. Statistical tests then check the decisions for independence at the
column lags where a flaw of the scheme would show (the word and call boundaries at 32, 64 and 256 columns),
across rows (the two rows of a stream, 8 apart) and across heads and batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from dropout_spec import KNOWN_ANSWERS, philox4x32_10, specified_keep
from helpers import covering_shape
from kernels import dcama_attention, dropout_keep_mask, effective_dropout_p
from kernels.configs import interpreter_meta
from kernels.fused import _bit_keep, _bit_scale, _philox
from kernels.ops import KERNELS, dropout_params
from kernels.reference import dcama_attention_reference

pytestmark = pytest.mark.interpreter


# ---------------------------------------------------------------------------------------------
# Philox itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_numpy_philox_matches_the_known_answers(counter, key, expected):
    assert [int(w) for w in philox4x32_10(counter, key)] == list(expected)


@triton.jit
def _philox_words_kernel(SEED, C, OUT, N: tl.constexpr, TRITON_PHILOX: tl.constexpr):
    offs = tl.arange(0, N)
    c = [tl.load(C + w * N + offs).to(tl.uint32) for w in tl.static_range(4)]
    seed = tl.load(SEED)
    if TRITON_PHILOX:
        words = tl.philox(seed, c[0], c[1], c[2], c[3])
    else:
        words = _philox(seed, c[0], c[1], c[2], c[3])
    for w in tl.static_range(4):
        tl.store(OUT + w * N + offs, words[w].to(tl.int64))


@pytest.mark.parametrize("triton_philox", [True, False], ids=["tl.philox", "kernels"])
def test_triton_philox_matches_numpy(triton_philox):
    """tl.philox and the kernels' own Philox (widening multiplies) equal the NumPy one on random counters."""
    rng = np.random.default_rng(0)
    n = 64
    counters = rng.integers(0, 2**32, size=(4, n), dtype=np.uint64)
    for seed in (0, 1234567, -1, -(2**63), 2**63 - 1):
        out = torch.empty(4 * n, dtype=torch.int64)
        _philox_words_kernel[(1,)](torch.tensor([seed]), torch.from_numpy(counters.astype(np.int64)).flatten(), out,
                                   N=n, TRITON_PHILOX=triton_philox)
        expected = philox4x32_10(tuple(counters), (seed % 2**64 & 0xFFFFFFFF, seed % 2**64 >> 32))
        assert np.array_equal(out.view(4, n).numpy().astype(np.uint64), np.stack(expected).astype(np.uint64))


# ---------------------------------------------------------------------------------------------
# The counter scheme
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout_p", [0.5, 0.3])
@pytest.mark.parametrize("seed,shape", [(0, (1, 1, 16, 64)), (1234, (2, 3, 37, 300)), (-1, (1, 2, 129, 70)),
                                        (2**40 + 7, (1, 1, 45, 517))])
def test_keep_mask_follows_the_specification(seed, shape, dropout_p):
    """dropout_keep_mask == the documented scheme on an independent Philox, bit for bit (Nq, Nk not multiples
    of any block; Nk past one and two Philox calls)."""
    keep = dropout_keep_mask(seed, *shape, dropout_p, "cpu").numpy()
    assert np.array_equal(keep, specified_keep(seed, *shape, dropout_p))


@pytest.mark.parametrize("dropout_p", [0.5, 0.3])
def test_fused_kernels_apply_the_specified_decisions(dropout_p):
    """Forward and backward of the fused op equal the float64 reference under the specified keep mask, on the
    shape where each kernel runs every path of its loops with the interpreter's blocks (`covering_shape`): at
    p = 1/2 the forward and dq main loops (256 keys per Philox call), their leftover full tile and the masked
    last tile; at p = 0.3 their one-tile main loop and the masked tile; a full dk/dv program and a partial one;
    and the query-row tail."""
    batch, heads, head_dim = 1, 2, 32
    metas = {kernel: interpreter_meta(kernel, head_dim) for kernel in KERNELS}
    n_query, n_key = covering_shape(metas, dropout_params(dropout_p)[0])
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batch, n_query, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, n_key, heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.rand(batch, n_key, generator=g, dtype=torch.float64)
    grad = torch.randn(batch, n_query, generator=g, dtype=torch.float64)
    keep = torch.from_numpy(specified_keep(77, batch, heads, n_query, n_key, dropout_p))

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * grad.to(dtype)).sum().backward()
        return [out.detach().double()] + [t.grad.double() for t in leaves]

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        actual = run(lambda *x: dcama_attention(*x, dropout_p=dropout_p, seed=77, impl="triton"), torch.float32)
    finally:
        torch.set_float32_matmul_precision(saved)
    expected = run(lambda *x: dcama_attention_reference(*x, keep=keep, dropout_p=effective_dropout_p(dropout_p)),
                   torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert (a - b).abs().max() / b.abs().max() < 1e-4, name


@triton.jit
def _keep_and_scale_kernel(WORDS, KEEP, SCALE, first, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    shape: tl.constexpr = [BLOCK_M // 16, 1, 8, 1, 1, 4, 1]  # one word per stream, as `_bit_words` gives them
    stream = (tl.arange(0, BLOCK_M // 16)[:, None, None, None, None, None, None] * 32
              + tl.arange(0, 8)[None, None, :, None, None, None, None] * 4
              + tl.arange(0, 4)[None, None, None, None, None, :, None])
    r0, r1, r2, r3 = [tl.load(WORDS + w * (BLOCK_M * 2) + stream).to(tl.uint32) + tl.zeros(shape, tl.uint32)
                      for w in tl.static_range(4)]
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(KEEP + offs, _bit_keep(r0, r1, r2, r3, first, BLOCK_M, BLOCK_N).to(tl.int32))
    tl.store(SCALE + offs, _bit_scale(r0, r1, r2, r3, first, BLOCK_M, BLOCK_N).to(tl.int32))


@pytest.mark.parametrize("block_n", [64, 128, 256])
def test_bit_scale_holds_the_bit_keep_decisions(block_n):
    """The forward's 16-bit multipliers (`_bit_scale`: each word's halves paired, each pair rotated to bits 14 and
    30) are 0x4000 exactly where `_bit_keep` keeps and 0 elsewhere, at every sub-tile position of a call."""
    block_m = 32
    words = torch.from_numpy(np.random.default_rng(5).integers(0, 2**32, size=4 * block_m * 2, dtype=np.int64))
    for first in range(4 - block_n // 64 + 1):
        keep = torch.empty(block_m, block_n, dtype=torch.int32)
        scale = torch.empty_like(keep)
        _keep_and_scale_kernel[(1,)](words, keep, scale, first, BLOCK_M=block_m, BLOCK_N=block_n)
        assert keep.float().mean().item() == pytest.approx(0.5, abs=0.1)
        assert torch.equal(scale, keep * 0x4000), f"first sub-tile {first}"


# ---------------------------------------------------------------------------------------------
# Statistics: a correct RNG passes these with overwhelming probability (6 sigma, two-sided: about 2e-9 per
# check); a scheme that repeats decisions at one of these offsets fails them by orders of magnitude.
# ---------------------------------------------------------------------------------------------
SIGMAS = 6.0
STATS_SHAPE = (2, 3, 64, 1100)  # 422,400 decisions: 4 Philox calls per stream and a partial fifth


@pytest.fixture(scope="module", params=[0.5, 0.3], ids=["p0.5", "p0.3"])
def decisions(request) -> tuple[float, torch.Tensor]:
    return request.param, dropout_keep_mask(2024, *STATS_SHAPE, request.param, "cpu").double()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Pearson correlation of paired decisions and the number of pairs."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return (a * b).mean().item() / math.sqrt(a.var().item() * b.var().item()), a.numel()


def test_keep_rate(decisions):
    dropout_p, keep = decisions
    p_keep = 1 - effective_dropout_p(dropout_p)
    sigma = math.sqrt(p_keep * (1 - p_keep) / keep.numel())
    assert abs(keep.mean().item() - p_keep) < SIGMAS * sigma


@pytest.mark.parametrize("lag", [1, 2, 8, 31, 32, 33, 63, 64, 128, 256])
def test_no_correlation_between_columns(decisions, lag):
    _, keep = decisions
    corr, n = _correlation(keep[..., lag:], keep[..., :-lag])
    assert abs(corr) < SIGMAS / math.sqrt(n), f"columns j and j + {lag}: correlation {corr:.4f}"


@pytest.mark.parametrize("lag", [1, 8, 16])
def test_no_correlation_between_rows(decisions, lag):
    """Rows 8 apart read the two halves of the same Philox calls."""
    _, keep = decisions
    corr, n = _correlation(keep[..., lag:, :], keep[..., :-lag, :])
    assert abs(corr) < SIGMAS / math.sqrt(n), f"rows i and i + {lag}: correlation {corr:.4f}"


def test_no_correlation_between_heads_and_batches(decisions):
    _, keep = decisions
    for a, b, what in ((keep[:, 1:], keep[:, :-1], "heads"), (keep[1:], keep[:-1], "batches")):
        corr, n = _correlation(a, b)
        assert abs(corr) < SIGMAS / math.sqrt(n), f"adjacent {what}: correlation {corr:.4f}"


def test_seeds_give_independent_masks():
    a = dropout_keep_mask(1, *STATS_SHAPE[:3], 256, 0.5, "cpu").double()
    b = dropout_keep_mask(2, *STATS_SHAPE[:3], 256, 0.5, "cpu").double()
    corr, n = _correlation(a, b)
    assert abs(corr) < SIGMAS / math.sqrt(n)
