"""Pieces shared by the benches: DCAMA's attention shapes, the cost model and the assumed device peaks,
counting the bytes autograd saves, fake (shape-only) tensors and tables."""

from __future__ import annotations

import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the benches run as scripts: make `kernels` and `dcama` importable
    sys.path.insert(0, str(REPO_ROOT))

from dcama.backbones import BACKBONES, STAGE_STRIDES  # noqa: E402  (needs the path above)
from dcama.config import PUBLISHED_BATCH, PUBLISHED_IMG_SIZE  # noqa: E402
from dcama.model import NUM_HEADS  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# Assumed device peaks. Floors are computed against these constants, NOT against the machine that runs the
# bench: every output names this device so that nobody mistakes them for measured figures.
@dataclass(frozen=True)
class DevicePeaks:
    name: str
    tensor_flops: dict[str, float]  # dense tensor-core FLOP/s per input dtype (fp32 inputs run as TF32)
    exp_per_s: float  # MUFU.EX2 throughput, exponentials per second
    hbm_bytes_per_s: float


H100_SXM = DevicePeaks(
    name="H100 SXM (assumed peaks)",
    tensor_flops={"fp32": 494.7e12, "bf16": 989.4e12},
    exp_per_s=3.9e12,
    hbm_bytes_per_s=3.35e12,
)


def describe_peaks(peaks: DevicePeaks = H100_SXM) -> str:
    flops = ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in peaks.tensor_flops.items())
    return (f"floors use the {peaks.name}: dense tensor cores {flops} (fp32 as TF32); "
            f"{peaks.exp_per_s:.2g} exp/s (MUFU.EX2); HBM {peaks.hbm_bytes_per_s / 1e12:.2f} TB/s")


