"""Profile DCAMA's attention, called as the model calls it, against the naive path and the peer kernels.

    python bench/attention.py [--quick] [--json FILE] [--plot FILE.png] [--backbones ...] [--impls ...]

Shapes, all derived from the model (bench/common.py): for each published backbone (Swin-B, ResNet-50,
ResNet-101) and attention stage (1/8, 1/16, 1/32 of the published 384x384 image: Nq = 2304, 576, 144;
D = C/8), K = 1 and 5 shots (Nk = K*Nq), the published batch of 12 episodes, dropout 0.5 (training), fp32
(TF32 matmuls by default, see --fp32-precision) and bf16. Every row is one call of
`dcama.model.stage_attention`, the function the model's StageAttention runs: the L layers of the stage
stacked in the op's head axis (L x 8 heads), one support mask per episode shared by every head.

Implementations: "triton" (the fused op), "naive" (the original's math, materialising P), PyTorch SDPA per
backend ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math") with the one-channel value zero-padded to
what the backend needs, "flex" (FlexAttention, compiled, padded value, NO dropout: it has none) and
"xformers" (memory_efficient_attention, padded value) when installed. The peers get the same stacking
(`split_heads` / `merge_heads` of dcama.model) with their kernel in the middle.

On a GPU every row is timed (triton.testing.do_bench: CUDA events, median after warm-up) with its peak extra
memory. Everywhere, each row gets the bytes autograd saves for backward, counted with
torch.autograd.graph.saved_tensors_hooks on fake tensors at the real shapes (exact, instant, no memory), and
the FLOP / exponential / byte model with its floors on the assumed device peaks (bench/common.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from bench.common import (DTYPES, H100_SXM, PUBLISHED_BACKBONES, STAGES, AttentionShape, SavedTensorBytes,
                          attention_cost, attention_shape, cuda_ready, describe_peaks, device_name, fmt_num, floors_ms,
                          human_bytes, markdown_table, shape_only, short_error)
from dcama.files import write_json
from dcama.model import DROPOUT_P, NUM_HEADS, merge_heads, split_heads, stage_attention

IMPLS = ("triton", "naive", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex", "xformers")
PASSES = ("fwd", "fwd+bwd")
# Channels the one-channel value is zero-padded to per peer ("D": the query head dim, since flash and cuDNN
# take one head dim for q, k and v; 8: 16-byte alignment of the memory-efficient kernels; 16: the smallest
# head dim FlexAttention compiles for).
VALUE_PAD: dict[str, int | str] = {"sdpa-flash": "D", "sdpa-cudnn": "D", "sdpa-efficient": 8, "sdpa-math": 1,
                                   "flex": 16, "xformers": 8}
FP16_ONLY = {"sdpa-flash", "sdpa-cudnn"}  # these backends take fp16/bf16 only
NOTES = {"flex": "no dropout (FlexAttention has none)"}


def padded_channels(impl: str, shape: AttentionShape) -> int:
    pad = VALUE_PAD[impl]
    return shape.head_dim if pad == "D" else int(pad)


def _peer_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, channels: int) -> tuple[torch.Tensor, ...]:
    """(B,H,N,D) views of the (B,N,H,D) head-split projections, and the value zero-padded to `channels` and
    broadcast over heads (stride 0, no copy): (B,H,Nk,channels)."""
    b, _, h, _ = q.shape
    vp = F.pad(v.unsqueeze(-1), (0, channels - 1)).unsqueeze(1).expand(b, h, v.shape[1], channels)
    return q.transpose(1, 2), k.transpose(1, 2), vp


def _channel0(o: torch.Tensor) -> torch.Tensor:
    return o[..., 0]  # (B,H,Nq,c) -> the real value channel (B,H,Nq); the padding channels are zero


def _as_stage(peer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A peer kernel (q, k (B,N,H,D), v (B,Nk)) -> per-head (B,H,Nq), run on a stage's projected tokens with
    the model's stacking: fn(q (B,Nq,L,C), k (B,Nk,L,C), v (B,Nk)) -> (B,L,Nq)."""
    return lambda q, k, v: merge_heads(peer(split_heads(q, NUM_HEADS), split_heads(k, NUM_HEADS), v), NUM_HEADS)


_SDPA_ATEN = {  # called directly on fake tensors, where SDPA's backend choice would need a real GPU
    "sdpa-flash": lambda q, k, v, p: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p)[0],
    "sdpa-efficient":
        lambda q, k, v, p: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, p)[0],
    "sdpa-cudnn": lambda q, k, v, p: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, p)[0],
    "sdpa-math": lambda q, k, v, p: torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, p)[0],
}


def _sdpa_backend(impl: str) -> Any:
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}[impl]


