"""Evaluation engine: few-shot episodes through any predictor, IoU accumulated over the whole run.

The loop takes a *predictor* (a callable from a batch to a {0,1} mask) rather than a model, so the same code
scores a DCAMA model, a trivial baseline or, in the tests, an oracle. It runs in one process or, under an
initialised torch.distributed group, shards the episodes over the ranks and sums the accumulators.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import load_checkpoint_file, trained_img_size
from .config import BASELINES, CPU_THREADS, EVAL_EPISODES, TEST_SEED, default_img_size
from .data import build_dataset, collate_episodes
from .files import write_json
from .flags import check_img_size, check_output, writing
from .metrics import FewShotIoU, episode_iou
from .model import DCAMA
from .runtime import (Batch, ShardSampler, autocast_context, check_device, cpu_threads, dist_info, ignore_stop_signals,
                      move_batch)
from .visualize import save_episode_png

__all__ = ["BASELINES", "baseline_predictor", "evaluate", "evaluate_checkpoint", "format_result", "model_predictor",
           "note_unseen_classes", "spread"]

Predictor = Callable[[Batch], torch.Tensor]


def original_size(batch: Batch) -> tuple[int, int] | None:
    """The query's original (H, W) when the data set was built with use_original_imgsize, else None.

    collate_episodes gives a list of (H, W) tuples; episodes at their original size differ in shape, so such
    batches hold one episode.
    """
    sizes = batch.get("org_query_size")
    if sizes is None:
        return None
    if len(set(map(tuple, sizes))) != 1:
        raise ValueError("episodes at the original image size must be evaluated with batch size 1")
    h, w = sizes[0]
    return int(h), int(w)


def model_predictor(model: torch.nn.Module, *, amp: str = "off") -> Predictor:
    """Predictor of a DCAMA model: logits resized to the original query size (if any) before the argmax."""

    def predict(batch: Batch) -> torch.Tensor:
        device = batch["query_img"].device
        with torch.no_grad(), autocast_context(device, amp):
            return model.predict(batch["query_img"], batch["support_imgs"], batch["support_masks"],
                                 out_size=original_size(batch))

    return predict


def baseline_predictor(name: str) -> Predictor:
    """Trivial predictors a trained model must beat: every pixel foreground, or the first support mask pasted."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")

    def predict(batch: Batch) -> torch.Tensor:
        target = batch["query_mask"]
        if name == "all-foreground":
            return torch.ones_like(target, dtype=torch.long)
        support = (batch["support_masks"][:, 0] == 1).float()
        if support.shape[-2:] != target.shape[-2:]:
            support = F.interpolate(support[:, None], size=target.shape[-2:], mode="nearest")[:, 0]
        return support.long()

    return predict


def evaluate(predictor: Predictor, dataset: Dataset, *, device: torch.device | str = "cpu", batch_size: int = 1,
             workers: int = 0, progress: bool = True,
             visualize_dir: str | Path | None = None, desc: str = "eval") -> dict[str, Any]:
    """Score `predictor` on every episode of `dataset`; returns FewShotIoU's {"miou", "fb_iou", "per_class"}
    plus "episodes". Under torch.distributed the episodes are split over the ranks and the counts summed, so
    every rank returns the same numbers. With `visualize_dir`, one PNG per episode (written by its rank)."""
    device = torch.device(device)
    rank, world = dist_info()
    sampler = ShardSampler(len(dataset), rank, world)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_episodes, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    indices = sampler.indices
    metric = FewShotIoU(dataset.class_ids, device=device)
    if visualize_dir is not None:
        visualize_dir = Path(visualize_dir)
        with writing(visualize_dir, folder=True):
            visualize_dir.mkdir(parents=True, exist_ok=True)
    seen = 0
    for batch in tqdm(loader, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True, leave=False):
        batch = move_batch(batch, device)
        pred = predictor(batch).long()
        metric.update(pred, batch["query_mask"], batch["class_id"])
        if visualize_dir is not None:
            _draw_episodes(visualize_dir, batch, pred, indices[seen:seen + pred.shape[0]])
        seen += pred.shape[0]
    metric.all_reduce()
    result = metric.compute()
    result["episodes"] = len(dataset)
    result["class_names"] = {c: dataset.class_name(c) for c in dataset.class_ids}
    return result


