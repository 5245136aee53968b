"""Fused DCAMA attention kernels against the float64 reference.

Relative error throughout: rel_err(a, b) = max|a - b| / max|b| with b the float64 reference.
Interpreter variants (@pytest.mark.interpreter) run the Triton kernels on CPU tensors under
TRITON_INTERPRET=1 with small odd shapes; CUDA variants (@pytest.mark.cuda) run the compiled kernels
with larger shapes and bf16 too.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import TF32_TOLERANCE, TOLERANCE, rel_err
from kernels import dcama_attention, dropout_keep_mask, effective_dropout_p, ops
from kernels.attention import HEAD_DIMS
from kernels.configs import RESCALE_PER_STEP_ARCHS
from kernels.reference import dcama_attention_reference

DEVICES = [pytest.param("cpu", marks=pytest.mark.interpreter, id="interp"),
           pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]
# (B, Nq, Nk, H): the interpreter needs small shapes; Nq and Nk are never multiples of the blocks
# and span several tiles (interpreter blocks: 32 query rows x 64 keys).
SHAPES = {"cpu": (2, 37, 70, 2), "cuda": (3, 301, 1111, 8)}


@pytest.fixture(autouse=True)
def _highest_fp32_precision():
    """fp32 tolerances hold at "highest" (tf32x3 dots on a GPU); restore the caller's setting."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.fixture
def launches(monkeypatch) -> list:
    """The launches the op makes under the interpreter, in order (each still runs)."""
    made, run_interpreted = [], ops.run_interpreted
    monkeypatch.setattr(ops, "run_interpreted", lambda launch: made.append(launch) or run_interpreted(launch))
    return made


