"""Every torch file the project reads or writes: its checkpoints and the backbones' ImageNet weights.

One place for the file format, the atomic save, the `torch.load(weights_only=True)` load and the errors a
user sees. What the keys mean is left to the modules that own them: the authors' released layout is converted
beside the model (`dcama.model.checkpoint_filter_fn`), the ImageNet files beside the backbone
(`BlockFeatures.convert_state_dict`).

This project's file: {"format": "dcama-triton", "version": 2, "config": model.config,
"state_dict": model.state_dict(), **extra} (docs/model.md, "Checkpoints"). A training run's `last.pt` holds
the trained part only: its "state_dict" lacks the frozen backbone, which the run folder holds once, in
`backbone.pt`, named with its digest by the checkpoint's "backbone_file" entry; `checkpoint_parts` puts the
two together. Buffers a model computes itself (non-persistent: the positional encodings) are in no file of
version 2; the files that hold them (version 1, the authors') are read after checking them.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile
from typing import Any

import torch
from torch import nn

from .config import PUBLISHED_IMG_SIZE
from .files import atomic_open, folder_not_file

__all__ = ["BACKBONE_FILE", "CheckpointError", "FORMAT", "VERSION", "checkpoint_parts", "folder_not_file",
           "is_own_checkpoint", "load_checkpoint_file", "load_fitting_state", "load_torch_file", "save_backbone",
           "save_checkpoint", "state_dict_mismatch", "state_digest", "trained_img_size"]

FORMAT = "dcama-triton"
VERSION = 2  # 2: no computed buffers; "backbone_file" (1: every buffer, the whole model in every file)
_READS = (1, 2)
_RESERVED = ("format", "version", "config", "state_dict", "backbone_file")
# The frozen part of a DCAMA model (its `backbone` module), stored once per run folder in this file.
BACKBONE_FILE = "backbone.pt"
_FROZEN = "backbone."
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # the pickled magic number of the old format


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read or does not fit the model."""


def save_checkpoint(path: str | os.PathLike, model: nn.Module, extra: dict[str, Any] | None = None,
                    previous: str | os.PathLike | None = None, backbone_file: dict[str, str] | None = None) -> None:
    """Write `model` (a DCAMA, possibly wrapped by DDP or torch.compile) to `path` atomically: a temporary
    file in the same directory is renamed over `path`, so a crash never leaves a half-written checkpoint, and
    a failed write (a full disk) leaves the file that was there. With `previous`, that file is kept under
    this name (`dcama.files.atomic_open`).

    `extra` entries (optimizer state, epoch, RNG state, ...) are stored at the top level of the saved dict;
    they must be types torch.load(weights_only=True) accepts (tensors, numbers, strings, lists, dicts).

    With `backbone_file` (what `save_backbone` returned for this model, a file in the same folder) the frozen
    backbone is left out and the file named instead: a checkpoint of the trained part only.
    """
    model = _unwrap(model)
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"extra may not use the reserved keys {clash}")
    state = model.state_dict()
    if backbone_file is not None:
        state = {k: v for k, v in state.items() if not k.startswith(_FROZEN)}
        extra["backbone_file"] = backbone_file
    _write(path, {"format": FORMAT, "version": VERSION, "config": model.config, "state_dict": state, **extra},
           previous)


def save_backbone(path: str | os.PathLike, model: nn.Module) -> dict[str, str]:
    """Write the frozen backbone of `model` to `path` (atomically, as save_checkpoint) unless the file there
    holds it already; returns the "backbone_file" entry of the checkpoints that leave it out: the file's name
    and the digest of its tensors (`state_digest`)."""
    model = _unwrap(model)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(_FROZEN)}
    entry = {"name": os.path.basename(path), "sha256": state_digest(state)}
    if not (os.path.isfile(path) and _stored_digest(path) == entry["sha256"]):
        _write(path, {"format": FORMAT, "version": VERSION, "part": "backbone", "config": model.config,
                      "sha256": entry["sha256"], "state_dict": state})
    return entry


def _write(path: str | os.PathLike, blob: dict[str, Any], previous: str | os.PathLike | None = None) -> None:
    with atomic_open(path, previous=previous) as f:
        torch.save(blob, f)


def _stored_digest(path: str | os.PathLike) -> str | None:
    """The digest a backbone file records, read without loading its tensors (None when unreadable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("sha256")
    except Exception:  # any unreadable file is written again
        return None


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: the same tensors give the same digest."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_torch_file(path: str | os.PathLike, what: str, expected: str = "") -> dict[str, Any]:
    """torch.load(path, weights_only=True) onto the CPU of a file that must hold a dict.

    Raises FileNotFoundError for a missing file and CheckpointError for one that is empty, truncated, corrupt,
    not a PyTorch file, holds objects other than tensors and plain containers, or is not a dict. Messages name
    the file, `what` it should be and, if given, the `expected` file; they are this project's words, not
    PyTorch's (whose advice to load unsafely does not apply: such files are never loaded here).
    """
    path = os.fspath(path)
    hint = f" ({expected})" if expected else ""
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r} {folder_not_file(path)}{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} not found{hint}")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols, with its own advice
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # the file itself cannot be read (permission, an I/O error)
        raise CheckpointError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # zip, pickle, EOF and runtime errors: told apart by what the file holds
        raise CheckpointError(f"{what} {path!r} {_unreadable(path, exc)}{hint}") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{what} {path!r} holds a {type(blob).__name__}, not a dict of tensors{hint}")
    return blob


def _unreadable(path: str, exc: Exception) -> str:
    """Why torch.load(weights_only=True) failed on `path`, from the file's first bytes and the error's type."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head:
        return "is empty (a write or a copy that did not finish)"
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "is truncated or corrupt: its zip archive is incomplete (a write or a copy that did not finish)"
        if isinstance(exc, pickle.UnpicklingError):
            return ("holds Python objects other than tensors, numbers, strings, lists and dicts (classes or "
                    "functions, which could run code when loaded); this project loads no such file")
        return "is corrupt: its zip archive is complete but its data cannot be decoded"
    if head != _LEGACY_MAGIC:
        return "is not a PyTorch file (neither a torch.save zip archive nor a legacy torch.save file)"
    if isinstance(exc, EOFError):
        return "is truncated (a write or a copy that did not finish)"
    return ("is a legacy torch.save file that is corrupt or holds Python objects other than tensors and plain "
            "containers; this project loads no such file")


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's dict (this project's or the authors'), read as `load_torch_file` does."""
    return load_torch_file(path, "checkpoint")


