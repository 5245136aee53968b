"""Fine-tuning versus training from scratch on a folder of new classes, on a CPU in minutes.

    python bench/finetune.py [--work DIR] [--json FILE] [--pretrain-epochs 3] [--epochs 4] [--seeds 0 1 2 3 4]
        [--pretrained DIR/pretrain/best.pt]

1. Pretrain on the shapes benchmark, fold 0 (its 30 training classes; ResNet-18 at 96 px, the first run's
   settings, fewer epochs): `python train/run.py --epochs P --test-episodes 0`.
2. Write fold 0's 12 test classes, never seen in step 1, as a folder benchmark (`export_folder`), split
   6 trn / 2 val / 4 test by its splits.json.
3. Train on that folder twice with one schedule (AdamW, the shapes settings, --epochs E): from the
   pretrained checkpoint (`train/run.py --init`) and from scratch (the same random frozen ResNet-18: both
   runs seed the backbone alike, so only the head's start differs).
4. Score the pretrained checkpoint as it is and both results on the folder's 4 test classes, novel to all
   of them, over several episode seeds (`eval/run.py --seeds`): mean +- standard deviation.

Prints a table and the commands, writes the JSON (every seed's numbers). Timings are of the machine it runs
on (a shared one may be loaded: compare the rows of one run, not runs of different days).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table
from dcama.data.folder import write_splits
from dcama.data.shapes import ShapesDataset, class_name, export_folder
from dcama.evaluate import evaluate_checkpoint
from dcama.files import write_json
from dcama.train import TrainConfig, train

IMG_SIZE = 96
# The folder runs take the shapes benchmark's training settings (config.BENCHMARK_DEFAULTS["shapes"]) so that
# the only difference between the two runs of step 3 is where the weights start.
SCHEDULE = dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, fg_weight=4.0, bsz=8, workers=0, threads=1,
                test_episodes=0, attn_impl="sdpa", progress=False)


def export_novel_classes(root: Path, images_per_class: int) -> dict[str, list[str]]:
    """Fold 0's test classes of shapes as a folder benchmark under root, split 6 trn / 2 val / 4 test."""
    export_folder(str(root), fold=0, images_per_class=images_per_class, img_size=IMG_SIZE, splits=("test",))
    names = [class_name(c) for c in ShapesDataset(split="test", fold=0, img_size=IMG_SIZE).class_ids]
    splits = {"trn": names[:6], "val": names[6:8], "test": names[8:]}
    write_splits(str(root), splits)
    return splits


def score(checkpoint: Path, folder: Path, seeds: list[int]) -> dict[str, Any]:
    return evaluate_checkpoint(checkpoint, benchmark="folder", datapath=str(folder), seeds=seeds, attn_impl="sdpa",
                               threads=1, progress=False)


def run(work: Path, pretrain_epochs: int, epochs: int, seeds: list[int], images_per_class: int,
        pretrained: Path | None = None) -> dict[str, Any]:
    t0, t_pretrain = time.perf_counter(), None  # None: an earlier run's checkpoint
    if pretrained is None:
        pretrained = train(TrainConfig(logdir=str(work / "pretrain"), epochs=pretrain_epochs, test_episodes=0,
                                       attn_impl="sdpa", progress=False)).best_checkpoint
        t_pretrain = round(time.perf_counter() - t0, 1)
    folder = work / "folder"
    splits = export_novel_classes(folder, images_per_class)
    runs = {}
    for name, start in (("fine-tuned", dict(init=str(pretrained))),
                        ("from scratch", dict(backbone="resnet18", img_size=IMG_SIZE))):
        t0 = time.perf_counter()
        result = train(TrainConfig(benchmark="folder", datapath=str(folder), logdir=str(work / name.replace(" ", "-")),
                                   epochs=epochs, **start, **SCHEDULE))
        runs[name] = {"checkpoint": str(result.best_checkpoint), "seconds": round(time.perf_counter() - t0, 1),
                      "best_val_miou": result.best_val_miou}
    runs["pretrained, not fine-tuned"] = {"checkpoint": str(pretrained), "seconds": t_pretrain}
    for record in runs.values():
        record["test"] = score(Path(record["checkpoint"]), folder, seeds)
    return {"settings": {"pretrain_epochs": pretrain_epochs, "epochs": epochs, "seeds": seeds,
                         "images_per_class": images_per_class, "img_size": IMG_SIZE, "splits": splits,
                         "schedule": SCHEDULE},
            "runs": runs}


def commands(work: Path, pretrain_epochs: int, epochs: int, seeds: list[int], images_per_class: int) -> list[str]:
    """The command lines that do what `run` does (step 2 as a Python one-liner)."""
    flags = ("--optimizer adamw --lr 1e-3 --weight-decay 1e-4 --fg-weight 4 --bsz 8 --workers 0 --threads 1 "
             "--attn-impl sdpa")
    folder = work / "folder"
    seeds_flag = " ".join(map(str, seeds))
    return [
        f"python train/run.py --logdir {work}/pretrain --epochs {pretrain_epochs} --test-episodes 0 --attn-impl sdpa",
        f"python -c \"from bench.finetune import export_novel_classes as e; e('{folder}', {images_per_class})\"",
        f"python train/run.py --benchmark folder --datapath {folder} --init {work}/pretrain/best.pt "
        f"--epochs {epochs} {flags} --logdir {work}/fine-tuned",
        f"python train/run.py --benchmark folder --datapath {folder} --backbone resnet18 --img-size {IMG_SIZE} "
        f"--epochs {epochs} {flags} --logdir {work}/from-scratch",
        *(f"python eval/run.py --checkpoint {work}/{run}/best.pt --benchmark folder --datapath {folder} "
          f"--seeds {seeds_flag} --attn-impl sdpa --threads 1" for run in ("pretrain", "fine-tuned", "from-scratch")),
    ]


def table(result: dict[str, Any]) -> str:
    pm = lambda v: f"{v['mean']:.2f} +- {v['std']:.2f}"  # noqa: E731
    rows = [{"run": name, "miou": pm(r["test"]["miou"]), "fb_iou": pm(r["test"]["fb_iou"]),
             "per_seed": " ".join(f"{s['miou']:.1f}" for s in r["test"]["runs"]),
             "seconds": "-" if r["seconds"] is None else f"{r['seconds']:.0f}"}
            for name, r in result["runs"].items()]
    return markdown_table(rows, [("run", "run", str), ("miou", "test mIoU", str), ("fb_iou", "test FB-IoU", str),
                                 ("per_seed", "mIoU per seed", str), ("seconds", "training s", str)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the runs and the data (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4, help="epochs of both folder runs")
    p.add_argument("--images-per-class", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--pretrained", type=Path, default=None,
                   help="the best.pt of an earlier step 1 (same --pretrain-epochs) instead of pretraining again")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        setup = (args.pretrain_epochs, args.epochs, args.seeds, args.images_per_class)
        result = run(work, *setup, pretrained=args.pretrained)
        result["commands"] = commands(work, *setup)
    print("\n".join(result["commands"]))
    print(table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