class Case:
    """Leaf tensors (which receive .grad) and the views the op sees.

    strided=True: query is a slice of a fused Linear output viewed as (B, N, H, D), key a permuted
    (B, H, N, D) tensor, value a stride-0 expansion of one mask over the batch (no copies).
    """

    def __init__(self, batch: int, n_query: int, n_key: int, heads: int, head_dim: int, channels: int | None,
                 dtype: torch.dtype, device: str, strided: bool = False, seed: int = 0,
                 grad_scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.shape = (batch, n_query, heads, head_dim)
        self.strided = strided
        hd = heads * head_dim
        v_shape = (n_key,) if channels is None else (n_key, channels)
        if strided:
            leaves = (torch.randn(batch, n_query, 2 * hd, generator=g), torch.randn(batch, heads, n_key, head_dim,
                      generator=g), torch.rand(1, *v_shape, generator=g))
        else:
            leaves = (torch.randn(batch, n_query, heads, head_dim, generator=g),
                      torch.randn(batch, n_key, heads, head_dim, generator=g), torch.rand(batch, *v_shape, generator=g))
        self.leaves = [t.to(device, dtype).requires_grad_() for t in leaves]
        self.grad_seed, self.grad_scale = seed + 1, grad_scale

    def views(self, leaves: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.leaves if leaves is None else leaves
        if not self.strided:
            return q, k, v
        batch, n_query, heads, head_dim = self.shape
        return (q[..., :heads * head_dim].view(batch, n_query, heads, head_dim), k.permute(0, 2, 1, 3),
                v.expand(batch, *v.shape[1:]))

    def run(self, fn, leaves: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Output of fn(query, key, value) and the leaves' gradients of sum(out * g), g fixed per case (normal
        times grad_scale)."""
        leaves = self.leaves if leaves is None else leaves
        for t in leaves:
            t.grad = None
        out = fn(*self.views(leaves))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(self.grad_seed), dtype=torch.float64)
        g = g * self.grad_scale
        (out * g.to(out.device, out.dtype)).sum().backward()
        return out.detach(), [t.grad.detach() for t in leaves]

    def reference(self, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves64 = [t.detach().double().requires_grad_() for t in self.leaves]
        return self.run(lambda q, k, v: dcama_attention_reference(q, k, v, **kwargs), leaves64)


def _check(actual, expected, dtype: torch.dtype, tolerance: tuple[float, float] | None = None) -> None:
    (out, grads), (ref_out, ref_grads) = actual, expected
    fwd_tol, grad_tol = tolerance or TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) < fwd_tol
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert rel_err(g, rg) < grad_tol, f"d{name}"


def _skip_if_unavailable(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 dots wrongly: bf16 runs on CUDA and in the compile report")


# ---------------------------------------------------------------------------------------------
# forward and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("channels,head_reduction,strided", [(None, "mean", True), (2, "none", False),
                                                            (1, "mean", False)], ids=["C1-2d-mean-strided",
                                                                                      "C2-none", "C1-3d-mean"])
def test_matches_reference(device, dtype, head_dim, channels, head_reduction, strided):
    _skip_if_unavailable(device, dtype)
    if device == "cpu" and channels == 1 and head_dim != 16:
        pytest.skip("3-D value with C=1 is covered at D=16 on the interpreter (time budget)")
    batch, n_query, n_key, heads = SHAPES[device]
    case = Case(batch, n_query, n_key, heads, head_dim, channels, dtype, device, strided)
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, head_reduction=head_reduction, impl="triton"))
    _check(actual, case.reference(head_reduction=head_reduction), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_query,n_key", [(1, 1), (5, 64), (33, 129)])
def test_edge_sizes(device, n_query, n_key):
    """A single query or key token, Nk exactly one block, Nk one past two blocks; custom scale."""
    case = Case(1, n_query, n_key, 2, 16, None, torch.float32, device)
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, scale=0.3, impl="triton"))
    _check(actual, case.reference(scale=0.3), torch.float32)


# dq from the forward pass (docs/kernels.md): E = sum_j P_ij (z_ij v_j / (1 - p) - o_i) k_j, dq = scale dO E.
# Cases where E is a difference of near-equal terms or its terms are weighted unevenly: (variant, dropout_p,
# head_reduction, gain on q and k (peaked softmax), common key offset, value: "soft" uniform [0, 1) / "binary",
# support shots (Nk = shots x 37)). A variant is (dtype, float32 matmul precision, tolerances); each takes dq from E.
DQ_VARIANTS = {"fp16": (torch.float16, "highest", TOLERANCE[torch.float16]),
               "tf32": (torch.float32, "high", TF32_TOLERANCE),
               "fp32": (torch.float32, "highest", TOLERANCE[torch.float32])}
DQ_FORWARD_CASES = {
    "fp16-dropout0.5-peaked": ("fp16", 0.5, "mean", 3.0, 0.0, "soft", 1),
    "fp16-dropout0.5-key-offset": ("fp16", 0.5, "none", 1.0, 3.0, "soft", 1),
    "fp16-dropout0.3-3shot": ("fp16", 0.3, "mean", 1.0, 0.0, "soft", 3),
    "fp16-binary-mask-peaked": ("fp16", 0.0, "none", 3.0, 0.0, "binary", 2),
    "tf32-dropout0.5-peaked-offset": ("tf32", 0.5, "mean", 3.0, 3.0, "soft", 1),
    "tf32-dropout0.1-2shot": ("tf32", 0.1, "none", 1.0, 0.0, "binary", 2),
    "tf32-binary-mask-peaked-3shot": ("tf32", 0.0, "mean", 3.0, 0.0, "binary", 3),
    "fp32-dropout0.5-peaked-offset": ("fp32", 0.5, "mean", 3.0, 3.0, "soft", 1),
    "fp32-dropout0.1-2shot": ("fp32", 0.1, "none", 1.0, 0.0, "binary", 2),
    "fp32-binary-mask-peaked-3shot": ("fp32", 0.0, "mean", 3.0, 0.0, "binary", 3),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case_id", list(DQ_FORWARD_CASES))
def test_dq_from_the_forward_matches_reference(case_id, monkeypatch):
    """C = 1 training in 16 bits and in fp32 at TF32 and 3xTF32: the forward writes E and the backward's
    dq = scale * dO * E, with no dq kernel launch; gradients at the usual tolerances where E nearly cancels (peaked
    softmax, keys sharing an offset), with soft and binary masks, dropout 0.5 and other p, K-shot key counts, both
    head reductions; Nq, Nk odd."""
    variant, dropout_p, head_reduction, gain, offset, mask, shots = DQ_FORWARD_CASES[case_id]
    dtype, precision, tolerance = DQ_VARIANTS[variant]
    torch.set_float32_matmul_precision(precision)
    monkeypatch.setattr(ops, "dq_launch", _no_dq_kernel)
    batch, n_query, heads, head_dim = 1, 37, 2, 32
    case = Case(batch, n_query, shots * 37, heads, head_dim, None, dtype, "cpu", seed=len(case_id))
    with torch.no_grad():
        case.leaves[0].mul_(gain)
        case.leaves[1].mul_(gain).add_(offset)
        if mask == "binary":
            case.leaves[2].copy_(case.leaves[2] > 0.5)
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, dropout_p=dropout_p, seed=7,
                                                      head_reduction=head_reduction, impl="triton"))
    keep = dropout_keep_mask(7, batch, heads, n_query, shots * 37, dropout_p, "cpu") if dropout_p else None
    _check(actual, case.reference(keep=keep, dropout_p=effective_dropout_p(dropout_p),
                                  head_reduction=head_reduction), dtype, tolerance)


# dk in rank-one form (docs/kernels.md, "dk/dv in rank-one form"): dk_j = scale (v_j sum_i P~_ij dO'_i q_i +
# sum_i P_ij (-Delta_i) q_i). Cases where the two sums nearly cancel: queries sharing an offset (sum_i dS_ij is small
# next to sum_i |dS_ij|), a peaked softmax, a nearly constant value (v_j ~ o_i): (dropout_p, head dim, gain on q and
# k, common query offset, value: "soft" uniform [0, 1) / "binary" / "flat" 1 + 0.01 uniform, shots, head_reduction).
RANK_ONE_CASES = {
    "dropout0.5-query-offset": (0.5, 32, 1.0, 3.0, "soft", 1, "mean"),
    "dropout0.5-peaked-flat-value": (0.5, 32, 3.0, 0.0, "flat", 1, "none"),
    "no-dropout-flat-value-2shot": (0.0, 32, 1.0, 0.0, "flat", 2, "mean"),
    "no-dropout-peaked-query-offset-d16": (0.0, 16, 3.0, 3.0, "binary", 1, "none"),
    "dropout0.3-query-offset-d16-3shot": (0.3, 16, 1.0, 3.0, "soft", 3, "mean"),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case_id", list(RANK_ONE_CASES))
def test_rank_one_dk_matches_reference(case_id, launches):
    """The 16-bit C = 1 dk/dv kernel takes dk from its rank-one form (RANK_ONE, kernels.configs.rank_one_dkdv):
    gradients at the fp16 tolerances where its two sums nearly cancel, without dropout, with 1-bit decisions and
    with 16-bit slices; Nq and Nk odd, K-shot key counts, both head reductions."""
    dropout_p, head_dim, gain, offset, value, shots, head_reduction = RANK_ONE_CASES[case_id]
    batch, n_query, heads = 1, 37, 2
    case = Case(batch, n_query, shots * 37, heads, head_dim, None, torch.float16, "cpu", seed=len(case_id))
    with torch.no_grad():
        case.leaves[0].mul_(gain).add_(offset)
        case.leaves[1].mul_(gain)
        if value == "binary":
            case.leaves[2].copy_(case.leaves[2] > 0.5)
        elif value == "flat":
            case.leaves[2].mul_(0.01).add_(1.0)
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, dropout_p=dropout_p, seed=7,
                                                      head_reduction=head_reduction, impl="triton"))
    assert [launch.constexprs["RANK_ONE"] for launch in launches if launch.kernel == "bwd_dkdv"] == [True]
    keep = dropout_keep_mask(7, batch, heads, n_query, shots * 37, dropout_p, "cpu") if dropout_p else None
    _check(actual, case.reference(keep=keep, dropout_p=effective_dropout_p(dropout_p),
                                  head_reduction=head_reduction), torch.float16)


@pytest.mark.interpreter
def test_rank_one_dk_factors_are_scaled_into_fp16_range(launches):
    """dk's rank-one factors dO' q and -Delta q leave fp16's range where dO', q, dS and the gradients do not: |q| ~ 30
    with |dO| ~ 3000 overflows 65504. Scaled by a power of two (kernels.ops.dk_factors), the gradients keep the fp16
    tolerances."""
    case = Case(1, 37, 74, 2, 32, None, torch.float16, "cpu", seed=3, grad_scale=3000.0)
    with torch.no_grad():
        case.leaves[0].mul_(30.0)
        case.leaves[1].div_(30.0)  # the scores stay of order one
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, dropout_p=0.5, seed=7, impl="triton"))
    assert [launch.constexprs["RANK_ONE"] for launch in launches if launch.kernel == "bwd_dkdv"] == [True]
    keep = dropout_keep_mask(7, 1, 2, 37, 74, 0.5, "cpu")
    _check(actual, case.reference(keep=keep, dropout_p=0.5), torch.float16)


@pytest.mark.interpreter
@pytest.mark.parametrize("variant,value_magnitude,key_magnitude,grad_magnitude", [
    ("tf32", 3e5, 3e5, 1.0), ("tf32", 1e-7, 1e-7, 1.0), ("tf32", 1e-9, 1.0, 1.0), ("tf32", 1e10, 1.0, 1.0),
    ("tf32", 1e-40, 1.0, 1.0), ("tf32", 1.0, 1.0, 1e-12), ("tf32", 1e4, 1.0, 1e12), ("tf32", 1e-20, 1e20, 1e20),
    ("tf32", 1.0, 1.0, 1e37), ("fp32", 1.0, 1.0, 1e37),
    ("fp32", 3e5, 3e5, 1.0), ("fp32", 1e-9, 1.0, 1.0), ("fp32", 1.0, 1.0, 1e-12),
    ("fp32", 1e4, 1.0, 1e12), ("fp32", 1e-17, 1e17, 1.0), ("fp32", 1e-20, 1e20, 1e20)])
def test_fp32_operands_are_scaled_into_fp16_range(variant, value_magnitude, key_magnitude, grad_magnitude,
                                                  monkeypatch):
    """In fp32 with E the forward's products read the value, v k and the keys as fp16 copies scaled by powers of
    two (kernels.ops.forward_operands), and the dk/dv kernel's dv and dk products read scaled fp16 copies of q, dO'
    and dS (kernels.ops.backward_operands; pairs at 3xTF32): a value, keys and output gradients far outside fp16's
    range (3e5 overflows it, 1e-7 is below its normal numbers), apart or together, a value at fp32's subnormal
    end, a value and queries both tiny (whose two scales' product leaves fp32's range) and output gradients near
    fp32's top (dk's accumulator times dO''s scale alone would overflow), give the same precision as unit ones, at
    TF32 and at 3xTF32."""
    _, precision, tolerance = DQ_VARIANTS[variant]
    torch.set_float32_matmul_precision(precision)
    monkeypatch.setattr(ops, "dq_launch", _no_dq_kernel)
    case = Case(1, 37, 74, 2, 32, None, torch.float32, "cpu", seed=5, grad_scale=grad_magnitude)
    with torch.no_grad():
        case.leaves[0].div_(key_magnitude)  # the scores stay of order one
        case.leaves[1].mul_(key_magnitude)
        case.leaves[2].mul_(value_magnitude)
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, dropout_p=0.5, seed=7, impl="triton"))
    keep = dropout_keep_mask(7, 1, 2, 37, 74, 0.5, "cpu")
    _check(actual, case.reference(keep=keep, dropout_p=0.5), torch.float32, tolerance)


@pytest.mark.interpreter
def test_dq_from_the_forward_with_a_feature_map_key():
    """A key viewed from a conv feature map (B, H * D, Nk) -> (B, Nk, H, D), head-dim stride Nk: E's operand v k
    is laid out for the kernel whatever the key's strides."""
    g = torch.Generator().manual_seed(3)
    feature = torch.randn(1, 2, 16, 9, generator=g).half().requires_grad_()  # (B, H, D, Nk)
    query = torch.randn(1, 5, 2, 16, generator=g).half().requires_grad_()
    value = torch.rand(1, 9, generator=g).half().requires_grad_()
    grad = torch.randn(1, 5, generator=g, dtype=torch.float64)
    out = dcama_attention(query, feature.permute(0, 3, 1, 2), value, impl="triton")
    (out * grad.half()).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (query, feature, value)]
    (dcama_attention_reference(leaves[0], leaves[1].permute(0, 3, 1, 2), leaves[2]) * grad).sum().backward()
    for name, t, ref in zip(("dq", "dk", "dv"), (query, feature, value), leaves):
        assert rel_err(t.grad, ref.grad) < TOLERANCE[torch.float16][1], name