def trained_img_size(blob: dict[str, Any], default: int) -> int:
    """The image side a loaded checkpoint runs at when none is given, the one rule of every command that runs
    it: what this project's training run recorded (its "train_config"), else the side its model was built for
    (a Swin, or a model saved from Python with img_size=); the published 384 for an authors' file (their
    models were all trained at 384x384, docs/training.md); else, for a file of ours that does not say (a
    model saved from Python), the command's `default` (eval/run.py: the benchmark's size; eval/predict.py:
    384)."""
    if not is_own_checkpoint(blob):
        return PUBLISHED_IMG_SIZE
    trained = blob.get("train_config", {}).get("img_size") or blob.get("config", {}).get("img_size")
    return int(trained) if trained else default


def is_own_checkpoint(blob: dict[str, Any]) -> bool:
    """Whether a loaded file is this project's checkpoint (else, e.g., an authors' plain state dict)."""
    return blob.get("format") == FORMAT


def checkpoint_parts(blob: dict[str, Any], path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, state dict) of this project's checkpoint, after checking its version and entries; for a
    checkpoint of the trained part only, with the frozen backbone read from the file it names beside it."""
    path = os.fspath(path)
    if blob.get("version") not in _READS:
        raise CheckpointError(f"checkpoint {path!r} has format version {blob.get('version')}, "
                              f"this code reads versions {', '.join(map(str, _READS))}")
    if not isinstance(blob.get("config"), dict) or not isinstance(blob.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path!r} lacks its 'config' or 'state_dict' entry")
    if blob.get("part") == "backbone":
        raise CheckpointError(f"{path!r} holds a run's frozen backbone only (what its last.pt files leave out); "
                              "pass the run's best.pt or last.pt")
    if "backbone_file" not in blob:
        return blob["config"], blob["state_dict"]
    return blob["config"], {**_shared_backbone(blob["backbone_file"], path), **blob["state_dict"]}


def _shared_backbone(entry: dict[str, str], path: str) -> dict[str, torch.Tensor]:
    """The frozen backbone a checkpoint of the trained part names: the file beside it, checked by its digest."""
    file = os.path.join(os.path.dirname(path), entry["name"])

    def refused(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path!r} holds the trained head only; the frozen backbone it was saved "
                               f"with, {file!r}, {problem} (copy a run folder whole; its best.pt holds the whole "
                               "model)")

    if not os.path.isfile(file):
        raise refused("is not there")
    state = load_torch_file(file, "frozen backbone").get("state_dict", {})
    if state_digest(state) != entry["sha256"]:
        raise refused("is not the one it was saved with (its digest differs)")
    return state


def load_fitting_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """module.load_state_dict(state), after checking that it fits exactly: otherwise CheckpointError
    "<what>: <the first missing, unexpected and wrongly shaped keys>". Buffers the module computes itself
    (non-persistent) may be in `state` (older files); they are checked, not loaded."""
    problem = state_dict_mismatch(module, state)
    if problem:
        raise CheckpointError(f"{what}: {problem}")
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in own})


def state_dict_mismatch(module: nn.Module, state: dict[str, torch.Tensor], limit: int = 5) -> str:
    """'' when `state` fits `module` exactly, else a message naming the first missing, unexpected and
    wrongly shaped keys, and the computed buffers whose values differ from the module's."""
    own = module.state_dict()
    computed = {k: v for k, v in module.named_buffers() if k not in own}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in computed]
    theirs = {**own, **computed}
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in theirs.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    differ = [k for k, v in computed.items() if k in state and tuple(state[k].shape) == tuple(v.shape)
              and not _same_values(state[k], v)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches (file vs model)", shapes),
                         ("computed buffers that differ from the model's", differ)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def _same_values(stored: torch.Tensor, computed: torch.Tensor) -> bool:
    # Computed on other machines the encodings may differ in the last bits; shapes only on the meta device.
    if stored.is_meta or computed.is_meta:
        return True
    return torch.allclose(stored.to(computed.device, computed.dtype), computed, rtol=0.0, atol=1e-4)


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps in `_orig_mod`, DistributedDataParallel in `module`. Looked up in _modules: a
    # compiled module forwards attribute reads (`config` too) to the model it wraps.
    while True:
        inner = model._modules.get("_orig_mod")
        if inner is None:
            inner = model._modules.get("module")
        if inner is None:
            break
        model = inner
    if not isinstance(getattr(model, "config", None), dict):
        raise TypeError(f"save_checkpoint needs a DCAMA model, got {type(model).__name__}")
    return model
