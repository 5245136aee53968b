"""The kernel configurations the fused op can launch, as triton.compile inputs (see bench/kernel_report.py)."""

from kernels.attention import kernel_compile_specs

__all__ = ["kernel_compile_specs"]
