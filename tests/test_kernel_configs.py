"""Every kernel configuration the autotuner can pick, run under the Triton interpreter against float64.

The GPU runs block sizes, head-dim chunks and splits and dk/dv key tiles (kernels/configs.py) that the
interpreter's one small configuration never executes; here each distinct (kernel, group, head dim, dropout mode,
constexprs) of `shipped_entries()` (all architectures' tables; num_warps and num_stages do not change what a
kernel computes) runs once, alone, on the smallest shape that takes every path of its loops (`covering_shape`):
the forward's output, log-sum-exp and E (through the dq it gives), or a backward kernel's gradients from the
reference's output and log-sum-exp, against the float64 reference, under the specified keep mask
(tests/dropout_spec.py) with dropout. A launch that one class runs in two forms (the 16-bit forward rescaling once
per step or per tile, the 16-bit dk/dv kernel with dk in rank-one or dS form) runs both ways.

Groups run in the dtype and precision they serve: "16bit" as fp16 (the interpreter computes bf16 dots wrongly:
bf16 runs in the CUDA tests), "tf32" as fp32 at "high" (its forward and dk/dv kernel to TF32_TOLERANCE: their
products round P, the value and the keys, or P~, dS, q and dO', to fp16), "tf32x3" as fp32 at "highest" (the 3xTF32
split code; the interpreter multiplies TF32 operands in plain fp32, so the split itself is tested by
test_tf32_split_*; the dk/dv kernel's fp16 pairs it rounds as a GPU does).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from dropout_spec import specified_keep
from helpers import TF32_TOLERANCE, TOLERANCE, covering_shape, rel_err
from kernels import effective_dropout_p, ops
from kernels.configs import ARCHS, BASE_ARCH, FINE_DROP_BITS, dq_in_forward, rank_one_dkdv, rescale_per_step, \
    shipped_entries, split_config
from kernels.fused import _tf32_hi
from kernels.ops import _split, dropout_params, fused_bwd, fused_fwd, run_interpreted, seed_tensor
from kernels.reference import dcama_attention_reference

pytestmark = pytest.mark.interpreter

# A group's (dtype, torch float32 matmul precision), and the dropout p of each DROP_BITS.
GROUP_RUNS_AS = {"16bit": (torch.float16, "highest"), "tf32": (torch.float32, "high"),
                 "tf32x3": (torch.float32, "highest")}
DROPOUT_P = {0: 0.0, 1: 0.5, FINE_DROP_BITS: 0.3}
# The gradients (of q, k, v) each backward kernel writes.
GRADIENTS = {"bwd_dkdv": (1, 2), "bwd_dq": (0,)}
SEED = 4321
TF32_MANTISSA_BITS = 10


def shipped_constexpr_sets() -> list:
    """One pytest.param (kernel, group, head dim, DROP_BITS, constexprs) per distinct set in shipped_entries()."""
    sets = []
    for kernel, group, head_dim, bits, entry in shipped_entries():
        case = (kernel, group, head_dim, bits, split_config(kernel, entry)[0])
        if case not in sets:
            sets.append(case)
    return [pytest.param(kernel, group, head_dim, bits, meta,
                         id=f"{kernel}-{group}-D{head_dim}-bits{bits}-" + "-".join(map(str, meta.values())))
            for kernel, group, head_dim, bits, meta in sets]


@pytest.fixture
def matmul_precision():
    """Sets torch's float32 matmul precision for the test; restores the caller's."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


