"""Train DCAMA: `python train/run.py` (embedded shapes benchmark on CPU) or the published recipe, e.g.
`torchrun --nproc_per_node 4 train/run.py --benchmark coco --datapath DATA --fold 0 --backbone swin_b
--backbone-weights swin_b.pth`. Every flag left out takes the benchmark's default (dcama/config.py); with
--resume, the value the run was started with (a few may be changed: docs/training.md, "Resume").

SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 finish the current step, save last.pt and print the command that resumes.
What is saved when, what a second signal does and the exit statuses: docs/training.md, "Interruptions"."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import dcama  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout that was not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Torch-free: the flags are parsed and checked before torch is imported (in `run`), so that a flag error or
# --help takes a fraction of a second instead of the seconds torch and the model take to import.
from dcama.config import (AMP_MODES, ATTN_IMPLS, BACKBONES, BENCHMARK_DEFAULTS, BENCHMARK_RULES, DEFAULT_BENCHMARK,
                          EVAL_EPISODES, OPTIMIZERS, SHARED_DEFAULTS, TEST_SEED)
from dcama.flags import ConfigError, FlagParser, flag
from dcama.settings import TrainConfig, resolve_config

if TYPE_CHECKING:
    from dcama.train import TrainResult

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: "try again later", what a requeue script looks for


def build_parser() -> FlagParser:
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default=None, choices=list(BENCHMARK_DEFAULTS), help=f"default: {DEFAULT_BENCHMARK}")
    p.add_argument("--datapath", default=None,
                   help="benchmark root folder; for folder, the folder of class folders (not needed for shapes)")
    p.add_argument("--fold", type=int, default=None, help=f"default: {SHARED_DEFAULTS['fold']}")
    p.add_argument("--backbone", default=None, help=", ".join(BACKBONES))
    p.add_argument("--backbone-weights", default=None, help="ImageNet weights file of the backbone")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--bsz", type=int, default=None, help="episodes per step per process")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None,
                   help=f"SGD momentum (Nesterov when > 0; default: {SHARED_DEFAULTS['momentum']})")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--fg-weight", type=float, default=None,
                   help="cross-entropy weight of the foreground pixels (1 = the paper's loss; shapes default "
                        f"{BENCHMARK_DEFAULTS['shapes']['fg_weight']:g})")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--nshot", type=int, default=None,
                   help=f"support images per episode (K-shot training; default: {SHARED_DEFAULTS['nshot']})")
    p.add_argument("--attn-impl", default=None, choices=ATTN_IMPLS,
                   help="auto (default): fused Triton kernel on CUDA, PyTorch SDPA on CPU")
    p.add_argument("--amp", default=None, choices=AMP_MODES, help=f"default: {SHARED_DEFAULTS['amp']}")
    p.add_argument("--logdir", default=None, help="run folder (default: logs/<benchmark>-fold<f>-...-<time>)")
    p.add_argument("--resume", nargs="?", const="last", default=None,
                   help="checkpoint to continue from, with the settings it was started with; bare --resume "
                        "continues <logdir>/last.pt")
    p.add_argument("--init", default=None,
                   help="fine-tune a DCAMA checkpoint (ours or the authors'): its weights, backbone and image size, "
                        "a new optimiser and schedule")
    save_defaults = ", ".join(f"{name} {d['save_every_min']:g}" for name, d in BENCHMARK_DEFAULTS.items())
    p.add_argument("--save-every-min", type=float, default=None,
                   help=f"minutes between checkpoints inside an epoch; 0: at epoch ends only ({save_defaults})")
    p.add_argument("--seed", type=int, default=None, help=f"default: {SHARED_DEFAULTS['seed']}")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes per process")
    p.add_argument("--episodes-per-epoch", type=int, default=None)
    p.add_argument("--val-episodes", type=int, default=None)
    p.add_argument("--test-episodes", type=int, default=None,
                   help=f"after training, evaluate best.pt on this many test episodes (seed {TEST_SEED}); 0 skips")
    p.add_threads()
    p.set_defaults(threads=None)  # like every flag here: the default (CPU_THREADS), or on a resume the run's own
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def resume_hint(cfg: TrainConfig, logdir: Path, lead: str = "resume with") -> str:
    """`lead`, then the command that continues this run from `<logdir>/last.pt` (its settings are in the
    checkpoint, so only this start's options are given, with the same launcher), which can be pasted as it is
    on one node; on several, each node adds its torchrun options."""
    values = {"logdir": str(logdir), "resume": "last", "progress": cfg.progress}
    script = os.path.relpath(os.path.abspath(__file__))
    world, local = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("LOCAL_WORLD_SIZE", "1")
    launcher = ["python"] if world == 1 else ["torchrun", "--nproc_per_node", local]
    command = shlex.join([*launcher, script, *build_parser().flags_for(values)])
    nodes = " (on each node, with its torchrun options as in this run)" if world > int(local) else ""
    return f"{lead}{nodes}: {command}"


def report(result: TrainResult) -> None:
    """Where the results are and the command to run next."""
    if result.test is not None:
        t = result.test
        print(f"test ({t['episodes']} episodes, novel classes, seed {TEST_SEED}): mIoU {t['miou']:.2f}  "
              f"FB-IoU {t['fb_iou']:.2f}")
    print(f"best validation mIoU {result.best_val_miou:.2f} at epoch {result.best_epoch}/{result.epochs}")
    print(f"best checkpoint: {result.best_checkpoint}")
    # A test.json this start did not write (a resume with --test-episodes 0) scored an earlier best.pt.
    earlier = " (an earlier start's test)" if result.test is None else ""
    files = [p.name + ("/" if p.is_dir() else earlier if p.name == "test.json" else "")
             for p in sorted(result.logdir.iterdir()) if not p.name.startswith(".")]
    print(f"results in {result.logdir}: {', '.join(files)}")
    print(f"next, evaluate it: {eval_command(result)}")


def eval_command(result: TrainResult) -> str:
    """The eval/run.py command that repeats the run's test: its episodes, and the batch size, workers, CPU
    threads, attention and precision the test ran with, so the same scores at the same speed."""
    cfg = result.config
    flags = ["--checkpoint", str(result.best_checkpoint), "--benchmark", cfg.benchmark,
             *(["--datapath", cfg.datapath] if cfg.datapath else []), "--fold", str(cfg.fold),
             "--nshot", str(cfg.nshot), "--bsz", str(cfg.bsz)]
    if cfg.test_episodes not in (0, EVAL_EPISODES) and BENCHMARK_RULES[cfg.benchmark].takes_episodes:
        flags += ["--episodes", str(cfg.test_episodes)]
    if cfg.workers:
        flags += ["--workers", str(cfg.workers)]
    # Settings whose eval/run.py defaults are the shared ones: given only where the run changed them.
    for name in ("attn_impl", "amp", "threads"):
        if getattr(cfg, name) != SHARED_DEFAULTS[name]:
            flags += [flag(name), str(getattr(cfg, name))]
    script = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "eval", "run.py"))
    return shlex.join(["python", script, *flags])


def main(argv: list[str] | None = None, mute_signals: bool = False) -> int:
    """The command; `mute_signals` (the script's own process): outside train(), which handles the stop signals
    while it runs and then puts this back, they are ignored, so that once train() has ended the run (saved
    after a stop: 75) no signal changes the exit status."""
    try:
        cfg = resolve_config(parse_args(argv))  # every flag checked before torch is imported
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(cfg, mute_signals)


def run(cfg: TrainConfig, mute_signals: bool = False) -> int:
    """Train with checked settings and report; returns the exit status. Imports torch and the engine here,
    once the flags are known to be good."""
    import torch

    if not torch.cuda.is_available():  # the Triton kernels can then only run in the interpreter, chosen before import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dcama.checkpoint import CheckpointError
    from dcama.data import DatasetFileError
    from dcama.runtime import Interrupted, mute_stop_signals
    from dcama.train import NonFiniteLossError, RunStopped, WriteError, train

    if mute_signals:
        mute_stop_signals()

    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    try:
        result = train(cfg)
    except RunStopped as stop:
        if rank0:
            print(stop)
            print(resume_hint(cfg, stop.checkpoint.parent), flush=True)
        return EXIT_STOPPED
    except Interrupted as err:
        if rank0:
            print(f"stopped at once by {err}", file=sys.stderr)
        return err.exit_status
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        if err.checkpoint is not None and rank0:
            print(resume_hint(cfg, err.checkpoint.parent, "once it can be written, resume with"), file=sys.stderr)
        return 1
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, DatasetFileError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank0:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(mute_signals=True))
