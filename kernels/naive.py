"""The torch implementations beside the fused kernels: `naive` (the original's math, materialising P, with
the kernels' dropout decisions) and `sdpa` (PyTorch's scaled_dot_product_attention with a padded value).
Both take the validated inputs of `kernels.attention.dcama_attention` and return the per-head output
(B, H, Nq, C)."""

from __future__ import annotations

import torch

from kernels.ops import effective_dropout_p, keep_mask, seed_tensor


def naive_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, scale: float,
                    seed: int | None) -> torch.Tensor:
    """Materialise P (B, H, Nq, Nk), drop with the kernels' keep mask, P @ v."""
    batch, n_query, heads, _ = query.shape
    probs = (torch.einsum("bihd,bjhd->bhij", query, key) * scale).softmax(dim=-1)
    if dropout_p > 0.0:
        keep = keep_mask(seed_tensor(seed, query.device), batch, heads, n_query, key.shape[1], dropout_p)
        probs = probs * keep / (1.0 - effective_dropout_p(dropout_p))
    return probs @ value.unsqueeze(1)


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
                   scale: float) -> torch.Tensor:
    """PyTorch SDPA with the value zero-padded to a multiple of 8 channels and expanded over heads.

    Dropout here is SDPA's own (torch RNG), so it cannot match the kernels' keep mask.
    """
    batch, _, heads, _ = query.shape
    channels = value.shape[2]
    padded = torch.nn.functional.pad(value, (0, -channels % 8))
    v = padded.unsqueeze(1).expand(batch, heads, *padded.shape[1:])
    o = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), v,
                                                         dropout_p=dropout_p, scale=scale)
    return o[..., :channels]
