"""Fused Triton kernels for DCAMA attention (see kernels/attention.py)."""

from kernels.attention import dcama_attention, dropout_keep_mask, effective_dropout_p
from kernels.attention import IMPLS  # noqa: F401  the attention implementations, the one list (dcama.config re-exports it)

__all__ = ["dcama_attention", "dropout_keep_mask", "effective_dropout_p"]