_FLEX_COMPILED: list[Callable[..., torch.Tensor]] = []


def _flex(compiled: bool) -> Callable[..., torch.Tensor]:
    # Imported here: FlexAttention exists from torch 2.5 on (setup.py allows 2.4, where only its rows fail).
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if not _FLEX_COMPILED:  # compiled once per process: eager flex materialises the scores
        # One graph per shape and dtype; past the default limit (8) dynamo would fall back to eager silently.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _FLEX_COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX_COMPILED[0]


def make_call(impl: str, shape: AttentionShape, fake: bool,
              dropout_p: float = DROPOUT_P) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """fn(q (B,Nq,L,C), k (B,Nk,L,C) projected tokens, v (B,Nk) masks) -> (B,L,Nq) for one implementation:
    "triton" and "naive" are the model's own `stage_attention`. `fake`: the inputs will be fake tensors (SDPA
    is then called per backend directly, FlexAttention eagerly: the saved tensors are the same as compiled)."""
    if impl in ("triton", "naive"):
        return lambda q, k, v: stage_attention(q, k, v, NUM_HEADS, dropout_p, impl)
    channels = padded_channels(impl, shape)
    if impl.startswith("sdpa-"):
        if fake:
            return _as_stage(lambda q, k, v: _channel0(_SDPA_ATEN[impl](*_peer_inputs(q, k, v, channels), dropout_p)))

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([_sdpa_backend(impl)]):  # only this backend: it raises when it cannot run the case
                return _channel0(F.scaled_dot_product_attention(*_peer_inputs(q, k, v, channels), dropout_p=dropout_p))
        return _as_stage(sdpa)
    if impl == "flex":
        flex = _flex(compiled=not fake)
        return _as_stage(lambda q, k, v: _channel0(flex(*_peer_inputs(q, k, v, channels))))
    if impl == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ModuleNotFoundError("not installed")
        import xformers.ops as xops  # optional: installed separately, matched to the torch build

        def xf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            vp = _peer_inputs(q, k, v, channels)[2].transpose(1, 2)  # xformers takes (B,N,H,K) like our q, k
            return xops.memory_efficient_attention(q, k, vp, p=dropout_p)[..., 0].transpose(1, 2)
        return _as_stage(xf)
    raise ValueError(f"unknown impl {impl!r}")


