"""Fused Triton kernels for DCAMA attention (see kernels/attention.py)."""

from kernels.attention import dcama_attention, dropout_keep_mask, effective_dropout_p

__all__ = ["dcama_attention", "dropout_keep_mask", "effective_dropout_p"]