def note_unseen_classes(result: dict[str, Any], shown: int = 8) -> None:
    """One line on stderr (rank 0) when some classes had no episode: NaN in per_class, left out of the mIoU."""
    unseen = [c for c, iou in result["per_class"].items() if math.isnan(iou)]
    if unseen and dist_info()[0] == 0:
        listed = ", ".join(map(str, unseen[:shown])) + (f", ... ({len(unseen) - shown} more)"
                                                        if len(unseen) > shown else "")
        print(f"note: {len(unseen)} of {len(result['per_class'])} classes had no episode ({listed}): left out of "
              "the mIoU mean", file=sys.stderr)


def _draw_episodes(folder: Path, batch: Batch, pred: torch.Tensor, indices: list[int]) -> None:
    """One PNG per episode of the batch, named by its index, class and IoU."""
    target = batch["query_mask"]
    for b, idx in enumerate(indices):
        iou, cls = episode_iou(pred[b], target[b]), int(batch["class_id"][b])
        path = folder / f"episode{idx:05d}_class{cls}_iou{iou:05.1f}.png"
        with writing(path):
            save_episode_png(path, batch["support_imgs"][b], batch["support_masks"][b], batch["query_img"][b],
                             target[b], pred[b], f"episode {idx}  ·  class {cls}  ·  {batch['query_name'][b]}",
                             iou=iou)


def format_result(result: dict[str, Any]) -> str:
    """Per-class IoU, mIoU and FB-IoU as printable lines, each class named; for a result of several seeds
    (`spread`), each figure as mean +- standard deviation."""
    names = result.get("class_names", {})
    label = {c: f"class {c:>4} {names.get(c, '')}".rstrip() for c in result["per_class"]}
    width = max(map(len, label.values()), default=0)
    if "seeds" not in result:
        lines = [f"{label[c]:<{width}}: IoU {iou:6.2f}" for c, iou in sorted(result["per_class"].items())]
        lines.append(f"mIoU {result['miou']:.2f}   FB-IoU {result['fb_iou']:.2f}   ({result['episodes']} episodes)")
        return "\n".join(lines)
    pm = lambda v: f"{v['mean']:6.2f} +- {v['std']:5.2f}"  # noqa: E731
    lines = [f"{label[c]:<{width}}: IoU {pm(v)}" for c, v in sorted(result["per_class"].items())]
    seeds = " ".join(map(str, result["seeds"]))
    lines.append(f"mIoU {pm(result['miou'])}   FB-IoU {pm(result['fb_iou'])}   (mean +- standard deviation over "
                 f"seeds {seeds}, {result['episodes']} episodes each)")
    return "\n".join(lines)


