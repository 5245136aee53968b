"""Settings and facts that several parts of the project use, each defined here once.

The lowest layer of `dcama` (`.importlinter` lists the layers): it imports nothing, torch included, so that
the command lines check their flags against these facts before torch is imported (a flag error or --help in
well under a second). The published recipe is described in docs/training.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import accumulate
from typing import Any


class ConfigError(ValueError):
    """A flag value or a combination of flags that cannot run; the message is one line naming the flag
    (dcama.flags words and raises it)."""


class ArgumentError(ConfigError):
    """A bad value of a setting that Python callers give as an argument (`load_model(device=...)`): the message
    names the argument (`device='cuda': why`); `dcama.flags.error_line` names the flag instead (`--device cuda:
    why`). `instead`: a value to suggest, worded the same way."""

    def __init__(self, name: str, value: Any, problem: str, instead: Any = None) -> None:
        self.name, self.value, self.problem, self.instead = name, value, problem, instead
        super().__init__(self.worded(command_line=False))

    def worded(self, command_line: bool) -> str:
        def setting(value: Any) -> str:
            return f"{flag(self.name)} {value}" if command_line else f"{self.name}={value!r}"

        suggestion = "" if self.instead is None else f"; use {setting(self.instead)}"
        return f"{setting(self.value)}: {self.problem}{suggestion}"


def flag(name: str) -> str:
    """The command-line form of a setting: img_size -> --img-size."""
    return "--" + name.replace("_", "-")


# The attention op's implementations, kernels.IMPLS (DCAMA(attn_impl=...) and --attn-impl); named here without
# importing the kernels, which import torch, and held equal to them by tests/test_config.py.
ATTN_IMPLS: tuple[str, ...] = ("auto", "triton", "naive", "sdpa")
# Target pixels that count in neither the loss nor the metric: PASCAL-5i's object boundaries (docs/data.md).
IGNORE_INDEX = 255
# --amp modes: "off" or the autocast dtype (dcama.runtime.AMP_DTYPES).
AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
# eval/run.py --baseline: the trivial predictors (dcama.evaluate.baseline_predictor).
BASELINES = ("all-foreground", "support-mask")

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

# The benchmark a run trains on when none is named, and the defaults every benchmark shares.
DEFAULT_BENCHMARK = "shapes"
SHARED_DEFAULTS: dict[str, Any] = dict(fold=0, nshot=1, seed=0, momentum=0.9, attn_impl="auto", amp="off",
                                       threads=CPU_THREADS)
# Real benchmarks follow the published recipe; so does "folder", a person's own classes in FSS-1000's layout
# (docs/data.md), which is FSS-1000's protocol on other images. "shapes" is the embedded synthetic benchmark,
# tuned so that `python train/run.py` learns on 2 CPU cores in a few minutes with a random frozen ResNet-18.
BENCHMARK_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(**SHARED_DEFAULTS, backbone="swin_b", img_size=PUBLISHED_IMG_SIZE, bsz=PUBLISHED_BATCH,
               optimizer="sgd", lr=1e-3, weight_decay=1e-4, fg_weight=1.0, epochs=50, episodes_per_epoch=None,
               val_episodes=EVAL_EPISODES, test_episodes=0, workers=DATA_WORKERS, save_every_min=SAVE_EVERY_MIN)
    for name in ("coco", "pascal", "fss", "folder")
}
# Why these values (the image side, the foreground weight): docs/training.md, "The first run in detail".
BENCHMARK_DEFAULTS["shapes"] = dict(**SHARED_DEFAULTS, backbone="resnet18", img_size=96, bsz=8, optimizer="adamw",
                                    lr=1e-3, weight_decay=1e-4, fg_weight=4.0, epochs=8, episodes_per_epoch=400,
                                    val_episodes=100, test_episodes=EVAL_EPISODES, workers=0, save_every_min=0.0)


def default_img_size(benchmark: str) -> int:
    """Image side the benchmark is trained and evaluated at unless told otherwise."""
    if benchmark not in BENCHMARK_DEFAULTS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARK_DEFAULTS)}")
    return BENCHMARK_DEFAULTS[benchmark]["img_size"]


# ---------------------------------------------------------------------------------------------- benchmarks
@dataclass(frozen=True)
class BenchmarkRules:
    """What a benchmark accepts, read by the flag checks (dcama/flags.py) before anything is loaded and by its
    data set class."""

    n_folds: int = 1  # folds 0..n_folds-1; 1: the benchmark has no folds (fold 0 only)
    # The largest K (support images) that every class allows, when the benchmark fixes it; None when it depends
    # on the data (classes with fewer than K+1 images are then skipped with a warning when the data is read).
    max_shot: int | None = None
    needs_root: bool = True  # whether the data lives in a folder (--datapath); shapes is generated
    takes_episodes: bool = True  # False: the protocol fixes the episodes and `episodes` is ignored


BENCHMARK_RULES: dict[str, BenchmarkRules] = {
    "coco": BenchmarkRules(n_folds=4),
    "pascal": BenchmarkRules(n_folds=4),
    "fss": BenchmarkRules(max_shot=9, takes_episodes=False),  # 10 images per class, one of them the query
    "folder": BenchmarkRules(takes_episodes=False),
    "shapes": BenchmarkRules(n_folds=4, max_shot=999, needs_root=False),  # 1000 images per class and split
}


# ----------------------------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class BackboneSpec:
    """What the head needs to know about a backbone, and where its pretrained weights come from."""

    timm_name: str
    kind: str  # "resnet" or "swin"
    depths: tuple[int, int, int, int]  # blocks per stage
    channels: tuple[int, int, int, int]  # feature channels per stage
    weights_file: str  # the file the authors used, or a description for the demo backbones
    published: bool = False  # one of the paper's backbones (the others are small demos for CPU runs and tests)

    @property
    def stack_ids(self) -> list[int]:
        """Cumulative block counts: block features [stack_ids[s-1], stack_ids[s]) belong to stage s+1."""
        return list(accumulate(self.depths))


BACKBONES: dict[str, BackboneSpec] = {
    "swin_b": BackboneSpec("swin_base_patch4_window12_384", "swin", (2, 2, 18, 2), (128, 256, 512, 1024),
                           "swin_base_patch4_window12_384_22kto1k.pth", published=True),
    "resnet50": BackboneSpec("resnet50", "resnet", (3, 4, 6, 3), (256, 512, 1024, 2048),
                             "resnet50_a1h-35c100f8.pth", published=True),
    "resnet101": BackboneSpec("resnet101", "resnet", (3, 4, 23, 3), (256, 512, 1024, 2048),
                              "resnet101_a1h-36d3f2aa.pth", published=True),
    "resnet18": BackboneSpec("resnet18", "resnet", (2, 2, 2, 2), (64, 128, 256, 512),
                             "a timm resnet18 state dict (.pth)"),
    "resnet34": BackboneSpec("resnet34", "resnet", (3, 4, 6, 3), (64, 128, 256, 512),
                             "a timm resnet34 state dict (.pth)"),
}

# Downsampling of each stage's feature maps relative to the image (stage 1: 1/4, ..., stage 4: 1/32).
STAGE_STRIDES = (4, 8, 16, 32)
SWIN_DEFAULT_IMG_SIZE = PUBLISHED_IMG_SIZE
SWIN_WINDOW = 12


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def img_size_problem(name: str, side: int) -> str:
    """'' when backbone `name` takes square images of this side, else one line saying which sides it takes."""
    stride = STAGE_STRIDES[-1]
    if backbone_spec(name).kind == "resnet":
        # Below the total stride stage 4 is empty; other sides make the 1/4 and 1/8 maps disagree by a pixel.
        if side >= stride and side % stride == 0:
            return ""
        return f"{name} takes a side that is a positive multiple of {stride} (its total stride): 32, 64, 96, ..."
    if _swin_fits(side):
        return ""
    sides = [s for s in range(stride, 2 * SWIN_DEFAULT_IMG_SIZE + 1, stride) if _swin_fits(s)]
    return (f"{name} takes a side that is a multiple of {stride} whose stage grids (side/4 to side/32) are "
            f"multiples of its {SWIN_WINDOW}-token window or at most {SWIN_WINDOW}: "
            f"{', '.join(map(str, sides))}, ...")


def _swin_fits(side: int) -> bool:
    # Microsoft's Swin (the layout of the released weights) needs every stage's grid to be a multiple of the
    # window or no larger than it (then the window shrinks to the grid); timm would pad instead.
    stride = STAGE_STRIDES[-1]
    grids = [side // s for s in STAGE_STRIDES]
    return side >= stride and side % stride == 0 and all(g <= SWIN_WINDOW or g % SWIN_WINDOW == 0 for g in grids)
