"""The files a training run folder holds, in bytes, as this code writes them and as version 1 of the checkpoint
format wrote them (every file the whole model, its computed positional encodings included, and the optimiser).

    python bench/checkpoint_sizes.py [--json FILE] [--backbones resnet18 swin_b]

Each backbone with its benchmark's recipe: ResNet-18 the shapes default (AdamW: two moments per trained
weight), Swin-B the published one (SGD with momentum: one), at the recipe's image side. The files are written
to a temporary folder with the project's own save functions and measured; the weights are random (their
values change no size). The RNG states and the metric history add a few kB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import human_bytes, markdown_table
from dcama.checkpoint import BACKBONE_FILE, FORMAT, save_backbone, save_checkpoint
from dcama.config import BACKBONES
from dcama.files import write_json
from dcama.model import DCAMA
from dcama.train import TrainConfig, build_optimizer, fill_defaults, trainable_parameters

RECIPES = {"resnet18": "shapes", "swin_b": "coco"}


def run_folder_bytes(backbone: str) -> dict[str, Any]:
    """The sizes of one run folder's checkpoint files for `backbone`, before (format 1) and now."""
    cfg = fill_defaults(TrainConfig(benchmark=RECIPES.get(backbone, "coco"), backbone=backbone))
    torch.manual_seed(0)
    model = DCAMA(backbone, attn_impl="sdpa", img_size=cfg.img_size if BACKBONES[backbone].kind == "swin" else None)
    params = trainable_parameters(model)
    optimizer = build_optimizer(cfg, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the optimiser's state (momentum, moments) exists from the first step on
    resume = {"optimizer": optimizer.state_dict(), "epochs_done": 1}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Format 1: the whole state, computed buffers too, with the optimiser, in last.pt, last.prev.pt and best.pt.
        whole = {**dict(model.named_buffers()), **model.state_dict()}
        torch.save({"format": FORMAT, "version": 1, "config": model.config, "state_dict": whole, **resume},
                   folder / "v1.pt")
        entry = save_backbone(folder / BACKBONE_FILE, model)
        save_checkpoint(folder / "last.pt", model, extra=resume, backbone_file=entry)
        save_checkpoint(folder / "best.pt", model, extra={"epochs_done": 1})
        size = {name: (folder / name).stat().st_size for name in ("v1.pt", BACKBONE_FILE, "last.pt", "best.pt")}
    return {"backbone": backbone, "recipe": cfg.benchmark, "optimizer": cfg.optimizer, "img_size": cfg.img_size,
            "trained_params": sum(p.numel() for p in params),
            "frozen_params": sum(p.numel() for p in model.backbone.parameters()),
            "before_each_file": size["v1.pt"], "before_run_folder": 3 * size["v1.pt"],
            "backbone_pt": size[BACKBONE_FILE], "last_pt": size["last.pt"], "best_pt": size["best.pt"],
            "after_run_folder": size[BACKBONE_FILE] + 2 * size["last.pt"] + size["best.pt"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    parser.add_argument("--backbones", nargs="+", default=list(RECIPES), choices=list(BACKBONES))
    args = parser.parse_args(argv)
    records = [run_folder_bytes(name) for name in args.backbones]
    print(markdown_table(records, [
        ("backbone", "backbone", str), ("optimizer", "optimiser", str),
        ("before_each_file", "before: each of last.pt, last.prev.pt, best.pt", human_bytes),
        ("before_run_folder", "before: run folder", human_bytes), ("backbone_pt", "backbone.pt (once)", human_bytes),
        ("last_pt", "last.pt, last.prev.pt", human_bytes), ("best_pt", "best.pt", human_bytes),
        ("after_run_folder", "now: run folder", human_bytes)]))
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
