"""The public op `dcama_attention` (its docstring is the contract) and `dropout_keep_mask`: input
validation and the dispatch to the fused kernels (kernels/ops.py) or the torch paths (kernels/naive.py).
Reference: docs/kernels.md."""

from __future__ import annotations

import math
import warnings

import torch

from kernels.configs import MIN_CAPABILITY
from kernels.naive import naive_attention, sdpa_attention
from kernels.ops import attention_fwd, check_capability, keep_mask, seed_tensor

HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("auto", "triton", "naive", "sdpa")
HEAD_REDUCTIONS = ("mean", "none")
_WARNED_DEVICES: set[str] = set()  # the GPUs below MIN_CAPABILITY that impl="auto" already warned about


def _validate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, scale: float | None,
              head_reduction: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction must be one of {HEAD_REDUCTIONS}, got {head_reduction!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 4:
        raise ValueError(f"query must have rank 4 (B, Nq, H, D), got shape {tuple(query.shape)}")
    if key.dim() != 4:
        raise ValueError(f"key must have rank 4 (B, Nk, H, D), got shape {tuple(key.shape)}")
    if value.dim() not in (2, 3):
        raise ValueError(f"value must have rank 2 (B, Nk) or 3 (B, Nk, C), got shape {tuple(value.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}: all inputs must share a device")
        if t.dtype != query.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but query has {query.dtype}: all inputs must share a dtype")
    allowed = DTYPES if impl == "triton" or (impl == "auto" and query.device.type == "cuda") else \
        DTYPES + (torch.float64,)
    if query.dtype not in allowed:
        raise ValueError(f"query dtype {query.dtype} is not supported by impl={impl!r}; use one of {allowed}")
    batch, _, heads, head_dim = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[2] != heads:
        raise ValueError(f"key has {key.shape[2]} heads but query has {heads}")
    if key.shape[3] != head_dim:
        raise ValueError(f"key head dim {key.shape[3]} differs from query head dim {head_dim}")
    if value.shape[1] != key.shape[1]:
        raise ValueError(f"value has {value.shape[1]} tokens but key has Nk={key.shape[1]}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"query head dim D={head_dim} is not supported; supported: {HEAD_DIMS}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation `impl` runs as on `device`. "auto": the fused kernels on a CUDA device of compute
    capability >= MIN_CAPABILITY, else SDPA, with one warning per such GPU (SDPA's memory-efficient kernel
    never materialises P on those GPUs; its fallback materialises what impl="naive" does). "triton" on such a
    GPU raises ValueError naming the capability it needs."""
    if impl not in ("auto", "triton") or device.type != "cuda":
        return "sdpa" if impl == "auto" else impl
    if not torch.cuda.is_available():  # fake CUDA tensors traced without a GPU: no capability to read, no launch
        return "triton"
    major, minor = torch.cuda.get_device_capability(device)
    if impl == "triton" or (major, minor) >= MIN_CAPABILITY:
        check_capability(device)
        return "triton"
    name = torch.cuda.get_device_name(device)
    if name not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(name)
        warnings.warn(f"dcama_attention: {name} has compute capability {major}.{minor}, below the "
                      f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} the fused Triton kernels need (tensor-core MMA); "
                      "impl='auto' runs PyTorch SDPA there (same math; dropout from torch's RNG)", stacklevel=3)
    return "sdpa"


def dcama_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, dropout_p: float = 0.0,
                    scale: float | None = None, seed: int | None = None, head_reduction: str = "mean",
                    impl: str = "auto") -> torch.Tensor:
    """DCAMA attention-weighted mask aggregation.

    query (B, Nq, H, D) and key (B, Nk, H, D) with any strides; value (B, Nk) or (B, Nk, C) (stride 0
    allowed). Returns (B, Nq[, C]) for head_reduction="mean", (B, H, Nq[, C]) for "none", in the inputs'
    dtype. out = mean_h dropout(softmax(scale * q k^T)) @ v, scale (positive) defaulting to 1/sqrt(D).
    impl: "triton" (fused kernels), "naive" (materialises P, same dropout mask as the kernels),
    "sdpa" (PyTorch SDPA, value padded; own dropout), "auto" (triton on CUDA of compute capability >= 8.0,
    sdpa otherwise; `resolve_impl`).
    seed: int, or None to draw one from torch's generator of the inputs' device.
    Raises ValueError naming the argument for bad input (docs/kernels.md, "The op").
    """
    _validate(query, key, value, dropout_p, scale, head_reduction, impl)
    dropout_p = float(dropout_p)
    scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else float(scale)
    impl = resolve_impl(impl, query.device)
    value3 = value.unsqueeze(-1) if value.dim() == 2 else value
    if impl == "triton":
        if dropout_p > 0.0:
            seed_t = seed_tensor(seed, query.device)
        else:  # never read by the kernels; no draw so the generator state is untouched
            seed_t = torch.zeros(1, dtype=torch.int64, device=query.device)
        for_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        o, _, _ = attention_fwd(query, key, value3, seed_t, dropout_p, scale, for_grad)
    elif impl == "naive":
        o = naive_attention(query, key, value3, dropout_p, scale, seed)
    else:
        o = sdpa_attention(query, key, value3, dropout_p, scale)
    out = (o.mean(dim=1) if head_reduction == "mean" else o).to(query.dtype)
    return out.squeeze(-1) if value.dim() == 2 else out


def dropout_keep_mask(seed: int | None, batch: int, heads: int, n_query: int, n_key: int, dropout_p: float,
                      device: torch.device | str) -> torch.Tensor:
    """The kernels' keep decisions for `seed`: bool (batch, heads, n_query, n_key).

    Runs the same @triton.jit RNG helpers as the attention kernels (a CUDA device, or CPU under
    TRITON_INTERPRET=1), so reference = mean_h((softmax(S) * keep / (1 - p_eff)) @ v) reproduces the
    kernel's dropout exactly, with p_eff = effective_dropout_p(dropout_p). The counter scheme is
    documented in docs/kernels.md, "Dropout".
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    for name, size in (("batch", batch), ("heads", heads), ("n_query", n_query), ("n_key", n_key)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    device = torch.device(device)
    return keep_mask(seed_tensor(seed, device), batch, heads, n_query, n_key, float(dropout_p))
