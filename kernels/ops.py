"""Host side of the fused kernels: the dropout parameters and seeds, the small operands the kernels read
(VX, DOD), the launches, and the torch.library custom ops with their fakes and autograd.

Each `*_launch` function returns a `Launch` (kernel name, grid, positional arguments, constexprs) without
launching it, so that the compile report (bench/kernel_specs.py) derives every argument type from the
very arguments the op passes. The operand layouts are documented in docs/kernels.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

from kernels import fused
from kernels.configs import BASE_ARCH, CONFIG_FIELDS, FINE_DROP_BITS, KEEP_MASK_CONFIG, MIN_CAPABILITY, \
    arch_for_capability, candidates, config_group, dq_in_forward, drops_by_multiplier, fitting_candidates, \
    interpreter_meta, other_triton_warning, rank_one_dkdv, rescale_per_step, split_config, unsupported_reason

LOG2E = 1.4426950408889634
KERNELS = {"fwd": fused._fwd_kernel, "bwd_dkdv": fused._bwd_dkdv_kernel, "bwd_dq": fused._bwd_dq_kernel}
AUTOTUNE_KEY = ["Nq", "Nk", "HEAD_DIM", "C", "DROP_BITS", "DOT_PRECISION", "DQ_IN_FWD"]


# ---------------------------------------------------------------------------------------------
# Dropout parameters and seeds
# ---------------------------------------------------------------------------------------------
def dropout_params(dropout_p: float) -> tuple[int, int, float]:
    """(DROP_BITS, threshold T, effective p = T / 2**DROP_BITS); DROP_BITS = 0 means no dropout."""
    if dropout_p == 0.0:
        return 0, 0, 0.0
    bits = 1 if dropout_p == 0.5 else FINE_DROP_BITS
    threshold = min(round(dropout_p * 2**bits), 2**bits - 1)
    if threshold == 0:  # p < 2**-17 rounds to "keep everything"
        return 0, 0, 0.0
    return bits, threshold, threshold / 2**bits


def effective_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels really apply (and scale by): round(p * 2**bits) / 2**bits.

    Equal to dropout_p whenever dropout_p is a multiple of 2**-16 (0.5, 0.25, 0.125, ...); otherwise
    within 2**-17 of it.
    """
    return dropout_params(float(dropout_p))[2]


def seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    """The 64-bit Philox key as a 1-element int64 tensor on `device`.

    seed=None draws it from torch's generator of that device (so torch.manual_seed repeats runs);
    keeping it a tensor avoids a host sync and lets torch.compile trace the draw.
    """
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)
    return torch.tensor([(int(seed) + 2**63) % 2**64 - 2**63], dtype=torch.int64, device=device)


def is_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return not isinstance(fused._fwd_kernel, triton.runtime.JITFunction)


def check_triton_device(device: torch.device) -> None:
    if is_interpreted():
        if device.type != "cpu":
            raise ValueError(f"TRITON_INTERPRET=1 runs the kernels on CPU tensors only, got device {device}")
    elif device.type != "cuda":
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors), got {device}")