def _no_dq_kernel(*args, **kwargs):
    raise AssertionError("the dq kernel was launched on the C = 1 path")


@pytest.mark.interpreter
def test_e_only_when_a_backward_follows(launches):
    """The forward computes E only with grad enabled and an input requiring it, and only for a one-channel value
    (in 16 bits and in fp32 at both precisions) at a head dim DQ_IN_FORWARD_HEAD_DIMS lists; C > 1 and D = 128 take
    the dq kernel. The dk/dv kernel's rank-one form runs for the 16-bit one-channel launch only."""
    case = Case(1, 5, 9, 1, 16, None, torch.float16, "cpu")
    with torch.no_grad():
        dcama_attention(*case.views(), impl="triton")
    dcama_attention(*(t.detach() for t in case.views()), impl="triton")
    assert [launch.constexprs["DQ_IN_FWD"] for launch in launches] == [False, False]
    case.run(lambda q, k, v: dcama_attention(q, k, v, impl="triton"))
    assert [(launch.kernel, launch.constexprs.get("DQ_IN_FWD")) for launch in launches[2:]] == \
        [("fwd", True), ("bwd_dkdv", None)]
    assert launches[3].constexprs["RANK_ONE"]  # 16 bits, C = 1, D <= 32: dk in rank-one form
    launches.clear()
    for channels, dtype, precision, head_dim, with_e in ((2, torch.float16, "highest", 16, False),
                                                         (None, torch.float16, "highest", 128, False),
                                                         (None, torch.float32, "highest", 16, True),
                                                         (None, torch.float32, "high", 16, True)):
        torch.set_float32_matmul_precision(precision)
        launches.clear()
        Case(1, 5, 9, 1, head_dim, channels, dtype, "cpu").run(lambda q, k, v: dcama_attention(q, k, v, impl="triton"))
        assert [(launch.kernel, launch.constexprs.get("DQ_IN_FWD")) for launch in launches] == \
            [("fwd", with_e), ("bwd_dkdv", None)] + ([] if with_e else [("bwd_dq", None)])
        assert not launches[1].constexprs["RANK_ONE"]


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    """Same inputs and seed: bit-identical outputs and gradients (no atomics)."""
    batch, n_query, n_key, heads = SHAPES[device]
    case = Case(batch, n_query, n_key, heads, 32, None, torch.float32, device)
    runs = [case.run(lambda q, k, v: dcama_attention(q, k, v, dropout_p=0.5, seed=11, impl="triton"))
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p,head_dim,head_reduction,channels",
                         [(0.5, 32, "mean", None), (0.25, 64, "none", 2), (0.1, 16, "mean", None)])