# ----------------------------------------------------------------------------------------------------------
# DCAMA's attention shapes (docs/model.md), all taken from the model: the published image side and batch, the
# published backbones' blocks and channels per stage, 8 heads, dropout 0.5. Attention runs on stages 2-4;
# every block of a stage is one attention layer, and the L layers of a stage are stacked in the op's head
# axis (L x 8 heads) with one mask per episode shared by all heads, as `dcama.model.stage_attention` runs them.
IMAGE_SIZE = PUBLISHED_IMG_SIZE
BATCH = PUBLISHED_BATCH
PUBLISHED_BACKBONES = tuple(name for name, spec in BACKBONES.items() if spec.published)
ATTENTION_STAGES = (2, 3, 4)  # backbone stages (1-based) that get attention; stage 1 feeds skips only
STAGES = tuple(f"1/{STAGE_STRIDES[s - 1]}" for s in ATTENTION_STAGES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class AttentionShape:
    """One op call of the model: batch episodes, heads = layers x 8 (the stage's layers stacked), the value
    one mask per episode (B, Nk) shared by every head."""

    backbone: str
    stage: str
    shots: int
    layers: int
    batch: int
    heads: int  # layers x 8
    n_query: int
    n_key: int  # shots * n_query: the K shots' tokens are concatenated
    head_dim: int  # C / 8
    value_channels: int = 1

    @property
    def scores(self) -> int:
        return self.batch * self.heads * self.n_query * self.n_key


def attention_shape(backbone: str, stage: str, shots: int, batch: int = BATCH) -> AttentionShape:
    spec_stage = ATTENTION_STAGES[STAGES.index(stage)] - 1  # 0-based index into the backbone's stages
    spec = BACKBONES[backbone]
    layers, channels = spec.depths[spec_stage], spec.channels[spec_stage]
    side = IMAGE_SIZE // STAGE_STRIDES[spec_stage]
    return AttentionShape(backbone=backbone, stage=stage, shots=shots, layers=layers, batch=batch,
                          heads=NUM_HEADS * layers, n_query=side * side, n_key=shots * side * side,
                          head_dim=channels // NUM_HEADS)


# ----------------------------------------------------------------------------------------------------------
# Cost model of the fused op per pass (docs/performance.md). It is the minimal work of an implementation that
# keeps O(B*H*Nq) memory: the backward recomputes the scores, so each pass has one exp per score. The same
# count is used for every implementation, so TFLOP/s and the floor shares compare like with like.
def attention_cost(shape: AttentionShape, dtype: str, pass_: str) -> dict[str, float]:
    n, d, c = shape.scores, shape.head_dim, shape.value_channels
    elt = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    b, h, nq, nk = shape.batch, shape.heads, shape.n_query, shape.n_key
    q_bytes, k_bytes = elt * b * nq * h * d, elt * b * nk * h * d
    # One mask per episode, read by every head; the output is each layer's head mean (B, L, Nq).
    v_bytes, o_bytes, lse_bytes = elt * b * nk * c, elt * b * shape.layers * nq * c, 4 * b * h * nq
    fwd = {"tc_flops": 2.0 * d * n,  # S = Q K^T
           "other_flops": 2.0 * c * n,  # the value side is a row reduction (C = 1), not a matmul
           "exps": float(n),
           "bytes": float(q_bytes + k_bytes + v_bytes + o_bytes + lse_bytes)}
    bwd = {"tc_flops": 6.0 * d * n,  # recompute S, dQ = dS K, dK = dS^T Q
           "other_flops": 4.0 * c * n,  # dP = dO . v and dv
           "exps": float(n),  # P recomputed from S and the saved lse
           # read q, k, v, dO, out, lse; write dq, dk, dv
           "bytes": float(2 * (q_bytes + k_bytes + v_bytes) + 2 * o_bytes + lse_bytes)}
    parts = {"fwd": [fwd], "bwd": [bwd], "fwd+bwd": [fwd, bwd]}[pass_]
    cost = {key: sum(p[key] for p in parts) for key in fwd}
    cost["flops"] = cost["tc_flops"] + cost["other_flops"]
    return cost


def floors_ms(cost: dict[str, float], dtype: str, peaks: DevicePeaks = H100_SXM) -> dict[str, float]:
    tc = 1e3 * cost["tc_flops"] / peaks.tensor_flops[dtype]
    exp = 1e3 * cost["exps"] / peaks.exp_per_s
    mem = 1e3 * cost["bytes"] / peaks.hbm_bytes_per_s
    return {"floor_tc_ms": tc, "floor_exp_ms": exp, "floor_mem_ms": mem, "floor_ms": max(tc, exp, mem)}


# ----------------------------------------------------------------------------------------------------------
# Activation memory: bytes of the distinct storages autograd saves for backward.
class SavedTensorBytes:
    """Inside the block, record every tensor autograd saves; `nbytes` counts each storage once (a tensor
    saved twice, or several views of one buffer, count once). Storages of `exclude` (e.g. parameters,
    which exist anyway) are not counted."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage()._cdata for t in exclude}
        self._saved: dict[int, torch.Tensor] = {}  # holding the tensors keeps their storage ids unique
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self._excluded:
            self._saved[key] = t
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._saved.values())

    def nbytes_excluding(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes saved besides the storages of `tensors` (e.g. the op's inputs, which exist anyway)."""
        skip = {t.untyped_storage()._cdata for t in tensors}
        return sum(t.untyped_storage().nbytes() for key, t in self._saved.items() if key not in skip)

    @property
    def count(self) -> int:
        return len(self._saved)


@contextmanager
def shape_only() -> Iterator[FakeTensorMode]:
    """Tensors created inside are fake: shapes, dtypes, strides and devices only, no memory, no compute.
    Fake "cuda" tensors work without a GPU, so the CUDA dispatch path is traced on any machine."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def short_error(exc: BaseException, limit: int = 160) -> str:
    """One line for a table cell. Dynamo wraps the real error as "... got XError('why')": show that."""
    inner = re.search(r"got (\w+(?:Error|Exception)\(.{0,300}?\))", str(exc))
    if inner:
        return short_error(RuntimeError(inner.group(1)), limit).removeprefix("RuntimeError: ")
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
def cuda_ready() -> tuple[bool, str]:
    """Whether compiled kernels can be timed here, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA device on this machine"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 is set: unset it to time compiled kernels"
    return True, ""


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_num(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], str]]]) -> str:
    """columns: (key, header, formatter)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(f(r.get(k)) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
