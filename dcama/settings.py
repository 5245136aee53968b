"""The settings of a training run, without torch: `TrainConfig`, filled from the benchmark's defaults and
checked (ConfigError, one line naming the flag), its run folder chosen, and the settings of a resumed run: those
its checkpoint recorded, with the few changes a resume may make (`resumed_config`).

train/run.py resolves its flags here before it imports torch, so that a bad flag is reported at once;
`dcama.train` calls `resumed_config` once it has read the checkpoint, and completes a fine-tuning run's settings
(`FROM_INIT`) once it has read the --init checkpoint (`read_init`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import AMP_MODES, ATTN_IMPLS, BACKBONES, BENCHMARK_DEFAULTS, DEFAULT_BENCHMARK, OPTIMIZERS
from .files import folder_holder
from .flags import (ConfigError, check_at_least, check_benchmark, check_choice, check_file, check_folder,
                    check_fraction, check_img_size, check_non_negative, check_output, check_positive, flag)

__all__ = ["FROM_INIT", "PER_START", "RESUME_CHANGEABLE", "TrainConfig", "fill_defaults", "in_use",
           "previous_checkpoint", "resolve_config", "resumed_config", "run_clash"]


@dataclass
class TrainConfig:
    """Every knob of a run; None means "the benchmark's default" (dcama.config.BENCHMARK_DEFAULTS) or, for a
    resumed run, the value the run was started with (its checkpoint's)."""

    benchmark: str | None = None  # None: dcama.config.DEFAULT_BENCHMARK ("shapes")
    datapath: str | None = None
    fold: int | None = None
    backbone: str | None = None
    backbone_weights: str | None = None
    img_size: int | None = None
    bsz: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    fg_weight: float | None = None  # cross-entropy weight of the foreground class (background: 1)
    epochs: int | None = None
    nshot: int | None = None
    attn_impl: str | None = None
    amp: str | None = None
    logdir: str | None = None
    resume: str | None = None  # a checkpoint path, or "last" for <logdir>/last.pt
    init: str | None = None  # a DCAMA checkpoint to fine-tune (ours or the authors'): its backbone, size, weights
    save_every_min: float | None = None  # minutes between checkpoints inside an epoch; 0: at epoch ends only
    seed: int | None = None
    workers: int | None = None
    episodes_per_epoch: int | None = None  # None: the training split's own length
    val_episodes: int | None = None
    test_episodes: int | None = None  # after training, the best checkpoint on the test split; 0 skips
    threads: int | None = None  # torch CPU threads on a CPU device (runtime.cpu_threads); 0: torch's default
    progress: bool = True


# Settings a resumed run may change (applied from its next step, and printed): how long it goes on, what it
# does at the end, where it reads the data and how it runs, not what the steps compute. Every other setting
# is the one the run was started with; giving it another value is refused.
RESUME_CHANGEABLE = ("epochs", "test_episodes", "save_every_min", "datapath", "workers", "threads", "attn_impl")
# Options of one start, not settings of the run: never taken from a checkpoint.
PER_START = ("logdir", "resume", "progress")
# Settings a fine-tuning run (--init) takes from its checkpoint, not from the benchmark's defaults: they stay as
# given (None) here until dcama.train.read_init has read the file.
FROM_INIT = ("backbone", "img_size")

_CHOICES = (("benchmark", BENCHMARK_DEFAULTS), ("backbone", BACKBONES), ("optimizer", OPTIMIZERS),
            ("amp", AMP_MODES), ("attn_impl", ATTN_IMPLS))
_AT_LEAST = (("fold", 0), ("nshot", 1), ("img_size", 1), ("epochs", 1), ("bsz", 1), ("episodes_per_epoch", 1),
             ("val_episodes", 1), ("test_episodes", 0), ("seed", 0), ("workers", 0), ("threads", 0))


def previous_checkpoint(path: str | Path) -> Path:
    """The file a checkpoint's predecessor is kept in: last.pt -> last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def fill_defaults(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` with every None filled from the benchmark's defaults (nothing else checked)."""
    benchmark = DEFAULT_BENCHMARK if cfg.benchmark is None else cfg.benchmark
    check_choice("benchmark", benchmark, BENCHMARK_DEFAULTS)
    defaults = {**BENCHMARK_DEFAULTS[benchmark], "benchmark": benchmark}
    return TrainConfig(**{k: (defaults[k] if v is None and k in defaults else v)
                          for k, v in dataclasses.asdict(cfg).items()})


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` checked (ConfigError, one line naming the flag) and with its run folder chosen; for a new
    run every None filled from the benchmark's defaults. A resumed run (`resume` set) keeps its Nones, which
    stand for the values in its checkpoint (`resumed_config`), and only the values given are checked here.
    A fine-tuning run (`init` set) keeps its FROM_INIT settings as given. Looks at files and folders but reads
    none."""
    if cfg.init is not None:
        _check_init(cfg)
    if cfg.resume is None:
        out = fill_defaults(cfg)
        if out.init is not None:
            out = dataclasses.replace(out, **{name: getattr(cfg, name) for name in FROM_INIT})
        _check_settings(out)
    else:
        out = dataclasses.replace(cfg)
        _check_values(out)
        if out.logdir is None and out.resume != "last":
            out.logdir = str(Path(out.resume).parent)  # resuming a file continues the run in its own folder
    if out.logdir is None:
        if out.resume == "last":
            raise ConfigError("--resume without a path needs --logdir (the run folder holding last.pt)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        model = out.backbone or "finetuned"  # a fine-tuning run's backbone is known once its --init file is read
        out.logdir = f"logs/{out.benchmark}-fold{out.fold}-{model}-{out.nshot}shot-{stamp}"
    check_output("logdir", out.logdir, folder=True)  # the default's too: a file named logs in the working folder
    holder = folder_holder(out.logdir)
    if holder is not None:  # before what a resume would advise: a run that has not saved yet is still a run
        raise ConfigError(in_use(out.logdir, holder))
    if out.resume is not None:
        out.resume = str(Path(out.logdir) / "last.pt") if out.resume == "last" else out.resume
        if not previous_checkpoint(out.resume).is_file():  # else the resume falls back to last.prev.pt
            check_file("resume", out.resume, missing="to start a new run leave out --resume")
    clash = run_clash(out)
    if clash:
        raise ConfigError(clash)
    return out


def _check_init(cfg: TrainConfig) -> None:
    """--init on its own: a file, and not given with the flags it contradicts whatever it holds (--resume, and
    --backbone-weights: the checkpoint holds its backbone's weights). What contradicts the file's model (its
    backbone, its image side) is refused once it is read (dcama.train.read_init)."""
    if cfg.resume is not None:
        raise ConfigError(f"--init {cfg.init} with --resume {cfg.resume}: --init starts a new run from a checkpoint's "
                          "weights, --resume continues a run; give one of them")
    check_file("init", cfg.init)
    if cfg.backbone_weights is not None:
        raise ConfigError(f"--backbone-weights {cfg.backbone_weights}: --init {cfg.init} holds the backbone's "
                          "weights; leave it out")


def in_use(logdir: str | Path, holder: str) -> str:
    """The refusal of a run folder another live run holds (its pid and host)."""
    return f"--logdir {logdir} is in use by another run ({holder}): wait for it to end or choose another --logdir"


def run_clash(cfg: TrainConfig) -> str:
    """Why the run may not use its folder ('' when it may): the folder holds another run's checkpoints."""
    logdir = Path(cfg.logdir)
    held = [p for p in (logdir / "last.pt", logdir / "last.prev.pt") if p.exists()]
    if not held:
        return ""
    if cfg.resume is None:
        return f"--logdir {logdir} already holds a run ({held[0].name}); pass --resume to continue it or choose " \
               "another --logdir"
    if Path(cfg.resume).resolve().parent != logdir.resolve():
        return f"--logdir {logdir} already holds a run ({held[0].name}): --resume {cfg.resume} would continue " \
               "into it; leave out --logdir to continue in the checkpoint's own folder"
    return ""


def resumed_config(given: TrainConfig, saved: dict[str, Any], path: str, epochs_done: int
                   ) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """The settings of a run resumed from the checkpoint `path`: those it recorded (`saved`, its
    "train_config"), with the values `given` for RESUME_CHANGEABLE settings; returns them checked, and the
    changes ({name: (recorded, given)}). A given value of any other setting that differs from the recorded
    one, or fewer --epochs than the checkpoint has done, is a ConfigError naming the flags."""
    values, changed, refused = {}, {}, []
    for name, mine in dataclasses.asdict(given).items():
        if name in PER_START or name not in saved:
            values[name] = mine  # an option of this start, or a setting the checkpoint did not record
        elif mine is None or mine == saved[name]:
            values[name] = saved[name]
        elif name in RESUME_CHANGEABLE:
            values[name], changed[name] = mine, (saved[name], mine)
        else:
            refused.append(name)
    if refused:
        raise ConfigError(f"{', '.join(f'{flag(n)} {getattr(given, n)}' for n in refused)}: {path} was started "
                          f"with {', '.join(f'{flag(n)} {saved[n]}' for n in refused)}, which a resumed run keeps "
                          f"(to change {'it' if len(refused) == 1 else 'them'}, start a new run in another --logdir)")
    out = fill_defaults(TrainConfig(**values))  # settings a checkpoint of an older version did not record
    _check_settings(out)
    if out.epochs < epochs_done:
        raise ConfigError(f"--epochs {out.epochs}: {path} has done {epochs_done} epochs already")
    return out, changed


def _check_values(cfg: TrainConfig) -> None:
    """Each value given (not None) on its own."""
    for name, choices in _CHOICES:
        if getattr(cfg, name) is not None:
            check_choice(name, getattr(cfg, name), choices)
    for name, check in (("lr", check_positive), ("fg_weight", check_positive), ("weight_decay", check_non_negative),
                        ("save_every_min", check_non_negative), ("momentum", check_fraction)):
        if getattr(cfg, name) is not None:
            check(name, getattr(cfg, name))
    for name, minimum in _AT_LEAST:
        check_at_least(name, getattr(cfg, name), minimum)
    check_folder("datapath", cfg.datapath)
    check_file("backbone_weights", cfg.backbone_weights)


def _check_settings(cfg: TrainConfig) -> None:
    """A whole config (no None left but the optional ones): every value, and the values together."""
    _check_values(cfg)
    check_benchmark(cfg.benchmark, cfg.datapath, cfg.fold, cfg.nshot)
    if None not in (cfg.backbone, cfg.img_size):  # None: a fine-tuning run's, known once its --init file is read
        check_img_size(cfg.backbone, cfg.img_size)