def test_dropout_matches_reference_with_keep_mask(device, dtype, dropout_p, head_dim, head_reduction, channels):
    """Forward and backward apply exactly dropout_keep_mask's decisions, scaled by 1/(1 - p_eff), with 1-bit
    decisions (p = 1/2) and 16-bit slices, on the fp32 and the 16-bit paths (whose forward sums the softmax
    denominator on the tensor cores)."""
    _skip_if_unavailable(device, dtype)
    batch, n_query, n_key, heads = SHAPES[device]
    case = Case(batch, n_query, n_key, heads, head_dim, channels, dtype, device, strided=True)
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, dropout_p=dropout_p, seed=1234,
                                                      head_reduction=head_reduction, impl="triton"))
    keep = dropout_keep_mask(1234, batch, heads, n_query, n_key, dropout_p, device).cpu()
    expected = case.reference(keep=keep, dropout_p=effective_dropout_p(dropout_p), head_reduction=head_reduction)
    _check(actual, expected, dtype)
    # The naive path materialises P with the same mask; checked in fp32 only: in bf16 its own rounding (softmax and
    # P @ v in bf16) already comes to 1.4e-2 of the reference here, too close to the tolerance to hold everywhere.
    if dtype == torch.float32:
        naive = case.run(lambda q, k, v: dcama_attention(q, k, v, dropout_p=dropout_p, seed=1234,
                                                         head_reduction=head_reduction, impl="naive"))
        _check(naive, expected, dtype)