def check_capability(device: torch.device) -> None:
    """ValueError unless the CUDA `device` has the compute capability the fused kernels need (MIN_CAPABILITY)."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise ValueError(f"impl='triton' needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                         f"or newer (A100, RTX 30xx and later); {torch.cuda.get_device_name(device)} has "
                         f"{major}.{minor}: use impl='auto' or impl='sdpa' there")


def input_group(dtype: torch.dtype) -> str:
    """The configuration group of inputs of `dtype` (fp32: by torch's float32 matmul precision)."""
    return config_group(dot_precision(dtype) if dtype == torch.float32 else None)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 inputs following torch.get_float32_matmul_precision()."""
    if dtype != torch.float32:
        return "tf32"  # ignored by fp16/bf16 dots
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ---------------------------------------------------------------------------------------------
# The small operands: VX (value) and DOD (output gradient); docs/kernels.md, "Operands"
# ---------------------------------------------------------------------------------------------
def operand_width(channels: int, minimum: int = 16) -> int:
    """DV, the width of VX and DOD: C value (dO) columns twice (hi and lo), two 1 (-Delta) columns and a
    spare one, as a power of two of at least `minimum`: 16, the K of a 16-bit MMA, where VX or DOD is one; 8, the
    N of an MMA, for the forward's split VX, which is only ever the B operand."""
    return max(minimum, triton.next_power_of_2(2 * channels + 3))


def dv_width(channels: int) -> int:
    """The DOD columns the dv product reads: its 2C dO columns (hi, lo), at least 8 (the N of an MMA)."""
    return max(8, triton.next_power_of_2(2 * channels))


def value_operand(value: torch.Tensor, split_dtype: torch.dtype | None = None) -> torch.Tensor:
    """VX (B, Nk, DV) in the value's dtype: [v, v, 1, 1, 0...]; with `split_dtype`, the forward's [v hi, v lo, 1,
    1, 0...] in it (`_split`), DV then at least 8 only (`operand_width`)."""
    batch, n_key, channels = value.shape
    width = operand_width(channels) if split_dtype is None else operand_width(channels, 8)
    vx = value.new_zeros((batch, n_key, width), dtype=split_dtype or value.dtype)
    vx[..., :channels], vx[..., channels:2 * channels] = (value, value) if split_dtype is None else \
        _split(value.float(), split_dtype)
    vx[..., 2 * channels:2 * channels + 2] = 1
    return vx


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (fp32) = hi + lo with hi, lo in `dtype` as the tensor cores read them (fp32 reads as TF32: 10
    mantissa bits), so that a dot over [hi, lo] keeps about twice the operand precision."""
    if dtype == torch.float32:
        hi = (x.view(torch.int32) & -(1 << 13)).view(torch.float32)  # truncated to TF32's mantissa
        return hi, x - hi
    hi = x.to(dtype)
    return hi, (x - hi.float()).to(dtype)


def value_key(key: torch.Tensor, value: torch.Tensor, key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """VK (B, Nk, H, 2D) in the key's (16-bit) dtype: v_j k_j per key token and head as [hi, lo] (`_split`), so that
    the forward's P~ @ (v k) keeps about twice the operand precision (one rounding of v k would not cancel in E);
    built once per forward rather than per query tile in the kernel. value is (B, Nk, 1). Contiguous whatever the
    key's strides (the kernel reads it with unit head-dim stride). With `key_scale` (fp32 keys, `forward_operands`):
    (B, Nk, H, 4D) fp16, the [hi, lo] pairs of v k and of k, times key_scale (a single rounding of k would not
    cancel either)."""
    batch, n_key, heads, head_dim = key.shape
    vk = key.float() * value.float()[:, :, :, None]
    if key_scale is None:
        return torch.cat(_split(vk, key.dtype), dim=3,
                         out=torch.empty((batch, n_key, heads, 2 * head_dim), dtype=key.dtype, device=key.device))
    return _scaled_pairs((vk, key.float()), key_scale)


def _scaled_pairs(parts: tuple[torch.Tensor, ...], scale: torch.Tensor) -> torch.Tensor:
    """The fp16 [hi, lo] pairs (`_split`) of each of `parts` (fp32, all (B, N, H, D)) times `scale`, side by side in
    a new contiguous (B, N, H, 2D len(parts)) tensor whatever the parts' strides (the kernels read it with unit
    last stride)."""
    batch, n_token, heads, head_dim = parts[0].shape
    out = torch.empty((batch, n_token, heads, 2 * head_dim * len(parts)), dtype=torch.float16, device=parts[0].device)
    return torch.cat([half for part in parts for half in _split(part * scale, torch.float16)], dim=3, out=out)


def _exponent_below(amax: torch.Tensor, exponent: int) -> torch.Tensor:
    """The largest e (an integer tensor, computed without a host sync) with amax * 2**e < 2**exponent, kept within
    +-126 so that 2**e and 2**-e are finite normal fp32 numbers (amax near fp32's ends: then amax * 2**e misses
    the target, which only costs precision on values that far out)."""
    return (exponent - torch.frexp(amax).exponent).clamp(-126, 126)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent (an integer tensor) as fp32: exact from 2**-149 (subnormal) to 2**127, 0 below."""
    ones = torch.ones(exponent.shape, dtype=torch.float64, device=exponent.device)
    return torch.ldexp(ones, exponent.clamp(max=127)).float()


def _power_of_two_below(amax: torch.Tensor, exponent: int) -> torch.Tensor:
    """2**_exponent_below(amax, exponent) as fp32."""
    return _power_of_two(_exponent_below(amax, exponent))


