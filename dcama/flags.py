"""Checks of the command-line flags of train/run.py, eval/run.py and eval/predict.py, made before anything is
built or written, and the one-line errors of the files a command writes.

Each failure is a ConfigError whose message is one line naming the flag, in its command-line form, and what
it accepts; the command lines print it and exit with status 2. What a benchmark accepts is read from its data
set class (`n_folds`, `max_shot`, `needs_root`) and what a backbone accepts from `dcama.backbones`, so a new
benchmark or backbone brings its own rules. An output that cannot be written once the work is done (a full
disk) is an OutputError naming the path and the reason (`writing`); `write_failure` words it, for the training
run's write errors too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from .backbones import BACKBONES, img_size_problem
from .checkpoint import folder_not_file
from .data import BENCHMARKS

__all__ = ["ConfigError", "FlagParser", "OutputError", "check_at_least", "check_benchmark",
           "check_checkpoint_model", "check_choice", "check_device", "check_file", "check_fraction",
           "check_img_size", "check_non_negative", "check_output", "check_positive", "check_seeds", "check_supports",
           "error_line", "flag", "one_line_warnings", "output_problem", "unused_episodes_note", "write_failure",
           "writing"]


class ConfigError(ValueError):
    """A flag value or a combination of flags that cannot run; the message is one line naming the flag."""


def flag(name: str) -> str:
    """The command-line form of a setting: img_size -> --img-size."""
    return "--" + name.replace("_", "-")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{flag(name)} {value}: choose from {', '.join(choices)}")


def check_at_least(name: str, value: int | None, minimum: int) -> None:
    """An integer setting (None: unset, allowed) that must be >= minimum."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{flag(name)} {value}: must be an integer >= {minimum}")


def check_positive(name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag(name)} {value}: must be a finite number > 0")


