"""Fused Triton kernels for DCAMA attention. Layers, one concern each (docs/kernels.md):
kernels/fused.py (the Triton kernels), kernels/configs.py (block sizes), kernels/ops.py (operands,
launches, custom ops with fakes and autograd), kernels/naive.py (the torch paths), kernels/attention.py
(the public op and its validation), kernels/reference.py (the float64 reference of the tests)."""

from kernels.attention import IMPLS, dcama_attention, dropout_keep_mask
from kernels.ops import effective_dropout_p

__all__ = ["IMPLS", "dcama_attention", "dropout_keep_mask", "effective_dropout_p"]
