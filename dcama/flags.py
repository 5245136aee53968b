"""Checks of the command-line flags of train/run.py, eval/run.py and eval/predict.py, made before anything is
built or written, and the one-line errors of the files a command writes.

Each failure is a ConfigError whose message is one line naming the flag, in its command-line form, and what
it accepts; the command lines print it and exit with status 2. A check that Python entry points make too
(the device of `dcama.predict.load_model`) raises an ArgumentError, worded for Python (`device='cuda'`)
and by `error_line` for the command line (`--device cuda`). What a benchmark accepts (`BENCHMARK_RULES`:
folds, K, a data folder) and what a backbone accepts (`img_size_problem`) are read from dcama/config.py, which
the data set classes and the backbones read too. Like config.py this module imports no torch: the command
lines check their flags before torch is imported. An output that cannot be written once the work is done (a full
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

from .config import BACKBONES, BENCHMARK_RULES, CPU_THREADS, ArgumentError, ConfigError, flag, img_size_problem
from .files import folder_not_file

__all__ = ["ArgumentError", "ConfigError", "FlagParser", "OutputError", "check_at_least", "check_benchmark",
           "check_checkpoint_model", "check_choice", "check_file", "check_folder", "check_fraction",
           "check_img_size", "check_non_negative", "check_output", "check_positive", "check_seeds", "check_supports",
           "error_line", "flag", "one_line_warnings", "output_problem", "unused_episodes_note", "write_failure",
           "writing"]


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
    check_choice("benchmark", benchmark, BENCHMARK_RULES)
    dataset = BENCHMARK_RULES[benchmark]
    if dataset.needs_root and datapath is None:
        raise ConfigError(f"--datapath is needed for --benchmark {benchmark} (the folder that holds its data)")
    check_folder("datapath", datapath)
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
    if value is None or BENCHMARK_RULES[benchmark].takes_episodes:
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


def check_folder(name: str, path: str | None) -> None:
    """A folder flag (None: unset, allowed) that must name an existing folder."""
    if path is not None and not os.path.isdir(path):
        raise ConfigError(f"{flag(name)} {path}: no such folder")


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
    permission or on a read-only file system (files are written as a temporary file renamed, so a file's
    folder must be writable)."""
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
    if _read_only(nearest):  # os.access refuses it too, but no permission would help
        return f"{nearest} is on a read-only file system"
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"no permission to write in {nearest}"
    return ""


def _read_only(folder: str) -> bool:
    """Whether `folder` lies on a file system mounted read-only (False when that cannot be told)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
    """The one line a command prints for an error it stops on: the project's message (an ArgumentError's
    naming the flag), or, for an OSError the system raised, the file and the system's reason."""
    if isinstance(err, ArgumentError):
        return err.worded(command_line=True)
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


class FlagParser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is left to --help) and the command line that gives a set of
    values back (what a stopped run prints to resume)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def add_threads(self) -> None:
        """--threads, the one definition every command shares, with the one default (config.CPU_THREADS);
        checked with check_at_least("threads", n, 0)."""
        self.add_argument("--threads", type=int, default=CPU_THREADS,
                          help=f"torch CPU threads on a CPU device (default {CPU_THREADS}, in every command; 0: "
                               "torch's default, one per core); the scores depend on it: docs/training.md")

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
