"""Settings and facts that several parts of the project use, each defined here once.

The lowest layer of `dcama` (`.importlinter` lists the layers): it imports nothing from the package, only the
kernels' list of attention implementations. The published recipe is described in docs/training.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kernels import IMPLS

# The attention op's implementations ("auto", "triton", "naive", "sdpa"): DCAMA(attn_impl=...) and --attn-impl.
ATTN_IMPLS: tuple[str, ...] = IMPLS
# Target pixels that count in neither the loss nor the metric: PASCAL-5i's object boundaries (docs/data.md).
IGNORE_INDEX = 255
# --amp modes: "off" or the autocast dtype.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES: tuple[str, ...] = ("off", *AMP_DTYPES)
OPTIMIZERS = ("sgd", "adamw")

# The published setting: 384x384 images, 12 episodes per GPU per step (docs/training.md).
PUBLISHED_IMG_SIZE = 384
PUBLISHED_BATCH = 12
# The evaluation protocol: 1000 episodes with seed 0, so every run scores the same episodes (docs/data.md).
EVAL_EPISODES = 1000
TEST_SEED = 0

# torch CPU threads of every command on a CPU device (--threads; 0: torch's default, one per core). One, the same
# for train, eval and predict, so that a command repeats another's numbers (they depend on the thread count) at its
# speed, and a shared machine is not oversubscribed: docs/training.md, "CPU threads".
CPU_THREADS = 1

# --save-every-min where an epoch is long (why, and where: docs/training.md, "Interruptions").
SAVE_EVERY_MIN = 10.0

# DataLoader workers per process on the real benchmarks: 8, or the CPUs this process may use when fewer (a
# laptop with a folder benchmark). Episodes are the same for any count (docs/data.md, "Splits, episodes and
# seeding").
USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DATA_WORKERS = min(8, USABLE_CPUS)

# Real benchmarks follow the published recipe; so does "folder", a person's own classes in FSS-1000's layout
# (docs/data.md), which is FSS-1000's protocol on other images. "shapes" is the embedded synthetic benchmark,
# tuned so that `python train/run.py` learns on 2 CPU cores in a few minutes with a random frozen ResNet-18.
BENCHMARK_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(backbone="swin_b", img_size=PUBLISHED_IMG_SIZE, bsz=PUBLISHED_BATCH, optimizer="sgd", lr=1e-3,
               weight_decay=1e-4, fg_weight=1.0, epochs=50, episodes_per_epoch=None, val_episodes=EVAL_EPISODES,
               test_episodes=0, workers=DATA_WORKERS, save_every_min=SAVE_EVERY_MIN)
    for name in ("coco", "pascal", "fss", "folder")
}
# Why these values (the image side, the foreground weight): docs/training.md, "The first run in detail".
BENCHMARK_DEFAULTS["shapes"] = dict(backbone="resnet18", img_size=96, bsz=8, optimizer="adamw", lr=1e-3,
                                    weight_decay=1e-4, fg_weight=4.0, epochs=8, episodes_per_epoch=400,
                                    val_episodes=100, test_episodes=EVAL_EPISODES, workers=0, save_every_min=0.0)


def default_img_size(benchmark: str) -> int:
    """Image side the benchmark is trained and evaluated at unless told otherwise."""
    if benchmark not in BENCHMARK_DEFAULTS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARK_DEFAULTS)}")
    return BENCHMARK_DEFAULTS[benchmark]["img_size"]
