"""Checks of the command-line flags of train/run.py and eval/run.py, made before anything is built or written.

Each failure is a ConfigError whose message is one line naming the flag, in its command-line form, and what
it accepts; the command lines print it and exit with status 2. What a benchmark accepts is read from its data
set class (`n_folds`, `max_shot`, `needs_root`) and what a backbone accepts from `dcama.backbones`, so a new
benchmark or backbone brings its own rules.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable
from typing import Any, NoReturn

from .backbones import BACKBONES, img_size_problem
from .data import BENCHMARKS

__all__ = ["ConfigError", "FlagParser", "check_at_least", "check_benchmark", "check_choice", "check_file",
           "check_fraction", "check_img_size", "check_non_negative", "check_positive", "flag"]


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


def check_img_size(backbone: str, img_size: int) -> None:
    """A backbone the project knows, and an image side it takes."""
    check_choice("backbone", backbone, BACKBONES)
    check_at_least("img_size", img_size, 1)
    problem = img_size_problem(backbone, img_size)
    if problem:
        raise ConfigError(f"--img-size {img_size}: {problem}")


def check_file(name: str, path: str | None) -> None:
    """A file flag (None: unset, allowed) that must name an existing file."""
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{flag(name)} {path}: no such file")


class FlagParser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is left to --help) and the command line that gives a set of
    values back (what a stopped run prints to resume)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

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
