"""Frozen timm backbones that return a feature map after every block (docs/model.md, "Backbones")."""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from timm.models.swin_transformer import checkpoint_filter_fn
from torch import nn

from .checkpoint import CheckpointError, load_fitting_state, load_torch_file
# The backbones' facts live in dcama.config (no torch needed to check a flag); exported here too.
from .config import BACKBONES, STAGE_STRIDES, SWIN_DEFAULT_IMG_SIZE, BackboneSpec, backbone_spec, img_size_problem

__all__ = ["BACKBONES", "STAGE_STRIDES", "BackboneSpec", "BlockFeatures", "build_backbone", "img_size_problem"]


class BlockFeatures(nn.Module):
    """A frozen timm network (`self.net`) whose forward returns one (N, C, h, w) map per block.

    The backbone never trains: its parameters have requires_grad=False and `train()` leaves it in eval
    mode, so batch-norm statistics and Swin's stochastic depth are always those of inference.
    """

    def __init__(self, name: str, img_size: int | None = None) -> None:
        super().__init__()
        self.name = name
        self.spec = backbone_spec(name)
        if self.spec.kind == "swin":
            self.img_size = SWIN_DEFAULT_IMG_SIZE if img_size is None else int(img_size)
            self._check_side(self.img_size, "img_size")
            self.net = timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0,
                                         img_size=self.img_size, drop_path_rate=0.0)
        else:
            self.img_size = None if img_size is None else int(img_size)
            if self.img_size is not None:
                self._check_side(self.img_size, "img_size")
            self.net = timm.create_model(self.spec.timm_name, pretrained=False, num_classes=0)
            for stage in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4):
                for block in stage:
                    # The feature is taken before the block's last ReLU: drop it from the block (it holds no
                    # weights) and apply it ourselves after recording the feature.
                    if hasattr(block, "act3"):
                        block.act3 = nn.Identity()
                    else:
                        block.act2 = nn.Identity()
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> "BlockFeatures":
        # Frozen backbone: always in eval mode whatever the caller asks for.
        return super().train(False)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ValueError when images of this size cannot go through the backbone and the head."""
        if height != width:
            raise ValueError(f"images must be square for backbone {self.name!r}, got {height}x{width}")
        if self.img_size is not None and height != self.img_size:
            raise ValueError(f"this {self.name} model was built for {self.img_size}x{self.img_size} images, got "
                             f"{height}x{width} (pass img_size= to DCAMA to build it for another size)")
        self._check_side(height, "image side")

    def _check_side(self, side: int, what: str) -> None:
        problem = img_size_problem(self.name, side)
        if problem:
            raise ValueError(f"{what} {side}: {problem}")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.spec.kind == "swin":
            return self._swin_features(images)
        return self._resnet_features(images)

    def _resnet_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net.maxpool(net.act1(net.bn1(net.conv1(images))))
        feats = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in stage:
                feat = block(x)  # bn(conv(...)) + shortcut: the block's own ReLU was removed
                feats.append(feat)
                x = torch.relu(feat)
        return feats

    def _swin_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.net.patch_embed(images)  # (N, h, w, C)
        feats = []
        for stage in self.net.layers:
            # timm merges patches at the start of a stage (Microsoft's code at the end of the previous one):
            # the per-block outputs are the same.
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x)
                feats.append(x.permute(0, 3, 1, 2))  # (N, C, h, w) view, channels-last in memory
        return feats

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load the ImageNet weights the authors used from a local file (timm ResNet or Microsoft Swin layout)."""
        self.load_weights(_read_weights(self.name, path), path)

    def load_weights(self, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
        """Load an ImageNet state dict read from `path` (named in the errors) into the network."""
        where = f"backbone weights {os.fspath(path)!r} do not fit backbone {self.name!r} ({_expects(self.name)})"
        try:
            state = self.convert_state_dict(state)
        except CheckpointError as exc:  # the message names the tensor that does not convert
            raise CheckpointError(f"{where}: {exc}") from None
        load_fitting_state(self.net, state, where)

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a timm/torchvision ResNet or a Microsoft Swin state dict to `self.net`'s keys.

        The ImageNet classifier ('fc.*' / 'head.*') is dropped: the features never reach it. CheckpointError
        names the first tensor that cannot be converted (Swin: resized to this network's windows and patches).
        """
        if self.spec.kind == "swin":
            # Renames the patch-merging layers and drops the relative_position_index / attn_mask buffers.
            try:
                state = checkpoint_filter_fn(state, self.net)
            except Exception:  # timm's converter fails on tensors of unexpected shapes or layers it lacks
                raise CheckpointError(self._unconvertible(state)) from None
            return {k: v for k, v in state.items() if not k.startswith("head.")}
        state = state.get("state_dict", state)
        return {k: v for k, v in state.items() if not k.startswith("fc.")}

    def _unconvertible(self, state: dict[str, Any]) -> str:
        """Which tensor of a Swin state dict timm's converter fails on, and why, in words."""
        own = self.net.state_dict()
        for key, value in state.items():
            try:
                checkpoint_filter_fn({key: value}, self.net)
            except Exception:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                if key not in own:
                    return f"{key} {shape} belongs to no layer of {self.name} (is it another Swin variant?)"
                return f"{key} {shape} cannot be resized to this model's {tuple(own[key].shape)}"
        return "its tensors cannot be converted together (a mix of Swin variants?)"


def build_backbone(name: str, weights: str | os.PathLike | None = None, img_size: int | None = None) -> BlockFeatures:
    """The frozen per-block feature extractor `name`, with ImageNet weights from the local file `weights`."""
    state = None if weights is None else _read_weights(name, weights)  # file errors before the network is built
    backbone = BlockFeatures(name, img_size=img_size)
    if state is not None:
        backbone.load_weights(state, weights)
    return backbone


def _expects(name: str) -> str:
    return f"backbone {name!r} expects {backbone_spec(name).weights_file}"


def _read_weights(name: str, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_torch_file(path, "backbone weights", expected=_expects(name))