@dataclass
class ForwardOperands:
    """What the forward reads besides q and k (kernels/fused.py, _fwd_kernel): VX, VK where it computes E, and for
    fp32 inputs read as fp16 copies (`forward_operands`) the inverse scales (value, keys) of those copies."""
    vx: torch.Tensor
    vk: torch.Tensor | None
    scales: torch.Tensor | None


def forward_operands(key: torch.Tensor, value: torch.Tensor, with_e: bool) -> ForwardOperands:
    """The forward's operands. fp32 inputs at TF32 (dot precision "tf32"), and at 3xTF32 when the forward computes
    E, take P in fp16 (TF32: rounded, whose 10 mantissa bits are TF32's; 3xTF32: as a hi / lo pair) in every
    product but the scores, so that P @ VX and E's products are 16-bit tensor-core products (docs/kernels.md, "dq
    from the forward pass"): VX then holds the value as fp16 hi / lo and VK v k and the keys in fp16, each scaled
    by a power of two (exact) that keeps them in fp16's range: the value to below 1, the keys to below 2**15, v k by
    both (so below 2**15 too, whatever the value's magnitude). The 3xTF32 evaluation forward keeps fp32 VX (exact
    row reductions)."""
    if key.dtype != torch.float32 or (dot_precision(key.dtype) == "tf32x3" and not with_e):
        return ForwardOperands(value_operand(value), value_key(key, value) if with_e else None, None)
    value_scale = _power_of_two_below(value.detach().abs().amax().float(), 0)
    scaled_value = value * value_scale
    inverse = [1.0 / value_scale]
    vk = None
    if with_e:
        key_scale = _power_of_two_below(key.detach().abs().amax(), 15)
        vk, inverse = value_key(key, scaled_value, key_scale), inverse + [1.0 / key_scale]
    return ForwardOperands(value_operand(scaled_value, torch.float16), vk, torch.stack(inverse))