def test_effective_dropout_p():
    assert effective_dropout_p(0.5) == 0.5 and effective_dropout_p(0.25) == 0.25 and effective_dropout_p(0.0) == 0.0
    assert effective_dropout_p(0.1) == round(0.1 * 2**16) / 2**16
    assert abs(effective_dropout_p(0.3) - 0.3) <= 2**-17


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p", [0.5, 0.1])
def test_keep_mask_is_a_function_of_the_position(device, dropout_p):
    """The decision of (b, h, i, j) depends on the seed and its position only: the same seed repeats the mask,
    and a mask of a smaller problem is the corner of a larger one (so block sizes cannot matter).
    The specification and statistical tests are tests/test_dropout_rng.py."""
    batch, heads, n_query, n_key = 2, 2, 40, 333
    keep = dropout_keep_mask(7, batch, heads, n_query, n_key, dropout_p, device).cpu()
    assert keep.dtype == torch.bool and keep.shape == (batch, heads, n_query, n_key)
    assert torch.equal(keep, dropout_keep_mask(7, batch, heads, n_query, n_key, dropout_p, device).cpu())
    assert torch.equal(keep[..., :17, :100], dropout_keep_mask(7, batch, heads, 17, 100, dropout_p, device).cpu())
    # Heads are numbered b * H + h: the first head of a 1-head problem is (b=0, h=0) of any other.
    assert torch.equal(keep[:1, :1], dropout_keep_mask(7, 1, 1, n_query, n_key, dropout_p, device).cpu())
    assert not torch.equal(keep, dropout_keep_mask(8, batch, heads, n_query, n_key, dropout_p, device).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_seeds(device):
    """Same seed, same output; different seed, different output; seed=None follows torch.manual_seed."""
    batch, n_query, n_key, heads = SHAPES[device]
    case = Case(batch, n_query, n_key, heads, 16, None, torch.float32, device)
    q, k, v = case.views()

    def op(**kw):
        with torch.no_grad():
            return dcama_attention(q, k, v, dropout_p=0.5, impl="triton", **kw)

    assert torch.equal(op(seed=3), op(seed=3))
    assert not torch.equal(op(seed=3), op(seed=4))
    torch.manual_seed(0)
    first, second = op(), op()
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(op(), first)
    # The naive path draws the same seed from the same generator, hence the same mask.
    torch.manual_seed(0)
    with torch.no_grad():
        naive = dcama_attention(q, k, v, dropout_p=0.5, impl="naive")
    assert rel_err(naive, first) < 1e-5


# ---------------------------------------------------------------------------------------------
# other implementations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["naive", "sdpa", "auto"])
@pytest.mark.parametrize("channels,head_reduction", [(None, "mean"), (3, "none")])
def test_torch_impls_match_reference(impl, channels, head_reduction):
    case = Case(2, 19, 23, 2, 32, channels, torch.float64, "cpu", strided=True)
    actual = case.run(lambda q, k, v: dcama_attention(q, k, v, head_reduction=head_reduction, impl=impl))
    expected = case.reference(head_reduction=head_reduction)
    assert rel_err(actual[0], expected[0]) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(actual[1], expected[1]))


