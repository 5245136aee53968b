"""DCAMA few-shot segmentation on fused Triton attention kernels."""

__all__ = ["DCAMA"]


def __getattr__(name: str):
    # Lazy so that `import dcama.data` or `dcama.metrics` does not import timm and the model.
    if name == "DCAMA":
        from dcama.model import DCAMA

        return DCAMA
    raise AttributeError(f"module 'dcama' has no attribute {name!r}")