def check_non_negative(name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{flag(name)} {value}: must be a finite number >= 0")


def check_fraction(name: str, value: float) -> None:
    """A number in [0, 1) (SGD momentum)."""
    if not (_is_number(value) and 0 <= value < 1):
        raise ConfigError(f"{flag(name)} {value}: must be a number in [0, 1)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_benchmark(benchmark: str, datapath: str | None, fold: int, nshot: int) -> None:
    """The benchmark, its data folder, the fold and K, as the benchmark's data set class allows them."""
    check_choice("benchmark", benchmark, BENCHMARKS)
    dataset = BENCHMARKS[benchmark]
    if dataset.needs_root and datapath is None:
        raise ConfigError(f"--datapath is needed for --benchmark {benchmark} (the folder that holds its data)")
    if datapath is not None and not os.path.isdir(datapath):
        raise ConfigError(f"--datapath {datapath}: no such folder")
    check_at_least("fold", fold, 0)
    if fold >= dataset.n_folds:
        allowed = "no folds (only --fold 0)" if dataset.n_folds == 1 else f"folds 0..{dataset.n_folds - 1}"
        raise ConfigError(f"--fold {fold}: {benchmark} has {allowed}")
    check_at_least("nshot", nshot, 1)
    if dataset.max_shot is not None and nshot > dataset.max_shot:
        raise ConfigError(f"--nshot {nshot}: {benchmark} allows 1..{dataset.max_shot} (each class has "
                          f"{dataset.max_shot + 1} images and one is the query)")


def unused_episodes_note(benchmark: str, name: str, value: int | None) -> str | None:
    """The note for an episode count given to a benchmark whose protocol fixes the episodes (FSS-1000 and
    folder: every image of the split is a query once), None when the count is used or not given."""
    if value is None or BENCHMARKS[benchmark].takes_episodes:
        return None
    return (f"note: {flag(name)} {value} is not used: {benchmark} episodes are every image of the split once, "
            f"its benchmark's protocol")


def check_img_size(backbone: str, img_size: int, built_for: int | None = None) -> None:
    """A backbone the project knows, and an image side it takes; `built_for`: the side a loaded model was
    built for (Swin), which it must be."""
    check_choice("backbone", backbone, BACKBONES)
    check_at_least("img_size", img_size, 1)
    problem = img_size_problem(backbone, img_size)
    if problem:
        raise ConfigError(f"--img-size {img_size}: {problem}")
    if built_for is not None and img_size != built_for:
        raise ConfigError(f"--img-size {img_size}: this checkpoint's {backbone} model is built for {built_for}x"
                          f"{built_for} images (--img-size {built_for})")


def check_checkpoint_model(backbone: str | None, img_size: int | None) -> None:
    """--backbone and --img-size of a command that loads a checkpoint, each None when the checkpoint decides:
    the size is checked against the backbone here when both are given, else once the model is loaded."""
    if backbone is not None:
        check_choice("backbone", backbone, BACKBONES)
    if img_size is not None and backbone is not None:
        check_img_size(backbone, img_size)
    else:
        check_at_least("img_size", img_size, 1)


def check_seeds(seeds: list[int] | None) -> None:
    """--seeds (eval/run.py; None: unset): at least 2 distinct episode seeds >= 0, for a spread."""
    if seeds is None:
        return
    for seed in seeds:
        check_at_least("seeds", seed, 0)
    if len(seeds) < 2 or len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: give at least 2 distinct seeds (one seed: --seed)")


def check_supports(supports: list[list[str]]) -> None:
    """--support (eval/predict.py), given once per support: IMAGE MASK each (one class), or CLASS IMAGE MASK
    each (N classes in one label map); one form per command."""
    for values in supports:
        if len(values) not in (2, 3):
            raise ConfigError(f"--support {' '.join(values)}: give IMAGE MASK, or CLASS IMAGE MASK for several classes")
    if len({len(values) for values in supports}) > 1:
        raise ConfigError("--support: give every support as IMAGE MASK (one class) or every one as CLASS IMAGE MASK "
                          "(several classes), not both forms")


@contextmanager
def one_line_warnings(category: type[Warning]) -> Iterator[None]:
    """In the block, each warning of `category` (a command's notes on its input) printed as one line on
    stderr, 'warning: <message>', every time; other warnings as Python shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", category)
        shown = warnings.showwarning

        def show(message: Warning | str, kind: type[Warning], *rest: Any, **kwargs: Any) -> None:
            if issubclass(kind, category):
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, kind, *rest, **kwargs)

        warnings.showwarning = show
        yield


def check_file(name: str, path: str | None, missing: str = "") -> None:
    """A file flag (None: unset, allowed) that must name an existing file; for a folder, the weight files in
    it are suggested; `missing`: what to do instead, added to the message of a path that does not exist."""
    if path is None or os.path.isfile(path):
        return
    if not os.path.isdir(path):
        raise ConfigError(f"{flag(name)} {path}: no such file" + (f" ({missing})" if missing else ""))
    raise ConfigError(f"{flag(name)} {path}: {folder_not_file(path)}")


def check_output(name: str, path: str | os.PathLike | None, *, folder: bool) -> None:
    """An output flag (None: unset, allowed): a file (folder=False) or a folder this process can create or
    write in. Refused: an existing entry of the other kind, a path under a file, a folder without write
    permission (files are written as a temporary file renamed, so a file's folder must be writable)."""
    if path is None:
        return
    path = os.fspath(path)
    problem = output_problem(path, folder)
    if problem:
        raise ConfigError(f"{flag(name)} {path}: {problem}")


def output_problem(path: str | os.PathLike, folder: bool) -> str:
    """Why `path` cannot be written as a file or a folder ('' when nothing is seen against it)."""
    target = os.path.abspath(path)
    if os.path.isdir(target) and not folder:
        return "is a folder; give a file name"
    if os.path.exists(target) and not os.path.isdir(target) and folder:
        return "is a file, not a folder"
    nearest = target if folder else os.path.dirname(target)
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        return f"{nearest} is a file, so nothing can be written under it"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"no permission to write in {nearest}"
    return ""


def check_device(device: str | torch.device | None) -> torch.device:
    """The device --device names (None: CUDA when there is one, else the CPU), if this machine has it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: choose cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.is_available() else 0
    if dev.type == "cuda" and count == 0:
        raise ConfigError(f"--device {device}: this machine has no CUDA device (torch sees none); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return dev


class OutputError(OSError):
    """A result file or folder that could not be written; the message names the path and the system's reason."""


@contextmanager
def writing(path: str | os.PathLike, folder: bool = False) -> Iterator[None]:
    """The OSErrors of the block that writes the file (or makes the folder) `path`, a full disk or a missing
    permission, as one OutputError naming `path` and the reason."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(write_failure(path, err, folder)) from None


def write_failure(path: str | os.PathLike, err: OSError, folder: bool = False) -> str:
    """The one line for a file (or folder) `path` that could not be written, whichever command failed:
    'cannot write <path>: <reason>', the reason seen on the path when there is one (the system's can mislead:
    making a folder under a file is "File exists"), else the system's (a full disk)."""
    reason = output_problem(path, folder) or err.strerror or str(err)
    return f"cannot write {os.fspath(path)}: {reason}"


def error_line(err: BaseException) -> str:
    """The one line a command prints for an error it stops on: the project's message or, for an OSError the
    system raised, the file and the system's reason."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


class FlagParser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is left to --help) and the command line that gives a set of
    values back (what a stopped run prints to resume)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def add_threads(self, default: str = "torch's") -> None:
        """--threads, the one definition every command shares (checked with check_at_least("threads", n, 0))."""
        self.add_argument("--threads", type=int, default=None,
                          help=f"torch CPU threads (0: torch's default; default: {default})")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (--help lists the flags)\n")

    def flags_for(self, values: dict[str, Any]) -> list[str]:
        """The flags that give `values` (a dict of dest -> value), those that differ from the defaults."""
        out = []
        for action in self._actions:
            if not action.option_strings or action.dest not in values:
                continue
            value = values[action.dest]
            if value == action.default:
                continue
            option = action.option_strings[0]
            if action.nargs == 0 or (action.nargs == "?" and value == action.const):  # switches, bare --resume
                out.append(option)
            else:
                out += [option, str(value)]
        return out
