"""One DCAMA training step with the naive attention versus the fused op.

    python bench/train_step.py [--quick] [--json FILE] [--budget-gb 80] [--backbones ...] [--shots ...]

Everywhere: the activation memory of a training step (bytes of the distinct storages autograd saves in the
forward, parameters excluded), traced on the meta device at the real shapes (exact for what it counts,
instant, no memory), and from it the largest batch that fits --budget-gb, MODELLED as
weights + gradients + SGD momentum + activations (transient workspace and allocator slack not included).
On a GPU also: the step time (forward, loss, backward, SGD step; median of triton.testing.do_bench) and the
peak GPU memory of a step, and the largest batch from the MEASURED peak memory at two batch sizes.
Random weights: the backbone's pretrained values change no time or memory figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from triton.testing import do_bench

from bench.common import (BATCH, IMAGE_SIZE, PUBLISHED_BACKBONES, SavedTensorBytes, cuda_ready, device_name, fmt_num,
                          human_bytes, markdown_table)
from dcama.backbones import BACKBONES
from dcama.files import write_json
from dcama.model import DCAMA
from dcama.train import TrainConfig, build_optimizer, fill_defaults, trainable_parameters

DEFAULT_BACKBONES = PUBLISHED_BACKBONES[:2]  # Swin-B and ResNet-50 (ResNet-101 on request)
IMPLS = ("naive", "triton")
PUBLISHED_RECIPE = fill_defaults(TrainConfig(benchmark="coco"))  # its optimiser: SGD, Nesterov momentum
GIB = 1024**3


def build_model(backbone: str, impl: str, device: str | torch.device) -> torch.nn.Module:
    with torch.device(device):
        model = DCAMA(backbone=backbone, attn_impl=impl)
    return model.train()


def make_batch(batch: int, shots: int, device: str | torch.device) -> tuple[torch.Tensor, ...]:
    s = IMAGE_SIZE
    with torch.device(device):
        return (torch.randn(batch, 3, s, s), torch.randn(batch, shots, 3, s, s),
                (torch.rand(batch, shots, s, s) > 0.5).float(), (torch.rand(batch, s, s) > 0.5).long())


def fixed_bytes(model: torch.nn.Module) -> int:
    """Weights and buffers, plus a gradient and an SGD momentum buffer per trainable parameter."""
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return nbytes(model.parameters()) + nbytes(model.buffers()) + 2 * nbytes(trainable_parameters(model))


def _saved_bytes(model: torch.nn.Module, batch: int, shots: int) -> int:
    q_img, s_img, s_mask, q_mask = make_batch(batch, shots, "meta")
    with SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
        F.cross_entropy(model(q_img, s_img, s_mask), q_mask)
    return saved.nbytes


def activation_bytes(model: torch.nn.Module, batch: int, shots: int) -> int:
    """Bytes of one step's saved activations, traced on the meta device."""
    return _saved_bytes(model, batch, shots)


def largest_batch(at_small: float, at_large: float, small: int, large: int, budget: float) -> int | None:
    """Largest batch b with memory(b) <= budget, memory linear in b through the two points (None when the
    memory did not grow with the batch: no claim can be made)."""
    slope = (at_large - at_small) / (large - small) if large != small else 0.0
    if slope <= 0:
        return None
    return max(0, int((budget - (at_small - slope * small)) // slope))


def gpu_step(backbone: str, impl: str, batch: int, shots: int) -> dict[str, float]:
    """Median step time (ms) and peak GPU memory (bytes) of forward + loss + backward + SGD step."""
    model = build_model(backbone, impl, "cuda")
    opt = build_optimizer(PUBLISHED_RECIPE, trainable_parameters(model))
    q_img, s_img, s_mask, q_mask = make_batch(batch, shots, "cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(q_img, s_img, s_mask), q_mask).backward()
        opt.step()

    step()  # autotune / allocate the momentum outside the measurements
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = do_bench(step, warmup=100, rep=500, return_mode="median")
    del model, opt
    torch.cuda.empty_cache()
    return {"step_ms": float(ms), "peak_bytes": int(peak)}


def run(backbones: list[str], shots_list: list[int], batch: int, impls: list[str], budget_gb: float,
        timed: bool) -> list[dict[str, Any]]:
    budget = budget_gb * GIB
    half = max(1, batch // 2)
    records = []
    for backbone in backbones:
        for impl in impls:
            model = build_model(backbone, impl, "meta")
            fixed = fixed_bytes(model)
            for shots in shots_list:
                act = activation_bytes(model, batch, shots)
                act_half = activation_bytes(model, half, shots)
                row = {"backbone": backbone, "impl": impl, "shots": shots, "batch": batch,
                       "activation_bytes": act,
                       "activation_per_sample": (act - act_half) / (batch - half) if batch != half else act / batch,
                       "fixed_bytes": fixed, "step_ms": None, "peak_bytes": None, "budget_gb": budget_gb,
                       "max_batch": largest_batch(fixed + act_half, fixed + act, half, batch, budget),
                       "max_batch_basis": "modelled: weights + grads + momentum + saved activations",
                       "device": device_name() if timed else "cpu (not timed)", "note": ""}
                if timed:
                    try:
                        big = gpu_step(backbone, impl, batch, shots)
                        small = gpu_step(backbone, impl, half, shots)
                        row.update(big)
                        row["max_batch"] = largest_batch(small["peak_bytes"], big["peak_bytes"], half, batch, budget)
                        row["max_batch_basis"] = f"measured: peak GPU memory at batch {half} and {batch}"
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = f"out of GPU memory at batch {batch}"
                        torch.cuda.empty_cache()
                records.append(row)
    return records


def table(records: list[dict[str, Any]], timed: bool) -> str:
    columns = [("backbone", "backbone", str), ("shots", "K", str), ("batch", "batch", str), ("impl", "impl", str),
               ("activation_bytes", "saved activations", human_bytes),
               ("activation_per_sample", "per sample", human_bytes),
               ("fixed_bytes", "weights+grads+momentum", human_bytes)]
    if timed:
        columns += [("step_ms", "step ms", lambda x: fmt_num(x, ".1f")), ("peak_bytes", "peak GPU mem", human_bytes)]
    columns += [("max_batch", "largest batch in budget", lambda x: "-" if x is None else str(x)),
                ("max_batch_basis", "basis", str),
                ("note", "note", lambda x: x or "")]
    return markdown_table(records, columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Swin-B only (a few seconds on CPU)")
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--budget-gb", type=float, default=80.0, help="memory budget in GiB for the largest batch")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones = ["swin_b"]
    timed, why = cuda_ready()
    if not timed:
        print(f"NOT TIMED: {why}. Measured here: saved activations on the meta device; the largest batch is "
              f"modelled. Step time and peak GPU memory are null.\n")
    records = run(args.backbones, args.shots, args.batch, args.impls, args.budget_gb, timed)
    print(f"One training step, {IMAGE_SIZE}x{IMAGE_SIZE}, budget {args.budget_gb:g} GiB\n")
    print(table(records, timed))
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