def test_sdpa_dropout_is_its_own():
    """impl="sdpa" applies SDPA's dropout (torch RNG): it changes the output and repeats under manual_seed."""
    case = Case(1, 9, 21, 2, 16, None, torch.float32, "cpu")
    q, k, v = case.views()
    clean = dcama_attention(q, k, v, impl="sdpa")
    torch.manual_seed(5)
    a = dcama_attention(q, k, v, dropout_p=0.5, impl="sdpa")
    torch.manual_seed(5)
    assert torch.equal(a, dcama_attention(q, k, v, dropout_p=0.5, impl="sdpa"))
    assert not torch.equal(a, clean)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _bad_inputs():
    q, k, v = torch.randn(2, 5, 2, 16), torch.randn(2, 7, 2, 16), torch.rand(2, 7)
    return [
        ((q[0], k, v), {}, "query must have rank 4"),
        ((q, k[0], v), {}, "key must have rank 4"),
        ((q, k, v[0]), {}, "value must have rank 2"),
        ((q, k[:1], v), {}, "batch sizes differ"),
        ((q, torch.randn(2, 7, 3, 16), v), {}, "key has 3 heads"),
        ((q, torch.randn(2, 7, 2, 32), v), {}, "key head dim 32"),
        ((q, k, torch.rand(2, 6)), {}, "value has 6 tokens"),
        ((torch.randn(2, 5, 2, 24), torch.randn(2, 7, 2, 24), v), {}, "head dim D=24 is not supported"),
        ((q, k.half(), v), {}, "key has dtype torch.float16"),
        ((q, k, v.double()), {}, "value has dtype torch.float64"),
        ((q, k, torch.rand(2, 7, device="meta")), {}, "value is on meta"),
        ((q.int(), k.int(), v.int()), {}, "query dtype torch.int32"),
        ((q.double(), k.double(), v.double()), {"impl": "triton"}, "query dtype torch.float64"),
        ((q[:, :0], k, v), {}, "query is empty"),
        ((q, k[:, :0], v[:, :0]), {}, "key is empty"),
        ((q, k, v.unsqueeze(-1)[..., :0]), {}, "value is empty"),
        ((q, k, v), {"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
        ((q, k, v), {"dropout_p": -0.1}, r"dropout_p must be in \[0, 1\)"),
        ((q, k, v), {"head_reduction": "sum"}, "head_reduction must be one of"),
        ((q, k, v), {"scale": -0.5}, "scale must be a positive finite number"),
        ((q, k, v), {"scale": float("nan")}, "scale must be a positive finite number"),
        ((q, k, v), {"impl": "cuda"}, "impl must be one of"),
        ((q.numpy(), k, v), {}, "query must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("args,kwargs,match", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dcama_attention(*args, **kwargs)


def test_keep_mask_errors():
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        dropout_keep_mask(0, 1, 1, 4, 4, 1.5, "cpu")
    with pytest.raises(ValueError, match="n_key must be >= 1"):
        dropout_keep_mask(0, 1, 1, 4, 0, 0.5, "cpu")
    assert dropout_keep_mask(0, 1, 2, 3, 4, 0.0, "cpu").all()


# ---------------------------------------------------------------------------------------------
# torch.compile, fake tensors, saved activations
# ---------------------------------------------------------------------------------------------
class _TinyAttention(torch.nn.Module):
    """A DCAMA-like layer: two Linears viewed as heads, the op over a single-channel mask."""

    def __init__(self, channels: int = 64, heads: int = 2, dropout_p: float = 0.0, impl: str = "triton") -> None:
        super().__init__()
        self.heads, self.dropout_p, self.impl = heads, dropout_p, impl
        self.lq, self.lk = torch.nn.Linear(channels, channels), torch.nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.lq(x).view(*x.shape[:2], self.heads, -1)
        k = self.lk(y).view(*y.shape[:2], self.heads, -1)
        return dcama_attention(q, k, mask, dropout_p=self.dropout_p, seed=99, impl=self.impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,precision", [(torch.float16, "highest"), (torch.float32, "high"),
                                             (torch.float32, "highest")], ids=["fp16", "fp32-tf32", "fp32-tf32x3"])
def test_dropout_multipliers_give_the_select_bit_for_bit(device, dtype, precision):
    """The forward that drops fp16 weights with `_bit_scale`'s multipliers (KEEP_AS_SCALE, on the classes of
    kernels.configs.DROP_MULTIPLIER_ARCHS) writes exactly what the select gives (the other classes): o, the
    log-sum-exp and E, through the main loop's sub-tiles per Philox call, a leftover full tile and the masked last
    one; q and k x 3 make many fp16 weights subnormal, which the packed multiply must double, not flush."""
    g = torch.Generator().manual_seed(11)
    n_query, n_key = (37, 64 * 4 + 64 + 13) if device == "cpu" else (301, 1111)
    q = (3 * torch.randn(1, n_query, 2, 32, generator=g)).to(device, dtype)
    k = (3 * torch.randn(1, n_key, 2, 32, generator=g)).to(device, dtype)
    v = torch.rand(1, n_key, 1, generator=g).to(device, dtype)
    seed = torch.tensor([5], device=device)

    def forward(multiplier: bool) -> tuple[torch.Tensor, ...]:
        def runner(launch: ops.Launch) -> None:
            forced = replace(launch, constexprs={**launch.constexprs, "KEEP_AS_SCALE": multiplier})
            if device == "cpu":
                ops.run_interpreted(forced)
            else:
                ops.run(forced)
        return ops.fused_fwd(q, k, v, seed, 0.5, 32 ** -0.5, True, runner)

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with_multipliers, with_select = forward(True), forward(False)
    finally:
        torch.set_float32_matmul_precision(saved)
    for name, a, b in zip(("o", "lse", "E"), with_multipliers, with_select):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.5], ids=["no-dropout", "dropout"])
def test_rescale_per_step_matches_the_per_tile_rescale(device, dropout_p):
    """The fp16 forward that rescales its online softmax once per 256-key main-loop step (RESCALE_PER_STEP, sm_90 and
    the interpreter: kernels.configs.rescale_per_step) writes what the per-tile rescale writes, to fp16 rounding: o,
    the log-sum-exp and E, through two or more main-loop steps, a leftover full tile and the masked last one. In
    each of those tiles one key scores 2**16 or more above the others in the softmax's base-2 domain for about a
    third of the query rows (each key on its own head-dim column), so a maximum that missed any tile of a step, or
    a stale one in the tiles after the steps, would overflow the fp16 weights there."""
    if ops.device_arch(torch.device(device)) not in RESCALE_PER_STEP_ARCHS:
        pytest.skip("this GPU's class rescales once per key tile")
    g = torch.Generator().manual_seed(12)
    if device == "cpu":  # the interpreter's 64-key tiles: steps [0, 256) and [256, 512), then 512 and 576
        n_query, n_key, spikes = 37, 256 * 2 + 64 + 13, (10, 70, 130, 200, 270, 340, 400, 470, 530, 580)
    else:  # sm_90's 128-key tiles: four steps, then 1024 and 1152
        n_query, n_key, spikes = 301, 1024 + 128 + 87, (10, 140, 270, 400, 530, 660, 790, 920, 1050, 1200)
    q = torch.randn(1, n_query, 2, 32, generator=g)
    k = torch.randn(1, n_key, 2, 32, generator=g)
    for column, key in enumerate(spikes):  # 256 q * 32 ** -0.5 * log2(e) = 65 q: 16 above the rest for q >~ 1/3
        k[:, key, :, column] = 256.0
    v = torch.rand(1, n_key, 1, generator=g)
    q, k, v = (t.to(device, torch.float16) for t in (q, k, v))
    seed = torch.tensor([5], device=device)

    def forward(per_step: bool) -> tuple[torch.Tensor, ...]:
        def runner(launch: ops.Launch) -> None:
            assert launch.constexprs["RESCALE_PER_STEP"]  # what this device's fp16 forward runs by default
            forced = replace(launch, constexprs={**launch.constexprs, "RESCALE_PER_STEP": per_step})
            if device == "cpu":
                ops.run_interpreted(forced)
            else:
                ops.run(forced)
        return ops.fused_fwd(q, k, v, seed, dropout_p, 32 ** -0.5, True, runner)

    per_step, per_tile = forward(True), forward(False)
    for name, a, b in zip(("o", "lse", "E"), per_step, per_tile):
        assert torch.isfinite(a).all() and rel_err(a, b) < TOLERANCE[torch.float16][0], name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p,impl,dtype", [(0.0, "triton", torch.float32), (0.5, "triton", torch.float32),
                                                  (0.5, "triton", torch.float16), (0.5, "naive", torch.float32)],
                         ids=["triton", "triton-dropout", "triton-dropout-fp16-E", "naive-dropout"])
