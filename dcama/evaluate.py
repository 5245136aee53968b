"""Evaluation engine: few-shot episodes through any predictor, IoU accumulated over the whole run.

The loop takes a *predictor* (a callable from a batch to a {0,1} mask) rather than a model, so the same code
scores a DCAMA model, a trivial baseline or, in the tests, an oracle. It runs in one process or, under an
initialised torch.distributed group, shards the episodes over the ranks and sums the accumulators.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import load_checkpoint_file
from .config import EVAL_EPISODES, TEST_SEED, default_img_size
from .data import build_dataset, collate_episodes
from .files import write_json
from .metrics import FewShotIoU, episode_iou
from .model import DCAMA
from .runtime import Batch, ShardSampler, autocast_context, dist_info, ignore_stop_signals, move_batch
from .visualize import save_episode_png

__all__ = ["BASELINES", "baseline_predictor", "evaluate", "evaluate_checkpoint", "format_result", "model_predictor"]

Predictor = Callable[[Batch], torch.Tensor]

BASELINES = ("all-foreground", "support-mask")


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
        visualize_dir.mkdir(parents=True, exist_ok=True)
    seen = 0
    for batch in tqdm(loader, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True, leave=False):
        batch = move_batch(batch, device)
        pred = predictor(batch).long()
        target = batch["query_mask"]
        metric.update(pred, target, batch["class_id"])
        if visualize_dir is not None:
            for b in range(pred.shape[0]):
                idx, iou = indices[seen + b], episode_iou(pred[b], target[b])
                cls = int(batch["class_id"][b])
                save_episode_png(visualize_dir / f"episode{idx:05d}_class{cls}_iou{iou:05.1f}.png",
                                 batch["support_imgs"][b], batch["support_masks"][b], batch["query_img"][b],
                                 target[b], pred[b], f"episode {idx}  ·  class {cls}  ·  {batch['query_name'][b]}",
                                 iou=iou)
        seen += pred.shape[0]
    metric.all_reduce()
    result = metric.compute()
    result["episodes"] = len(dataset)
    return result


def format_result(result: dict[str, Any]) -> str:
    """Per-class IoU, mIoU and FB-IoU as printable lines."""
    lines = [f"class {c:>4}: IoU {iou:6.2f}" for c, iou in sorted(result["per_class"].items())]
    lines.append(f"mIoU {result['miou']:.2f}   FB-IoU {result['fb_iou']:.2f}   ({result['episodes']} episodes)")
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | Path | None, *, benchmark: str = "shapes", datapath: str | None = None,
                        fold: int = 0, nshot: int = 1, episodes: int = EVAL_EPISODES, seed: int = TEST_SEED,
                        use_original_imgsize: bool = False, img_size: int | None = None,
                        backbone: str | None = None, attn_impl: str = "auto", amp: str = "off",
                        baseline: str | None = None, workers: int = 0, batch_size: int = 1,
                        device: str | None = None,
                        json_path: str | Path | None = None, visualize_dir: str | Path | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint (this project's or the authors' released file) and evaluate it on the test split.

    `baseline` evaluates a trivial predictor instead of a checkpoint. `batch_size` must stay 1 with
    `use_original_imgsize` (episodes of different sizes). Returns (and with `json_path` writes)
    {"miou", "fb_iou", "per_class", "episodes", "settings"}; settings["data"] is what the data set says of
    itself (the folder benchmark's class split). Same arguments, same numbers.
    """
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (checkpoint is None) == (baseline is None):
        raise ValueError("give exactly one of a checkpoint or a baseline")
    if img_size is None:  # our checkpoints remember the size they were trained at; otherwise the benchmark's
        trained = load_checkpoint_file(checkpoint).get("train_config", {}) if checkpoint is not None else {}
        same = trained.get("benchmark") == benchmark and trained.get("img_size")
        img_size = trained["img_size"] if same else default_img_size(benchmark)
    # The data set first: a missing benchmark is reported before a large model is loaded.
    dataset = build_dataset(benchmark, datapath, fold=fold, split="test", shot=nshot, img_size=img_size,
                            use_original_imgsize=use_original_imgsize, episodes=episodes, seed=seed)
    if baseline is not None:
        predictor, model_config = baseline_predictor(baseline), None
    else:
        model = DCAMA.from_checkpoint(str(checkpoint), backbone=backbone, attn_impl=attn_impl).to(dev).eval()
        predictor, model_config = model_predictor(model, amp=amp), dict(model.config)
    result = evaluate(predictor, dataset, device=dev, batch_size=batch_size, workers=workers, progress=progress,
                      visualize_dir=visualize_dir, desc=f"{benchmark} fold {fold} {nshot}-shot")
    result["settings"] = {
        "checkpoint": None if checkpoint is None else str(checkpoint), "baseline": baseline,
        "benchmark": benchmark, "datapath": datapath, "fold": fold, "nshot": nshot, "episodes": len(dataset),
        "seed": seed, "use_original_imgsize": use_original_imgsize, "img_size": img_size, "attn_impl": attn_impl,
        "amp": amp, "device": str(dev), "model_config": model_config, "data": dataset.describe(),
    }
    if json_path is not None and dist_info()[0] == 0:
        write_json(json_path, result)
    return result
