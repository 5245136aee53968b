"""Saving and loading DCAMA checkpoints: this project's files and the authors' released ones.

This project's file: {"format": "dcama-triton", "version": 1, "config": model.config,
"state_dict": model.state_dict(), **extra}. The authors' file: a plain state dict saved from a
DistributedDataParallel wrapper, keys 'module.feature_extractor.*' (backbone, timm/torchvision ResNet or
Microsoft Swin layout) and 'module.model.*' (the head, same names as `DCAMAHead`), spec section 4.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .backbones import BACKBONES, state_dict_mismatch
from .files import atomic_open
from .model import DCAMA

__all__ = ["CheckpointError", "FORMAT", "VERSION", "authors_to_model_state", "infer_backbone",
           "load_checkpoint_file", "load_model", "save_checkpoint"]

FORMAT = "dcama-triton"
VERSION = 1
_RESERVED = ("format", "version", "config", "state_dict")
_BACKBONE_PREFIX = "feature_extractor."
_HEAD_PREFIX = "model."


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def save_checkpoint(path: str | os.PathLike, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Write `model` (a DCAMA, possibly wrapped by DDP or torch.compile) to `path` atomically: a temporary
    file in the same directory is renamed over `path`, so a crash never leaves a half-written checkpoint.

    `extra` entries (optimizer state, epoch, RNG state, ...) are stored at the top level of the saved dict;
    they must be types torch.load(weights_only=True) accepts (tensors, numbers, strings, lists, dicts).
    """
    model = _unwrap(model)
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"extra may not use the reserved keys {clash}")
    blob = {"format": FORMAT, "version": VERSION, "config": model.config, "state_dict": model.state_dict(), **extra}
    with atomic_open(path) as f:
        torch.save(blob, f)


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, weights_only=True) onto the CPU, with FileNotFoundError for a missing file and
    CheckpointError for one that is truncated, corrupt or not a dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle, EOF and runtime errors all mean the same thing to the user
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is truncated, corrupt, not a PyTorch "
                              f"checkpoint, or holds objects that torch.load(weights_only=True) refuses "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(blob).__name__}, not a dict")
    return blob


def load_model(path: str | os.PathLike, backbone: str | None = None, attn_impl: str = "auto") -> DCAMA:
    """DCAMA from this project's checkpoint or an authors' released file, in eval mode.

    backbone: None infers it (from the recorded config, or from the authors' key names); if given it must
    agree with the file.
    """
    blob = load_checkpoint_file(path)
    path = os.fspath(path)
    if blob.get("format") == FORMAT:
        if blob.get("version") != VERSION:
            raise CheckpointError(f"checkpoint {path!r} has format version {blob.get('version')}, "
                                  f"this code reads version {VERSION}")
        if not isinstance(blob.get("config"), dict) or not isinstance(blob.get("state_dict"), dict):
            raise CheckpointError(f"checkpoint {path!r} lacks its 'config' or 'state_dict' entry")
        # The state dict carries the backbone weights: do not read the ImageNet file again.
        config = {**blob["config"], "attn_impl": attn_impl, "backbone_weights": None}
        if backbone is not None and backbone != config["backbone"]:
            raise CheckpointError(f"checkpoint {path!r} holds a {config['backbone']} model, not {backbone}")
        model = DCAMA(**config)
        state = blob["state_dict"]
    else:
        name = backbone if backbone is not None else infer_backbone(blob, path)
        model = DCAMA(backbone=name, attn_impl=attn_impl)
        state = authors_to_model_state(blob, model, path)
    problem = state_dict_mismatch(model, state)
    if problem:
        raise CheckpointError(f"checkpoint {path!r} does not fit DCAMA(backbone={model.config['backbone']!r}): "
                              f"{problem}")
    model.load_state_dict(state)
    return model.eval()


def authors_to_model_state(state: dict[str, Any], model: DCAMA, path: str = "<state dict>") -> dict[str, Any]:
    """Rename an authors' state dict to `model.state_dict()` keys; keys it does not know are kept as they
    are so that the mismatch report lists them."""
    state = _strip_module(state)
    backbone = {k[len(_BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(_BACKBONE_PREFIX)}
    out = {f"head.{k[len(_HEAD_PREFIX):]}": v for k, v in state.items() if k.startswith(_HEAD_PREFIX)}
    if not backbone and not out:
        raise CheckpointError(f"{path!r} is neither a {FORMAT} checkpoint nor an authors' DCAMA state dict "
                              f"(no 'module.feature_extractor.' or 'module.model.' keys; first keys: "
                              f"{list(state)[:5]})")
    try:
        backbone = model.backbone.convert_state_dict(backbone)
    except Exception as exc:  # timm's Swin converter fails on tensors of unexpected shapes
        raise CheckpointError(f"the backbone weights in {path!r} do not fit {model.config['backbone']}: {exc}") from exc
    out.update({f"backbone.net.{k}": v for k, v in backbone.items()})
    out.update({k: v for k, v in state.items() if not k.startswith((_BACKBONE_PREFIX, _HEAD_PREFIX))})
    return out


def infer_backbone(state: dict[str, Any], path: str = "<state dict>") -> str:
    """Backbone name of an authors' state dict, told apart by its key names: Swin has 'layers.*'; the
    ResNets by block type (a conv3 in bottlenecks) and blocks per stage."""
    keys = [k[len(_BACKBONE_PREFIX):] for k in _strip_module(state) if k.startswith(_BACKBONE_PREFIX)]
    if any(k.startswith("layers.") for k in keys):
        return "swin_b"
    depths = tuple(1 + max((int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in keys
    for name, spec in BACKBONES.items():
        if spec.kind == "resnet" and spec.depths == depths and (spec.channels[0] == 256) == bottleneck:
            return name
    raise CheckpointError(f"cannot tell the backbone of {path!r} from its keys (blocks per stage {depths}, "
                          f"{'bottleneck' if bottleneck else 'basic'} blocks); pass backbone=")


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    # Files saved from a DistributedDataParallel wrapper prefix every key with 'module.'.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _unwrap(model: nn.Module) -> DCAMA:
    # torch.compile wraps in `_orig_mod`, DistributedDataParallel in `module`.
    while not isinstance(model, DCAMA):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"save_checkpoint needs a DCAMA model, got {type(model).__name__}")
        model = inner
    return model