def test_torch_compile_fullgraph(device, dropout_p, impl, dtype):
    """torch.compile traces the custom ops without a graph break (fullgraph) and matches eager, gradients too
    (impl="naive" with dropout goes through the keep-mask op; fp16 takes dq from the forward's E)."""
    torch.manual_seed(0)
    model = _TinyAttention(dropout_p=dropout_p, impl=impl).to(device, dtype)
    x, y, mask = (t.to(device, dtype) for t in (torch.randn(2, 20, 64), torch.randn(2, 30, 64), torch.rand(2, 30)))
    # aot_eager runs AOTAutograd's tracing (fake tensors, the registered autograd) without Inductor's
    # slow C++ compile on a CPU; on a GPU the default Inductor backend is used.
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x, y, mask)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x, y, mask)
    eager.square().sum().backward()
    fwd_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else TOLERANCE[dtype]
    assert rel_err(out, eager) < fwd_tol
    assert all(rel_err(a, p.grad) < grad_tol for a, p in zip(grads, model.parameters()))


@pytest.mark.interpreter
def test_torch_compile_seed_none():
    """seed=None draws inside the compiled graph: still no graph break, and runs repeat under manual_seed."""
    model = _TinyAttention(channels=32, dropout_p=0.5)

    def fn(x, y, mask):
        q = model.lq(x).view(1, 8, 2, 16)
        k = model.lk(y).view(1, 12, 2, 16)
        return dcama_attention(q, k, mask, dropout_p=0.5, impl="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, y, mask = torch.randn(1, 8, 32), torch.randn(1, 12, 32), torch.rand(1, 12)
    with torch.no_grad():
        torch.manual_seed(1)
        a, b = compiled(x, y, mask), compiled(x, y, mask)
        torch.manual_seed(1)
        assert torch.equal(compiled(x, y, mask), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("mode", ["fake", "meta"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_shape_propagation_and_saved_activations(mode, dtype):
    """At the DCAMA Swin-B 1/8-scale 5-shot training shape, FakeTensor / meta tensors propagate shapes
    (no kernel launch) and autograd saves only q, k, v, the per-head output, lse, E (dq's factor, from the forward)
    and the seed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch, n_query, n_key, heads, head_dim = 12, 2304, 5 * 2304, 8, 32
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    ctx = FakeTensorMode() if mode == "fake" else torch.device("meta")
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q = torch.randn(batch, n_query, heads, head_dim, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, n_key, heads, head_dim, dtype=dtype, requires_grad=True)
        v = torch.rand(batch, n_key, dtype=dtype, requires_grad=True)
        out = dcama_attention(q, k, v, dropout_p=0.5, impl="triton")
        none = dcama_attention(q, k, v.unsqueeze(-1), head_reduction="none", impl="triton")
        assert out.shape == (batch, n_query) and none.shape == (batch, heads, n_query, 1)
        saved_bytes = sum(t.numel() * t.element_size() for t in saved[:7])
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert len(saved) == 14  # 7 per call
    per_row = batch * heads * n_query * 4  # o (C = 1) and lse, fp32
    expected = (q.numel() + k.numel() + v.numel()) * q.element_size() + 2 * per_row + per_row * head_dim + 8
    assert saved_bytes == expected  # beyond the inputs: (2 + D) * B*H*Nq*4 + 8 bytes, never B*H*Nq*Nk


@pytest.mark.parametrize("mode", ["fake", "meta"])
def test_naive_dropout_traces_without_kernel_launch(mode):
    """The naive path's keep mask propagates shapes under FakeTensor / meta, and its saved activations
    include P-sized tensors (the reason for the fused op)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch, n_query, n_key, heads, head_dim = 2, 300, 500, 8, 32
    saved = []
    ctx = FakeTensorMode() if mode == "fake" else torch.device("meta")
    with ctx, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q = torch.randn(batch, n_query, heads, head_dim, requires_grad=True)
        k = torch.randn(batch, n_key, heads, head_dim, requires_grad=True)
        v = torch.rand(batch, n_key, requires_grad=True)
        out = dcama_attention(q, k, v, dropout_p=0.5, impl="naive")
        assert out.shape == (batch, n_query)
    scores = batch * heads * n_query * n_key
    assert any(t.dtype == torch.bool and t.numel() == scores for t in saved)  # the keep mask
    assert sum(t.numel() for t in saved if t.dtype == torch.float32 and t.numel() == scores) >= 2 * scores
