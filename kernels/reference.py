"""Plain PyTorch reference of DCAMA attention (the math: docs/kernels.md); run it in float64 to test kernels."""

from __future__ import annotations

import math

import torch


def dcama_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                              keep: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
                              head_reduction: str = "mean") -> torch.Tensor:
    """out = mean_h (softmax(scale * q k^T) * keep / (1 - dropout_p)) @ v, materialising everything.

    query (B, Nq, H, D), key (B, Nk, H, D), value (B, Nk) or (B, Nk, C); keep: bool (B, H, Nq, Nk) or
    None (no dropout). To reproduce the kernels pass keep=dropout_keep_mask(...) and
    dropout_p=effective_dropout_p(p). Computes in the inputs' dtype (use float64 for a reference).
    """
    if head_reduction not in ("mean", "none"):
        raise ValueError(f"head_reduction must be 'mean' or 'none', got {head_reduction!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    q = query.permute(0, 2, 1, 3)  # (B, H, Nq, D)
    k = key.permute(0, 2, 1, 3)  # (B, H, Nk, D)
    probs = torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1)  # (B, H, Nq, Nk)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    v = value.unsqueeze(-1) if value.dim() == 2 else value  # (B, Nk, C)
    out = probs @ v.unsqueeze(1).to(probs.dtype)  # (B, H, Nq, C)
    if head_reduction == "mean":
        out = out.mean(dim=1)
    return out.squeeze(-1) if value.dim() == 2 else out