def make_inputs(shape: AttentionShape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """q and k as the stage's projected tokens (B,N,L,C), leaves requiring grad (the layout of the model's
    Linear outputs); the value is one support mask per episode resized to the feature map, in [0,1], no grad
    (as in the model)."""
    b, layers, channels = shape.batch, shape.layers, shape.head_dim * NUM_HEADS
    q = torch.randn(b, shape.n_query, layers, channels, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, shape.n_key, layers, channels, device=device, dtype=dtype, requires_grad=True)
    v = torch.rand(b, shape.n_key, device=device, dtype=dtype)
    return q, k, v


def unsupported_reason(impl: str, dtype: str) -> str | None:
    """Documented limits that fake tensors cannot reveal (the real kernels check them on a GPU)."""
    if impl in FP16_ONLY and dtype == "fp32":
        return "needs fp16/bf16"
    if impl == "xformers" and importlib.util.find_spec("xformers") is None:
        return "not installed"
    return None


def _trace_saved(impl: str, shape: AttentionShape, dtype: str, dropout_p: float) -> tuple[int, int]:
    """(all saved bytes, saved bytes besides the inputs q, k, v)."""
    with shape_only():
        q, k, v = make_inputs(shape, DTYPES[dtype], "cuda")
        with SavedTensorBytes() as saved:
            make_call(impl, shape, fake=True, dropout_p=dropout_p)(q, k, v)
        return saved.nbytes, saved.nbytes_excluding([q, k, v])


def count_saved(impl: str, shape: AttentionShape, dtype: str) -> tuple[tuple[int, int] | None, bool, str]:
    """Bytes of the distinct storages autograd saves in the forward, traced with fake CUDA tensors (exact,
    instant, any machine): ((all, besides the inputs) or None, exact, note)."""
    reason = unsupported_reason(impl, dtype)
    if reason:
        return None, False, reason
    try:
        with warnings.catch_warnings():  # eager FlexAttention warns that it is not compiled: known, traced only
            warnings.simplefilter("ignore")
            return _trace_saved(impl, shape, dtype, DROPOUT_P), True, ""
    except Exception as exc:  # a peer that cannot be traced shows why, the run goes on
        error = short_error(exc)
    return None, False, f"not countable on fake tensors: {error}"


def time_row(impl: str, shape: AttentionShape, dtype: str, pass_: str) -> dict[str, Any]:
    """GPU timing (median ms of triton.testing.do_bench) and peak extra memory of one row."""
    fn = make_call(impl, shape, fake=False)
    q, k, v = make_inputs(shape, DTYPES[dtype], "cuda")
    grad = torch.randn(shape.batch, shape.layers, shape.n_query, device="cuda", dtype=DTYPES[dtype])

    def run() -> None:
        out = fn(q, k, v)
        if pass_ == "fwd+bwd":
            out.backward(grad)

    run()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(run, warmup=25, rep=100, grad_to_none=[q, k], return_mode="median")
    return {"time_ms": float(ms), "peak_bytes": int(peak)}


def bench_rows(backbones: list[str], stages: list[str], shots: list[int], dtypes: list[str], impls: list[str],
               passes: list[str], timed: bool) -> list[dict[str, Any]]:
    records = []
    dev = device_name() if timed else "cpu (not timed)"
    for backbone in backbones:
        for stage in stages:
            for k_shots in shots:
                shape = attention_shape(backbone, stage, k_shots)
                for dtype in dtypes:
                    saved = {impl: count_saved(impl, shape, dtype) for impl in impls}
                    for pass_ in passes:
                        cost = attention_cost(shape, dtype, pass_)
                        floors = floors_ms(cost, dtype)
                        for impl in impls:
                            counted, exact, note = saved[impl]
                            saved_bytes, saved_extra = counted if counted else (None, None)
                            row = {"impl": impl, "backbone": backbone, "stage": stage, "shots": k_shots,
                                   "batch": shape.batch, "dtype": dtype, "pass": pass_, "time_ms": None,
                                   "saved_bytes": saved_bytes, "saved_bytes_exact": exact,
                                   "saved_extra_bytes": saved_extra, "peak_bytes": None, "tflops": None,
                                   "floor_ms": floors["floor_ms"], "device": dev,
                                   "layers": shape.layers, "heads": shape.heads, "n_query": shape.n_query,
                                   "n_key": shape.n_key, "head_dim": shape.head_dim,
                                   "value_channels": padded_channels(impl, shape) if impl in VALUE_PAD else 1,
                                   "model_flops": cost["flops"], "model_tc_flops": cost["tc_flops"],
                                   "model_exps": cost["exps"], "model_bytes": cost["bytes"],
                                   "floor_tc_ms": floors["floor_tc_ms"], "floor_exp_ms": floors["floor_exp_ms"],
                                   "floor_mem_ms": floors["floor_mem_ms"], "share_tc": None, "share_exp": None,
                                   "share_mem": None, "note": "; ".join(x for x in (NOTES.get(impl, ""), note) if x)}
                            if timed:
                                _fill_timing(row, impl, shape, dtype, pass_)
                            records.append(row)
    return records


def _fill_timing(row: dict[str, Any], impl: str, shape: AttentionShape, dtype: str, pass_: str) -> None:
    reason = unsupported_reason(impl, dtype) if impl == "xformers" else None
    if reason:
        return
    try:
        row.update(time_row(impl, shape, dtype, pass_))
    except torch.cuda.OutOfMemoryError:
        row["note"] = "; ".join(x for x in (row["note"], "out of GPU memory") if x)
    except Exception as exc:  # the backend refuses the case: say why in the cell
        row["note"] = "; ".join(x for x in (row["note"], short_error(exc)) if x)
    finally:
        torch.cuda.empty_cache()
    if row["time_ms"]:
        row["tflops"] = row["model_flops"] / (row["time_ms"] * 1e-3) / 1e12
        for key in ("tc", "exp", "mem"):
            row[f"share_{key}"] = row[f"floor_{key}_ms"] / row["time_ms"]


def model_table(records: list[dict[str, Any]]) -> str:
    """One line per shape and pass: the cost model and its floors."""
    seen, rows = set(), []
    for r in records:
        key = (r["backbone"], r["stage"], r["shots"], r["dtype"], r["pass"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
    pct = lambda x: fmt_num(x, ".3g")  # noqa: E731
    return markdown_table(rows, [
        ("backbone", "backbone", str), ("stage", "stage", str), ("shots", "K", str), ("batch", "B", str),
        ("heads", "H (8 x L)", str), ("n_query", "Nq", str), ("n_key", "Nk", str), ("head_dim", "D", str),
        ("dtype", "dtype", str), ("pass", "pass", str),
        ("model_tc_flops", "tensor-core GFLOP", lambda x: f"{x / 1e9:.1f}"),
        ("model_exps", "exps (G)", lambda x: f"{x / 1e9:.2f}"), ("model_bytes", "min HBM bytes", human_bytes),
        ("floor_tc_ms", "tc floor ms", pct), ("floor_exp_ms", "exp floor ms", pct),
        ("floor_mem_ms", "HBM floor ms", pct), ("floor_ms", "floor ms", pct)])


def with_naive_ratio(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with "naive_ratio": what the naive path saves besides q, k, v over what this row saves, at the
    same shape, dtype and pass (None without a naive row or saved count)."""
    shape = lambda r: (r["backbone"], r["stage"], r["shots"], r["dtype"], r["pass"])  # noqa: E731
    naive = {shape(r): r["saved_extra_bytes"] for r in records if r["impl"] == "naive"}
    return [{**r, "naive_ratio": naive[shape(r)] / r["saved_extra_bytes"]
             if naive.get(shape(r)) and r["saved_extra_bytes"] else None} for r in records]


def rows_table(records: list[dict[str, Any]], timed: bool) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    columns = [("backbone", "backbone", str), ("stage", "stage", str), ("shots", "K", str), ("dtype", "dtype", str),
               ("pass", "pass", str), ("impl", "impl", str), ("saved_bytes", "saved for bwd", human_bytes),
               ("saved_extra_bytes", "besides q, k, v", human_bytes),
               ("naive_ratio", "naive / this, besides q, k, v", lambda x: "-" if x is None else f"{x:.1f}x")]
    if timed:
        columns += [("time_ms", "time ms", lambda x: fmt_num(x, ".3f")), ("tflops", "TFLOP/s", fmt_num),
                    ("peak_bytes", "peak extra mem", human_bytes), ("share_exp", "of exp floor", pct),
                    ("share_tc", "of tc floor", pct), ("share_mem", "of HBM floor", pct)]
    columns.append(("note", "note", lambda x: x or ""))
    rows = with_naive_ratio(records if timed else [r for r in records if r["pass"] == "fwd+bwd"])  # saved bytes:
    return markdown_table(rows, columns)  # one pass suffices untimed


def plot(records: list[dict[str, Any]], path: str) -> None:
    """Time and memory against the number of key tokens, one line per implementation (fwd+bwd, the first
    backbone and dtype of the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["pass"] == "fwd+bwd"]
    backbone, dtype = rows[0]["backbone"], rows[0]["dtype"]
    rows = [r for r in rows if r["backbone"] == backbone and r["dtype"] == dtype]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: (r["n_key"], r["stage"]))
        pts_t = [(r["n_key"], r["time_ms"]) for r in mine if r["time_ms"] is not None]
        pts_m = [(r["n_key"], r["peak_bytes"] if r["peak_bytes"] is not None else r["saved_bytes"])
                 for r in mine if (r["peak_bytes"] or r["saved_bytes"]) is not None]
        if pts_t:
            ax_t.plot(*zip(*pts_t), marker="o", label=impl)
        if pts_m:
            ax_m.plot(*zip(*pts_m), marker="o", label=impl)
    timed = any(r["time_ms"] is not None for r in rows)
    ax_t.set_title("fwd+bwd time (ms)" if timed else "time: not measured (no GPU)")
    ax_m.set_title("peak extra memory (bytes)" if any(r["peak_bytes"] for r in rows) else "bytes saved for backward")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("key tokens Nk")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"DCAMA attention, {backbone}, {dtype}, dropout {DROPOUT_P}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="Swin-B 1/8 only, K=1 and 5, fwd+bwd (under a minute on CPU)")
    parser.add_argument("--json", metavar="FILE", help="write every record as a JSON list")
    parser.add_argument("--plot", metavar="FILE.png", help="draw time and memory against the key tokens")
    parser.add_argument("--backbones", nargs="+", default=list(PUBLISHED_BACKBONES),
                        choices=list(PUBLISHED_BACKBONES))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--fp32-precision", default="high", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision for the fp32 rows (high = TF32, as the floors assume)")
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install -e '.[bench]'")
    torch.set_float32_matmul_precision(args.fp32_precision)
    if args.quick:
        args.backbones, args.stages, passes = ["swin_b"], ["1/8"], ["fwd+bwd"]
    else:
        passes = list(PASSES)
    timed, why = cuda_ready()
    if not timed:
        print(f"NOT TIMED: {why}. Measured here: bytes saved for backward (fake tensors at the real shapes) and "
              f"the cost model; times, peak memory and TFLOP/s are null. Run on a GPU to time.\n")
    records = bench_rows(args.backbones, args.stages, args.shots, args.dtypes, args.impls, passes, timed)
    print(f"Cost model per shape ({describe_peaks(H100_SXM)}); fp32 matmul precision {args.fp32_precision!r}\n")
    print(model_table(records))
    print()
    print(rows_table(records, timed))
    if args.json:
        write_json(args.json, records)
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