def grad_operands(grad_o: torch.Tensor, o: torch.Tensor, drop_scale: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """DOD (B, H, Nq, DV) in `dtype`: [dO' hi, dO' lo, -Delta hi, -Delta lo, 0...] with dO' = dO / (1 - p)
    and Delta = dO . o per row, so that DOD VX^T = dP - Delta; and -Delta (B, H, Nq) in fp32."""
    batch, heads, n_query, channels = grad_o.shape
    grad_o = grad_o.float()
    neg_delta = -(grad_o * o).sum(-1)
    do_hi, do_lo = _split(grad_o * drop_scale, dtype)
    nd_hi, nd_lo = _split(neg_delta, dtype)
    dod = torch.zeros((batch, heads, n_query, operand_width(channels)), dtype=dtype, device=grad_o.device)
    dod[..., :channels] = do_hi
    dod[..., channels:2 * channels] = do_lo
    dod[..., 2 * channels] = nd_hi
    dod[..., 2 * channels + 1] = nd_lo
    return dod, neg_delta


@dataclass
class BackwardOperands:
    """What a backward kernel reads besides the lse and the seed (kernels/fused.py): VX, DOD and -Delta, and where
    the dk/dv kernel takes fp16 copies (`backward_operands`) q's copy, k's at 3xTF32, and the inverse scales; where it
    takes dk in rank-one form, dk's per-query factors and their inverse scale (`dk_factors`)."""
    vx: torch.Tensor
    dod: torch.Tensor
    neg_delta: torch.Tensor
    query16: torch.Tensor | None = None  # TF32: q rounded to fp16; 3xTF32: q's [hi, lo] pair, read in place of q
    key16: torch.Tensor | None = None  # 3xTF32: k's [hi, lo] pair, read in place of k
    scales: torch.Tensor | None = None
    dk_factors: torch.Tensor | None = None  # rank-one dk (`dk_factors`)


def dk_factors(query: torch.Tensor, grad_o: torch.Tensor, neg_delta: torch.Tensor,
               drop_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DKF (B, H, Nq, 4D) in the query's (16-bit) dtype: [dO' q, -Delta q] per query row and head as [hi, lo] pairs
    (`_split`), the per-query factors of dk's rank-one form for a one-channel value (docs/kernels.md, "dk/dv in
    rank-one form"): dk_j = scale (v_j sum_i P~_ij dO'_i q_i + sum_i P_ij (-Delta_i) q_i). A single rounding of
    either would not cancel where the two sums nearly do. Both are multiplied by a power of two (exact, computed on
    the device) that puts their largest magnitude just below 2**15, so that products of an fp16 range's dO' and q
    neither overflow nor lose bits below fp16's normal numbers; returned with its inverse (1,) fp32. neg_delta:
    -Delta (B, H, Nq) fp32, as `grad_operands` gives it."""
    q = query.float().transpose(1, 2)
    grad_o = grad_o.float()
    kept, every = grad_o * drop_scale * q, neg_delta[..., None] * q
    factor_scale = _power_of_two_below(torch.maximum(kept.abs().amax(), every.abs().amax()), 15)
    parts = (*_split(kept * factor_scale, query.dtype), *_split(every * factor_scale, query.dtype))
    batch, heads, n_query, head_dim = q.shape
    return torch.cat(parts, dim=3, out=torch.empty((batch, heads, n_query, 4 * head_dim), dtype=query.dtype,
                                                   device=query.device)), (1.0 / factor_scale).reshape(1)


def copies_in_dkdv(dtype: torch.dtype) -> bool:
    """Whether the dk/dv kernel takes dv and dk as 16-bit products of scaled fp16 copies: fp32 inputs."""
    return dtype == torch.float32


def backward_operands(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grad_o: torch.Tensor,
                      o: torch.Tensor, drop_scale: float, copies: bool, rank_one: bool = False) -> BackwardOperands:
    """VX, DOD and -Delta (`value_operand`, `grad_operands`), and with `rank_one` (16-bit inputs, C = 1,
    kernels.configs.rank_one_dkdv) dk's per-query factors (`dk_factors`). With `copies` (the dk/dv kernel for fp32
    inputs, `copies_in_dkdv`) the dk/dv kernel takes dv and dk as 16-bit products, which read their transposed operands
    from shared memory (docs/kernels.md, "3xTF32 dk/dv from fp16 pairs"): at 3xTF32 it reads q's and k's fp16
    [hi, lo] pairs (B, N, H, 2D) instead of q and k, at TF32 q rounded to fp16 besides q, and DOD's dO' hi / lo
    columns as fp16. Each is scaled by a power of two (exact) into fp16's range: q and k to below 2**15; the
    value to below 1 and dO by g, so that DOD VX^T = dP - Delta carries both scales and dS = P (dO' v - Delta), at
    most C max|dO'| max|v| + max|Delta| (bounds in float64), and dO' stay below 2**15. SCALES = [1 / g, dk's
    1 / (g value's scale q's) as three powers of two of about equal exponents (the kernel applies them one at a
    time: the product, or any one scale first, may leave fp32's range), 1 / (q's k's)], each an exact power of two
    formed from integer exponents."""
    dtype = query.dtype
    if copies and rank_one:
        raise ValueError("the rank-one dk/dv form takes 16-bit inputs, not fp16 copies of fp32 ones")
    if rank_one:
        dod, neg_delta = grad_operands(grad_o, o, drop_scale, dtype)
        factors, inverse = dk_factors(query, grad_o, neg_delta, drop_scale)
        return BackwardOperands(value_operand(value), dod, neg_delta, scales=inverse, dk_factors=factors)
    if not copies:
        return BackwardOperands(value_operand(value), *grad_operands(grad_o, o, drop_scale, dtype))
    value_max = value.detach().abs().amax().double()
    value_exp = _exponent_below(value_max, 0)
    query_exp = _exponent_below(query.detach().abs().amax(), 15)
    grad_max = grad_o.abs().amax().double() * drop_scale
    delta_max = (grad_o.float() * o).sum(-1).abs().amax().double()
    ds_bound = torch.ldexp(grad_max * value.shape[2] * value_max + delta_max, value_exp)
    grad_exp = _exponent_below(torch.maximum(ds_bound, grad_max), 15)
    value_scale, grad_scale, query_scale = _power_of_two(value_exp), _power_of_two(grad_exp), _power_of_two(query_exp)
    if dot_precision(dtype) == "tf32x3":
        key_exp = _exponent_below(key.detach().abs().amax(), 15)
        query16, key16 = _scaled_pairs((query,), query_scale), _scaled_pairs((key,), _power_of_two(key_exp))
    else:  # the scores are TF32 products of q and k themselves: no key copy, SCALES[4] unused
        key_exp = torch.zeros_like(query_exp)
        query16, key16 = (query * query_scale).half().contiguous(), None
    dk_exp = grad_exp + value_exp + query_exp
    dk_thirds = [dk_exp // 3, (dk_exp - dk_exp // 3) // 2]
    dk_thirds.append(dk_exp - dk_thirds[0] - dk_thirds[1])
    return BackwardOperands(value_operand(value * value_scale),
                            *grad_operands(grad_o * grad_scale, o * value_scale, drop_scale, dtype), query16, key16,
                            _power_of_two(-torch.stack([grad_exp, *dk_thirds, query_exp + key_exp])))


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str
    grid: Callable[[dict[str, Any]], tuple[int, ...]]
    args: tuple[Any, ...]
    constexprs: dict[str, Any]
    group: str  # its GPU_CONFIGS group, of the inputs it was built for (fp32: with the dot precision of then)

    @property
    def head_dim(self) -> int:
        return self.constexprs["HEAD_DIM"]


def fwd_launch(query: torch.Tensor, key: torch.Tensor, operands: ForwardOperands, o: torch.Tensor,
               lse2: torch.Tensor, e: torch.Tensor | None, seed: torch.Tensor, dropout_p: float,
               scale: float, arch: str) -> Launch:
    """The forward on `arch` (a kernels.configs.ARCHS class); with `e` (B, H, Nq, D) fp32 (and operands.vk) it also
    writes E, dq's factor."""
    batch, n_query, heads, head_dim = query.shape
    bits, threshold, p_eff = dropout_params(dropout_p)
    vx, vk = operands.vx, operands.vk
    vk_strides = vk.stride()[:3] if vk is not None else (0, 0, 0)
    operands_fp16 = vx.dtype == torch.float16  # P~'s products take fp16 operands
    return Launch("fwd", lambda meta: (triton.cdiv(n_query, meta["BLOCK_M"]), batch * heads),
                  (query, key, vx, key if vk is None else vk, o, lse2, lse2 if e is None else e,
                   lse2 if operands.scales is None else operands.scales, seed,
                   *query.stride(), *key.stride(), vx.stride(0), vx.stride(1), *vk_strides, heads, n_query,
                   key.shape[1], scale * LOG2E, threshold, 1.0 / (1.0 - p_eff), 0.0),
                  dict(HEAD_DIM=head_dim, C=o.shape[3], DV=vx.shape[2], DROP_BITS=bits,
                       DOT_PRECISION=dot_precision(query.dtype), DQ_IN_FWD=e is not None,
                       KEEP_AS_SCALE=drops_by_multiplier(arch, operands_fp16, bits),
                       RESCALE_PER_STEP=rescale_per_step(arch, input_group(query.dtype), operands_fp16, head_dim,
                                                         bits)),
                  input_group(query.dtype))


def dkdv_launch(query: torch.Tensor, key: torch.Tensor, operands: BackwardOperands, lse2: torch.Tensor,
                dk: torch.Tensor, dv_heads: torch.Tensor, seed: torch.Tensor, dropout_p: float, scale: float) -> Launch:
    batch, n_query, heads, head_dim = query.shape
    n_key = key.shape[1]
    bits, threshold, _ = dropout_params(dropout_p)
    precision, group = dot_precision(query.dtype), input_group(query.dtype)
    q16 = query if operands.query16 is None else operands.query16
    if operands.key16 is not None:  # 3xTF32: the kernel reads the pairs in place of q and k
        query, key = operands.query16, operands.key16
    # A program owns KEY_TILES key sub-tiles of BLOCK_N keys.
    return Launch("bwd_dkdv", lambda meta: (triton.cdiv(n_key, meta["BLOCK_N"] * meta["KEY_TILES"]), batch * heads,
                                            head_dim // meta["D_SPLIT"]),
                  (query, key, operands.vx, operands.dod, lse2, operands.neg_delta, dk, dv_heads, seed,
                   lse2 if operands.scales is None else operands.scales, q16, *query.stride(), *q16.stride()[:3],
                   *key.stride(), operands.vx.stride(0), operands.vx.stride(1), *dk.stride(), heads, n_query, n_key,
                   scale * LOG2E, scale, threshold, 0.0,
                   lse2 if operands.dk_factors is None else operands.dk_factors),
                  dict(HEAD_DIM=head_dim, C=dv_heads.shape[3], DV=operands.vx.shape[2], DVW=dv_width(dv_heads.shape[3]),
                       DROP_BITS=bits, DOT_PRECISION=precision, RANK_ONE=operands.dk_factors is not None), group)


def dq_launch(query: torch.Tensor, key: torch.Tensor, operands: BackwardOperands, lse2: torch.Tensor,
              dq: torch.Tensor, seed: torch.Tensor, channels: int, dropout_p: float, scale: float) -> Launch:
    batch, n_query, heads, head_dim = query.shape
    vx, dod, neg_delta = operands.vx, operands.dod, operands.neg_delta
    bits, threshold, _ = dropout_params(dropout_p)
    precision = dot_precision(query.dtype)
    return Launch("bwd_dq", lambda meta: (triton.cdiv(n_query, meta["BLOCK_M"]), batch * heads,
                                          head_dim // meta["D_SPLIT"]),
                  (query, key, vx, dod, lse2, neg_delta, dq, seed, *query.stride(), *key.stride(), vx.stride(0),
                   vx.stride(1), *dq.stride(), heads, n_query, key.shape[1], scale * LOG2E, scale, threshold, 0.0),
                  dict(HEAD_DIM=head_dim, C=channels, DV=vx.shape[2], DROP_BITS=bits,
                       DOT_PRECISION=precision, SHARE_CALLS=fused.shares_calls("bwd_dq", precision)),
                  input_group(query.dtype))


class KernelResourceError(RuntimeError):
    """A fused-kernel launch the GPU cannot run (shared memory, tensor memory, registers, threads); the message
    names the kernel, the configuration and the device."""


@dataclass(frozen=True)
class DeviceLimits:
    arch: str  # the kernels.configs.ARCHS class whose table the device gets
    shared_bytes: int  # shared memory one block may use (the opt-in limit)
    description: str  # for messages: name, compute capability, shared memory


def device_limits(device: torch.device) -> DeviceLimits:
    """What the configuration choice reads of a CUDA device: its capability and its real shared-memory limit."""
    props = torch.cuda.get_device_properties(device)
    shared = props.shared_memory_per_block_optin
    return DeviceLimits(arch_for_capability(props.major, props.minor), shared,
                        f"{props.name} (compute capability {props.major}.{props.minor}, {shared} B shared memory per "
                        "block)")


def device_arch(device: torch.device) -> str:
    """The ARCHS class whose choices apply on `device`: its compute capability's on a GPU; BASE_ARCH under the
    interpreter and for fake CUDA tensors traced without a GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return BASE_ARCH
    return arch_for_capability(*torch.cuda.get_device_capability(device))


def describe_config(kernel: str, meta: dict[str, Any]) -> str:
    """The block sizes and launch options of a configuration, as `BLOCK_M=128 ... num_stages=3`."""
    return " ".join(f"{field}={meta[field]}" for field in CONFIG_FIELDS[kernel] if field in meta)


def _launch_name(launch: Launch) -> str:
    return (f"kernel {launch.kernel} ({launch.group}, HEAD_DIM={launch.head_dim}, "
            f"DROP_BITS={launch.constexprs['DROP_BITS']})")


_AUTOTUNED: dict[tuple[str, str, int, int, str, int], Any] = {}
_WARNED_OF_TRITON: set[str] = set()


def _warn_once_of_other_triton(arch: str) -> None:
    """configs.other_triton_warning as a warning, once per architecture class."""
    message = other_triton_warning(triton.__version__, arch)
    if message and arch not in _WARNED_OF_TRITON:
        _WARNED_OF_TRITON.add(arch)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _autotuned(launch: Launch, limits: DeviceLimits) -> Any:
    """triton.autotune over the launch's candidate configs for the device's architecture class that fit its
    shared memory (kernels/configs.py), built once per list."""
    bits = launch.constexprs["DROP_BITS"]
    key = (launch.kernel, launch.group, launch.head_dim, bits, limits.arch, limits.shared_bytes)
    if key not in _AUTOTUNED:
        _warn_once_of_other_triton(limits.arch)
        entries = fitting_candidates(launch.kernel, launch.group, launch.head_dim, bits, limits.arch,
                                     limits.shared_bytes)
        if not entries:
            tried = "; ".join(describe_config(launch.kernel, dict(zip(CONFIG_FIELDS[launch.kernel], e)))
                              for e in candidates(launch.kernel, launch.group, launch.head_dim, bits, limits.arch))
            why = unsupported_reason(launch.kernel, launch.group, launch.head_dim, bits, limits.arch)
            raise KernelResourceError(f"{_launch_name(launch)}: no configuration of the {limits.arch} table "
                                      f"({tried or 'measured: ' + str(why)}) fits {limits.description}; "
                                      f"use impl='sdpa' on this GPU")
        configs = [triton.Config(meta, num_warps=warps, num_stages=stages)
                   for meta, warps, stages in (split_config(launch.kernel, e) for e in entries)]
        _AUTOTUNED[key] = triton.autotune(configs=configs, key=AUTOTUNE_KEY)(KERNELS[launch.kernel])
    return _AUTOTUNED[key]


def run_interpreted(launch: Launch, meta: dict[str, int] | None = None) -> None:
    """Run under the interpreter with the constexprs `meta` of a configuration (`split_config`'s first item), by
    default the small interpreter configuration; the tests run every shipped configuration this way."""
    meta = interpreter_meta(launch.kernel, launch.head_dim) if meta is None else meta
    KERNELS[launch.kernel][launch.grid(meta)](*launch.args, **launch.constexprs, **meta)


def run(launch: Launch) -> None:
    """Launch on the GPU through the autotuner, or under the interpreter with its fixed block sizes. A launch the
    GPU refuses for resources raises KernelResourceError naming the kernel, the configuration and the device."""
    if is_interpreted():
        run_interpreted(launch)
    else:
        device = launch.args[0].device
        with torch.cuda.device(device):
            limits = device_limits(device)
            tuned = _autotuned(launch, limits)
            try:
                tuned[launch.grid](*launch.args, **launch.constexprs)
            except OutOfResources as exc:
                config = tuned.best_config
                meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                raise KernelResourceError(
                    f"{_launch_name(launch)} with {describe_config(launch.kernel, meta)} cannot run on "
                    f"{limits.description}: it needs {exc.required} of {exc.name}, the limit is {exc.limit}. The "
                    f"{limits.arch} table did not foresee this GPU; use impl='sdpa' on it, and see docs/kernels.md, "
                    "\"Architectures\"") from None


def fused_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seed: torch.Tensor, dropout_p: float,
              scale: float, for_grad: bool,
              runner: Callable[[Launch], None] = run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `attention_fwd` computes, each launch made by `runner` (a test's runner forces a configuration)."""
    check_triton_device(query.device)
    batch, n_query, heads, _ = query.shape
    o = torch.empty((batch, heads, n_query, value.shape[2]), dtype=torch.float32, device=query.device)
    lse2 = torch.empty((batch, heads, n_query), dtype=torch.float32, device=query.device)
    e = torch.empty(_e_shape(query, value, for_grad), dtype=torch.float32, device=query.device)
    operands = forward_operands(key, value, e.numel() > 0)
    runner(fwd_launch(query, key, operands, o, lse2, e if e.numel() else None, seed, dropout_p, scale,
                      device_arch(query.device)))
    return o, lse2, e


def _e_shape(query: torch.Tensor, value: torch.Tensor, for_grad: bool) -> tuple[int, ...]:
    """E's shape: (B, H, Nq, D) when a backward follows and dq comes from the forward, else (0,)."""
    batch, n_query, heads, head_dim = query.shape
    with_e = for_grad and dq_in_forward(input_group(query.dtype), value.shape[2], head_dim, device_arch(query.device))
    return (batch, heads, n_query, head_dim) if with_e else (0,)


def fused_bwd(grad_o: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, o: torch.Tensor,
              lse2: torch.Tensor, e: torch.Tensor, seed: torch.Tensor, dropout_p: float, scale: float,
              runner: Callable[[Launch], None] = run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `attention_bwd` computes, each launch made by `runner`."""
    check_triton_device(query.device)
    batch, n_query, heads, head_dim = query.shape
    n_key, channels = key.shape[1], value.shape[2]
    bits, _, p_eff = dropout_params(dropout_p)
    drop_scale = 1.0 / (1.0 - p_eff)
    copies = copies_in_dkdv(query.dtype)
    rank_one = rank_one_dkdv(device_arch(query.device), input_group(query.dtype), channels, head_dim, bits)
    operands = backward_operands(query, key, value, grad_o, o, drop_scale, copies, rank_one)
    dq, dk = query.new_empty(query.shape), key.new_empty(key.shape)  # contiguous, whatever the inputs' strides
    dv_heads = torch.empty((batch, heads, n_key, channels), dtype=torch.float32, device=query.device)
    runner(dkdv_launch(query, key, operands, lse2, dk, dv_heads, seed, dropout_p, scale))
    if e.numel():  # dq_i = scale * dO_i E_i (C = 1): elementwise, no pass over the keys
        dq.copy_((grad_o.float() * (e * scale)).transpose(1, 2))
    else:
        if copies:  # the dq kernel reads them unscaled
            operands = backward_operands(query, key, value, grad_o, o, drop_scale, False)
        runner(dq_launch(query, key, operands, lse2, dq, seed, channels, dropout_p, scale))
    return dq, dk, dv_heads.sum(1).to(value.dtype)  # deterministic head sum of dv (no atomics)


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake implementations and autograd)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dcama::attention_fwd", mutates_args=())
def attention_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seed: torch.Tensor,
                  dropout_p: float, scale: float, for_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head output o (B, H, Nq, C) fp32, the base-2 log-sum-exp of the log2-scaled scores (B, H, Nq) fp32,
    and E (B, H, Nq, D) fp32 when `for_grad` and `dq_in_forward`, else an empty tensor; value is (B, Nk, C)."""
    return fused_fwd(query, key, value, seed, dropout_p, scale, for_grad)


@attention_fwd.register_fake
def _attention_fwd_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seed: torch.Tensor,
                        dropout_p: float, scale: float,
                        for_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_query, heads, _ = query.shape
    o = query.new_empty((batch, heads, n_query, value.shape[2]), dtype=torch.float32)
    return o, query.new_empty((batch, heads, n_query), dtype=torch.float32), \
        query.new_empty(_e_shape(query, value, for_grad), dtype=torch.float32)


@torch.library.custom_op("dcama::attention_bwd", mutates_args=())
def attention_bwd(grad_o: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  o: torch.Tensor, lse2: torch.Tensor, e: torch.Tensor, seed: torch.Tensor, dropout_p: float,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the per-head output gradient grad_o (B, H, Nq, C)."""
    return fused_bwd(grad_o, query, key, value, o, lse2, e, seed, dropout_p, scale)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_o: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        o: torch.Tensor, lse2: torch.Tensor, e: torch.Tensor, seed: torch.Tensor, dropout_p: float,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _fwd_setup_context(ctx: Any, inputs: tuple[Any, ...],
                       output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    query, key, value, seed, dropout_p, scale, _ = inputs
    o, lse2, e = output
    ctx.mark_non_differentiable(lse2, e)
    # Everything the backward needs: O(B*H*Nq*(C + D)) besides the inputs; P is recomputed.
    ctx.save_for_backward(query, key, value, o, lse2, e, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _fwd_backward(ctx: Any, grad_o: torch.Tensor, grad_lse: torch.Tensor, grad_e: torch.Tensor) -> tuple[Any, ...]:
    query, key, value, o, lse2, e, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_o, query, key, value, o, lse2, e, seed, ctx.dropout_p, ctx.scale)
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# A custom op (with a fake implementation) so that impl="naive" with dropout traces under torch.compile
# and FakeTensor/meta modes like the fused op does.
@torch.library.custom_op("dcama::keep_mask", mutates_args=())
def keep_mask(seed: torch.Tensor, batch: int, heads: int, n_query: int, n_key: int,
              dropout_p: float) -> torch.Tensor:
    """The kernels' keep decisions, bool (batch, heads, n_query, n_key)."""
    bits, threshold, _ = dropout_params(dropout_p)
    if bits == 0:
        return torch.ones((batch, heads, n_query, n_key), dtype=torch.bool, device=seed.device)
    check_triton_device(seed.device)
    out = torch.empty((batch, heads, n_query, n_key), dtype=torch.uint8, device=seed.device)
    meta = dict(KEEP_MASK_CONFIG)
    grid = (triton.cdiv(n_query, meta["BLOCK_M"]), triton.cdiv(n_key, meta["BLOCK_N"]), batch * heads)
    with torch.device(seed.device) if is_interpreted() else torch.cuda.device(seed.device):
        fused._keep_mask_kernel[grid](seed, out, n_query, n_key, threshold, DROP_BITS=bits, **meta)
    return out.view(torch.bool)


@keep_mask.register_fake
def _keep_mask_fake(seed: torch.Tensor, batch: int, heads: int, n_query: int, n_key: int,
                    dropout_p: float) -> torch.Tensor:
    return seed.new_empty((batch, heads, n_query, n_key), dtype=torch.bool)