def _reference(q, k, v, grad_o, dropout_p, scale):
    """Float64 (o, lse2, [dq, dk, dv]) for one batch and head: lse2 is the base-2 log-sum-exp of the scaled scores
    (undropped), the forward's second output."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    keep = torch.from_numpy(specified_keep(SEED, 1, 1, q.shape[1], k.shape[1], dropout_p)) if dropout_p else None
    o = dcama_attention_reference(*leaves, keep=keep, dropout_p=effective_dropout_p(dropout_p), scale=scale,
                                  head_reduction="none")
    (o * grad_o.double()).sum().backward()
    lse2 = torch.logsumexp(scale * leaves[0][0, :, 0] @ leaves[1][0, :, 0].T, -1) / math.log(2)
    return o.detach(), lse2.detach()[None, None], [t.grad for t in leaves]


@pytest.mark.parametrize("kernel,group,head_dim,drop_bits,meta", shipped_constexpr_sets())
def test_every_shipped_configuration_matches_reference(kernel, group, head_dim, drop_bits, meta, matmul_precision,
                                                        monkeypatch):
    dtype, precision = GROUP_RUNS_AS[group]
    matmul_precision(precision)
    dropout_p = DROPOUT_P[drop_bits]
    assert dropout_params(dropout_p)[0] == drop_bits
    # A forward that rescales once per step on sm_90 (the interpreter's class) rescales per tile on the classes
    # outside RESCALE_PER_STEP_ARCHS: both run.
    per_step = kernel == "fwd" and rescale_per_step(BASE_ARCH, group, dtype == torch.float16, head_dim, drop_bits)
    # A dk/dv launch that takes dk in rank-one form on some class runs the dS form on others: both run.
    rank_one = kernel == "bwd_dkdv" and any(rank_one_dkdv(arch, group, 1, head_dim, drop_bits) for arch in ARCHS)
    n_query, n_key = covering_shape({kernel: meta}, drop_bits, group if dtype == torch.float32 else None, per_step)
    g = torch.Generator().manual_seed(head_dim + drop_bits)
    q, k = (torch.randn(1, n, 1, head_dim, generator=g).to(dtype) for n in (n_query, n_key))
    v = torch.rand(1, n_key, 1, generator=g).to(dtype)
    grad_o = torch.randn(1, 1, n_query, 1, generator=g)
    scale = head_dim ** -0.5
    o, lse2, grads = _reference(q, k, v, grad_o, dropout_p, scale)
    ran, forced = [], {}

    def runner(launch):  # runs the kernel under test only, in the set given, with the constexprs forced
        assert (launch.group, launch.constexprs["DROP_BITS"]) == (group, drop_bits)
        if launch.kernel == kernel:
            run_interpreted(replace(launch, constexprs={**launch.constexprs, **forced}), meta)
            ran.append(kernel)

    seed = seed_tensor(SEED, q.device)
    fwd_tol, grad_tol = TF32_TOLERANCE if (group, kernel) in (("tf32", "fwd"), ("tf32", "bwd_dkdv")) else \
        TOLERANCE[dtype]
    if kernel == "fwd":
        for step in (True, False) if per_step else (False,):
            forced["RESCALE_PER_STEP"] = step
            actual_o, actual_lse2, e = fused_fwd(q, k, v, seed, dropout_p, scale, True, runner)
            assert rel_err(actual_o, o) < fwd_tol and rel_err(actual_lse2, lse2) < fwd_tol, f"per step: {step}"
            if dq_in_forward(group, 1, head_dim):  # E, checked through the dq it gives
                dq = (grad_o * e * scale).transpose(1, 2)
                assert rel_err(dq, grads[0]) < grad_tol, f"dq from E, per step: {step}"
            else:
                assert e.numel() == 0
    else:  # without E: the dq kernel (C > 1, or D outside DQ_IN_FORWARD_HEAD_DIMS)
        for form in (True, False) if rank_one else (False,):
            monkeypatch.setattr(ops, "rank_one_dkdv", lambda *_: form)
            actual = fused_bwd(grad_o, q, k, v, o.float(), lse2.float(), torch.empty(0), seed, dropout_p, scale,
                               runner)
            for i in GRADIENTS[kernel]:
                assert actual[i].dtype == dtype and rel_err(actual[i], grads[i]) < grad_tol, f"d{'qkv'[i]}, {form}"
    assert ran == [kernel] * (2 if per_step or rank_one else 1)


# ---------------------------------------------------------------------------------------------
# The 3xTF32 split: the interpreter multiplies TF32 operands in plain fp32, so the split is tested on its own
# ---------------------------------------------------------------------------------------------
def split_inputs() -> torch.Tensor:
    """4096 (a power of two, for tl.arange) normal fp32 values of every binade from 2**-120 to 2**120, both signs:
    random mantissas, every mantissa bit set, exact TF32 values; and zeros."""
    g = torch.Generator().manual_seed(0)
    mantissa = torch.cat([torch.rand(3934, generator=g, dtype=torch.float64) + 1.0,
                          torch.full((80,), 2.0 - 2.0**-23, dtype=torch.float64),
                          torch.full((80,), 1.0 + 2.0**-TF32_MANTISSA_BITS, dtype=torch.float64)])
    exponent = torch.randint(-120, 121, mantissa.shape, generator=g).double()
    sign = torch.randint(0, 2, mantissa.shape, generator=g).double() * 2 - 1
    return torch.cat([(sign * mantissa * 2.0**exponent).float(), torch.zeros(2)])


def tf32_truncation(x: torch.Tensor) -> torch.Tensor:
    """x rounded toward zero to TF32's 10 mantissa bits, from the number's value (not its bits), in float64."""
    mantissa, exponent = np.frexp(x.double().numpy())  # |mantissa| in [0.5, 1): 11 significant bits kept
    kept = np.trunc(mantissa * 2.0**(TF32_MANTISSA_BITS + 1)) / 2.0**(TF32_MANTISSA_BITS + 1)
    return torch.from_numpy(np.ldexp(kept, exponent))


@triton.jit
def _tf32_hi_kernel(X, HI, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(HI + offs, _tf32_hi(tl.load(X + offs)))


def _kernel_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = torch.empty_like(x)
    _tf32_hi_kernel[(1,)](x, hi, N=x.numel())
    return hi, x - hi  # lo as the kernel's _mma forms it: an exact fp32 difference


@pytest.mark.parametrize("split", [_kernel_split, lambda x: _split(x, torch.float32)], ids=["_tf32_hi", "ops._split"])
def test_tf32_split_keeps_the_tf32_bits(split):
    """hi is x truncated to TF32 exactly, lo = x - hi is exact in fp32, and hi + lo as the tensor cores read them
    (lo truncated to TF32 too) reconstructs x within 2**-20 relative: the documented 3xTF32 precision."""
    x = split_inputs()
    hi, lo = split(x)
    assert hi.dtype == lo.dtype == torch.float32
    assert torch.equal(hi.double(), tf32_truncation(x))
    assert torch.equal(hi.double() + lo.double(), x.double())
    read = hi.double() + tf32_truncation(lo)
    assert ((read - x.double()).abs() <= 2.0**-20 * x.double().abs()).all()
    assert not torch.equal(lo, torch.zeros_like(lo))  # the inputs do have bits below TF32's


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 2.0**-21), (torch.bfloat16, 2.0**-15)], ids=["fp16", "bf16"])
def test_16bit_split_keeps_twice_the_precision(dtype, bound):
    """For 16-bit dots (DOD's hi / lo columns) hi is x rounded to the dtype and hi + lo reconstructs x to about
    twice its mantissa bits (relative to the largest |x|: fp16's exponent range is small)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    hi, lo = _split(x, dtype)
    assert hi.dtype == lo.dtype == dtype and torch.equal(hi, x.to(dtype))
    assert (hi.double() + lo.double() - x.double()).abs().max() <= bound * x.abs().max()