def spread(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The results of one model on several episode seeds (`evaluate`'s, each with its "seed") summarised:
    mIoU, FB-IoU and every class's IoU as {"mean", "std"}, the standard deviation over the seeds with n - 1 in
    the denominator (a sample of seeds; NaN from fewer than 2 values); a class without an episode in some run
    is left out of its mean and deviation (NaN when it has none in any). "runs" keeps every seed's own numbers."""
    def stats(values: list[float]) -> dict[str, float]:
        seen = [v for v in values if not math.isnan(v)]
        if not seen:
            return {"mean": math.nan, "std": math.nan}
        mean = sum(seen) / len(seen)
        var = sum((v - mean) ** 2 for v in seen) / (len(seen) - 1) if len(seen) > 1 else math.nan
        return {"mean": mean, "std": math.sqrt(var)}

    classes = list(runs[0]["per_class"])
    return {"seeds": [r["seed"] for r in runs], "miou": stats([r["miou"] for r in runs]),
            "fb_iou": stats([r["fb_iou"] for r in runs]),
            "per_class": {c: stats([r["per_class"][c] for r in runs]) for c in classes},
            "class_names": runs[0]["class_names"], "episodes": runs[0]["episodes"], "runs": list(runs)}


def _load_model(checkpoint: str | Path, blob: dict[str, Any] | None, backbone: str | None, attn_impl: str,
                img_size: int, device: torch.device) -> DCAMA:
    """The checkpoint's model (from `blob` when the file was read already) on `device` in eval mode, after
    checking that it takes `img_size`."""
    model = DCAMA.from_loaded(load_checkpoint_file(checkpoint) if blob is None else blob, str(checkpoint),
                              backbone=backbone, attn_impl=attn_impl)
    check_img_size(model.config["backbone"], img_size, built_for=model.backbone.img_size)
    return model.to(device).eval()


def evaluate_checkpoint(checkpoint: str | Path | None, *, benchmark: str = "shapes", datapath: str | None = None,
                        fold: int = 0, nshot: int = 1, episodes: int = EVAL_EPISODES, seed: int = TEST_SEED,
                        seeds: Sequence[int] | None = None, use_original_imgsize: bool = False,
                        img_size: int | None = None, backbone: str | None = None, attn_impl: str = "auto",
                        amp: str = "off", baseline: str | None = None, workers: int = 0, threads: int = CPU_THREADS,
                        batch_size: int = 1, device: str | None = None,
                        json_path: str | Path | None = None, visualize_dir: str | Path | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint (this project's or the authors' released file) and evaluate it on the test split.

    `baseline` evaluates a trivial predictor instead. `img_size` None: the size the checkpoint was trained at
    (`dcama.checkpoint.trained_img_size`), else the benchmark's. `threads`: torch CPU threads on a CPU
    device (`runtime.cpu_threads`; 0: torch's default). `batch_size` must stay 1 with `use_original_imgsize`
    (episodes of different sizes). Returns (with `json_path`, writes)
    {"miou", "fb_iou", "per_class", "class_names", "episodes", "settings"}; settings["data"]: what the data set
    says of itself (the folder benchmark's split). Same arguments, same numbers. `seeds`: the model (loaded
    once) scored on each seed's episodes instead of `seed`'s, the result their `spread`, `visualize_dir` one
    folder seed<N>/ each. A device this machine lacks, a `json_path` or `visualize_dir` that cannot be written
    (checked before anything is read) or a size the model cannot take is a ConfigError, a result that cannot
    be written at the end an OutputError."""
    dev = check_device(device)
    if (checkpoint is None) == (baseline is None):
        raise ValueError("give exactly one of a checkpoint or a baseline")
    check_output("json", json_path, folder=False)
    check_output("visualize", visualize_dir, folder=True)
    # A checkpoint is read first only when its size is needed (the file is read once); otherwise the data set
    # is built first, so a missing or malformed benchmark is reported before a large checkpoint is read.
    blob = load_checkpoint_file(checkpoint) if checkpoint is not None and img_size is None else None
    default = default_img_size(benchmark)
    img_size = img_size or (default if blob is None else trained_img_size(blob, default))
    data = dict(fold=fold, split="test", shot=nshot, img_size=img_size, use_original_imgsize=use_original_imgsize,
                episodes=episodes)
    all_seeds = [seed] if seeds is None else list(seeds)
    dataset = build_dataset(benchmark, datapath, seed=all_seeds[0], **data)
    model = None if checkpoint is None else _load_model(checkpoint, blob, backbone, attn_impl, img_size, dev)
    del blob  # its tensors are the model's now
    predictor = baseline_predictor(baseline) if model is None else model_predictor(model, amp=amp)
    runs = []
    with cpu_threads(threads, dev):
        for s in all_seeds:
            dataset = dataset if s == all_seeds[0] else build_dataset(benchmark, datapath, seed=s, **data)
            pictures = None if visualize_dir is None or seeds is None else Path(visualize_dir) / f"seed{s}"
            runs.append({"seed": s, **evaluate(predictor, dataset, device=dev, batch_size=batch_size, workers=workers,
                                               progress=progress, visualize_dir=pictures or visualize_dir,
                                               desc=f"{benchmark} fold {fold} {nshot}-shot seed {s}")})
            note_unseen_classes(runs[-1])
    result = {k: v for k, v in runs[0].items() if k != "seed"} if seeds is None else spread(runs)
    result["settings"] = {
        "checkpoint": None if checkpoint is None else str(checkpoint), "baseline": baseline,
        "benchmark": benchmark, "datapath": datapath, "fold": fold, "nshot": nshot, "episodes": len(dataset),
        "seed": all_seeds[0] if seeds is None else None, "seeds": None if seeds is None else all_seeds,
        "use_original_imgsize": use_original_imgsize, "img_size": img_size, "attn_impl": attn_impl,
        "amp": amp, "device": str(dev), "threads": threads, "batch_size": batch_size, "workers": workers,
        "model_config": model and dict(model.config),
        "data": dataset.describe(listed_in=None if json_path is None else str(json_path)),
    }
    if json_path is not None and dist_info()[0] == 0:
        with writing(json_path):
            write_json(json_path, result)
    return result
