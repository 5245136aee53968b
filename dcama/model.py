"""DCAMA (Shi et al., ECCV 2022) on timm backbones, its attention running as one fused op per stage.

What is computed is described in docs/model.md; the head's module names follow the authors' checkpoints, so
`checkpoint_filter_fn` converts their 'module.model.*' keys with a prefix change only.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dcama_attention

from .backbones import BACKBONES, BackboneSpec, BlockFeatures, build_backbone
from .checkpoint import (FORMAT, CheckpointError, checkpoint_parts, is_own_checkpoint, load_checkpoint_file,
                         load_fitting_state)
from .config import ATTN_IMPLS

__all__ = ["DCAMA", "DCAMAHead", "PositionalEncoding", "StageAttention", "checkpoint_filter_fn", "infer_backbone",
           "merge_heads", "resize_logits", "split_heads", "stage_attention"]

NUM_HEADS = 8
DROPOUT_P = 0.5
_MID_CH = (16, 64, 128)
# The authors' released files: a DistributedDataParallel state dict, backbone and head under these prefixes.
_BACKBONE_PREFIX = "feature_extractor."
_HEAD_PREFIX = "model."


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal encoding (buffer `pe`, (1, max_len, C)) added to tokens, then dropout."""

    def __init__(self, channels: int, dropout: float = DROPOUT_P, max_len: int = 10000) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        inv_freq = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
        pe = torch.zeros(max_len, channels)
        pe[:, 0::2] = torch.sin(position * inv_freq)
        pe[:, 1::2] = torch.cos(position * inv_freq)
        # Computed, so not stored (non-persistent): files that hold it are checked against it when loaded.
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, n, L, C): n positions, L layers stacked; each layer gets the same encoding."""
        if tokens.shape[1] > self.pe.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the positional encoding's {self.pe.shape[1]}")
        return self.dropout(tokens + self.pe[:, : tokens.shape[1]].unsqueeze(2))


def split_heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """Projected tokens (B, N, L, C) of a stage's L layers -> (B, N, L * heads, C / heads), a view: the
    layers stacked in the op's head axis, layer-major (head l * heads + h is head h of layer l)."""
    batch, n_tokens, layers, channels = tokens.shape
    return tokens.view(batch, n_tokens, layers * heads, channels // heads)


def merge_heads(out: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head outputs (B, L * heads, Nq) -> (B, L, Nq): each layer's output is the mean of its own heads."""
    batch, stacked, n_query = out.shape
    return out.reshape(batch, stacked // heads, heads, n_query).mean(dim=2)


def stage_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, heads: int, dropout_p: float,
                    impl: str) -> torch.Tensor:
    """The attention of one stage on projected tokens: query (B, Nq, L, C), key (B, Nk, L, C), mask (B, Nk)
    -> (B, L, Nq).

    The L layers are stacked in the head axis (L * heads): every head of every layer attends with the same
    value, the mask, which the op reads per batch entry and shares across heads, so no copy of it is made and
    the whole stage is one op call. (Stacking the layers in the batch axis would need the mask repeated per
    layer: the op addresses the value with one batch stride, which cannot express a layer-major (L*B) order
    without a copy once B > 1.) The benches time exactly this function.
    """
    q, k = split_heads(query, heads), split_heads(key, heads)
    # The op wants one dtype: under autocast the projections are bf16/fp16, the mask float32.
    out = dcama_attention(q, k, mask.to(q.dtype), dropout_p=dropout_p, head_reduction="none", impl=impl)
    return merge_heads(out, heads)


class StageAttention(nn.Module):
    """The attention module shared by all layers of one stage: `linears[0]` projects query tokens,
    `linears[1]` support tokens; 8 heads; the support mask is the value; output = mean over heads."""

    def __init__(self, channels: int, heads: int = NUM_HEADS, dropout: float = DROPOUT_P) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.linears = nn.ModuleList([nn.Linear(channels, channels), nn.Linear(channels, channels)])

    def forward(self, query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor, impl: str) -> torch.Tensor:
        """query (B, Nq, L, C), support (B, Nk, L, C) tokens of the stage's L layers; mask (B, Nk).
        Returns (B, L, Nq): one projection per side and one op call for the whole stage."""
        return stage_attention(self.linears[0](query), self.linears[1](support), mask, self.heads,
                               self.dropout if self.training else 0.0, impl)


def _conv_block(in_ch: int, out_chs: tuple[int, ...], kernels: tuple[int, ...]) -> nn.Sequential:
    """(conv, GroupNorm(4), ReLU) x 3: conv at 0/3/6, GroupNorm at 1/4/7 as in the authors' keys."""
    layers: list[nn.Module] = []
    for out_ch, k in zip(out_chs, kernels):
        layers += [nn.Conv2d(in_ch, out_ch, k, padding=k // 2), nn.GroupNorm(4, out_ch), nn.ReLU(inplace=True)]
        in_ch = out_ch
    return nn.Sequential(*layers)


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


class DCAMAHead(nn.Module):
    """Everything after the backbone (docs/model.md, "The head"). Its state-dict keys are the authors' keys
    after 'module.model.'."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        channels, depths = spec.channels, spec.depths
        self.bounds = [0, *spec.stack_ids]  # block features [bounds[s], bounds[s+1]) form stage s+1
        self.DCAMA_blocks = nn.ModuleList([StageAttention(c) for c in channels[1:]])
        self.pe = nn.ModuleList([PositionalEncoding(c) for c in channels[1:]])
        c1, c2, c3 = _MID_CH
        self.conv1 = _conv_block(depths[3], _MID_CH, (3, 3, 3))  # stage-4 maps, 1/32
        self.conv2 = _conv_block(depths[2], _MID_CH, (5, 3, 3))  # stage-3 maps, 1/16
        self.conv3 = _conv_block(depths[1], _MID_CH, (5, 5, 3))  # stage-2 maps, 1/8
        self.conv4 = _conv_block(c3, (c3, c3, c3), (3, 3, 3))
        self.conv5 = _conv_block(c3, (c3, c3, c3), (3, 3, 3))
        self.mixer1 = nn.Sequential(nn.Conv2d(c3 + 2 * channels[1] + 2 * channels[0], c3, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(c3, c2, 3, padding=1), nn.ReLU())
        self.mixer2 = nn.Sequential(nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(c2, c1, 3, padding=1), nn.ReLU())
        self.mixer3 = nn.Sequential(nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(c1, 2, 3, padding=1))

    def forward(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                support_masks: torch.Tensor, impl: str) -> torch.Tensor:
        """query_feats: per block (B, C, h, w); support_feats: per block (B*K, C, h, w), shots of an episode
        adjacent; support_masks (B, K, H, W). Returns logits (B, 2, 4*h1, 4*w1), h1 x w1 = stage-1 size."""
        batch, shots = support_masks.shape[:2]
        masks = support_masks.flatten(0, 1).unsqueeze(1).float()  # (B*K, 1, H, W)
        bounds = self.bounds
        coarse = []  # per stage 2, 3, 4: (B, L, h, w)
        for stage in (1, 2, 3):
            q_feats = query_feats[bounds[stage]:bounds[stage + 1]]
            s_feats = support_feats[bounds[stage]:bounds[stage + 1]]
            height, width = q_feats[0].shape[-2:]
            # Tokens of the stage's L layers side by side: (N, h*w, L, C), one copy made by the stack.
            q_tok = torch.stack([f.flatten(2).transpose(1, 2) for f in q_feats], dim=2)
            s_tok = torch.stack([f.flatten(2).transpose(1, 2) for f in s_feats], dim=2)
            pe = self.pe[stage - 1]
            q_tok = pe(q_tok)
            # Positions restart for every shot (as in the original), then the shots are concatenated.
            s_tok = pe(s_tok).reshape(batch, shots * height * width, *s_tok.shape[2:])
            value = _up(masks, (height, width)).view(batch, shots * height * width)
            out = self.DCAMA_blocks[stage - 1](q_tok, s_tok, value, impl)
            coarse.append(out.view(batch, -1, height, width))

        mix3 = self.conv3(coarse[0])
        mix2 = self.conv2(coarse[1])
        mix1 = self.conv1(coarse[2])
        mix = self.conv4(_up(mix1, mix2.shape[-2:]) + mix2)
        mix = self.conv5(_up(mix, mix3.shape[-2:]) + mix3)

        # Skip connections from the last stage-2 and stage-1 blocks; K shots merged by an element-wise max.
        last2, last1 = bounds[2] - 1, bounds[1] - 1
        mix = torch.cat((mix, query_feats[last2], support_feats[last2].unflatten(0, (batch, shots)).amax(dim=1)), 1)
        mix = _up(mix, query_feats[last1].shape[-2:])
        mix = torch.cat((mix, query_feats[last1], support_feats[last1].unflatten(0, (batch, shots)).amax(dim=1)), 1)

        out = self.mixer1(mix)
        out = self.mixer2(_up(out, (out.shape[-2] * 2, out.shape[-1] * 2)))
        return self.mixer3(_up(out, (out.shape[-2] * 2, out.shape[-1] * 2)))


class DCAMA(nn.Module):
    """Few-shot segmenter: query image + K support images and masks -> 2-channel logits.

    Args:
        backbone: "swin_b", "resnet50", "resnet101" (the published models) or "resnet18"/"resnet34"
            (small demos and tests).
        attn_impl: implementation of the attention op: "auto", "triton", "naive" or "sdpa".
        backbone_weights: local ImageNet weights file for the backbone (see BACKBONES[...].weights_file);
            None leaves it randomly initialised (e.g. when a full checkpoint is loaded afterwards).
        img_size: input side the model is built for. Swin needs it fixed (default 384, the published
            setting); for ResNets None accepts any square side that is a multiple of 32.

    The backbone is frozen: `train()` leaves it in eval mode (see BlockFeatures.train) and only the head's
    parameters require gradients.
    """

    def __init__(self, backbone: str = "swin_b", attn_impl: str = "auto",
                 backbone_weights: str | os.PathLike | None = None, img_size: int | None = None) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        self.attn_impl = attn_impl
        self.backbone: BlockFeatures = build_backbone(backbone, backbone_weights, img_size)
        self.head = DCAMAHead(self.backbone.spec)
        self._config = {"backbone": backbone, "attn_impl": attn_impl,
                        "backbone_weights": None if backbone_weights is None else os.fspath(backbone_weights),
                        "img_size": img_size}

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self._attn_impl = impl

    @property
    def config(self) -> dict:
        """Constructor arguments that rebuild this model (attn_impl as currently set)."""
        return {**self._config, "attn_impl": self.attn_impl}

    def forward(self, query_img: torch.Tensor, support_imgs: torch.Tensor,
                support_masks: torch.Tensor) -> torch.Tensor:
        """query_img (B, 3, S, S), support_imgs (B, K, 3, S, S), support_masks (B, K, S, S) in {0, 1}
        -> logits (B, 2, S, S), channel 1 = foreground."""
        self._check_inputs(query_img, support_imgs, support_masks)
        batch = query_img.shape[0]
        # One backbone pass over the query and all support images.
        feats = self.encode(torch.cat((query_img, support_imgs.flatten(0, 1)), dim=0))
        query_feats = [f[:batch] for f in feats]
        support_feats = [f[batch:] for f in feats]
        return self.head(query_feats, support_feats, support_masks, self.attn_impl)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's block features of images (N, 3, S, S), what `head` takes: computed once, they
        serve every query of a support set (`dcama.predict`)."""
        return self.backbone(images)

    @torch.no_grad()
    def predict(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """0/1 foreground mask (B, h, w) long. The logits are resized to out_size (e.g. the query's original
        (H, W)) bilinearly with align_corners=True before the argmax, as the evaluation protocol does.
        Call model.eval() first: in training mode dropout is active."""
        return resize_logits(self(query_img, support_imgs, support_masks), out_size).argmax(dim=1)

    def _check_inputs(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> None:
        if query_img.dim() != 4 or query_img.shape[1] != 3:
            raise ValueError(f"query_img must be (B, 3, H, W), got {tuple(query_img.shape)}")
        if support_imgs.dim() != 5 or support_imgs.shape[2] != 3:
            raise ValueError(f"support_imgs must be (B, K, 3, H, W), got {tuple(support_imgs.shape)}"
                             + (" (add the shot axis: support_imgs.unsqueeze(1))" if support_imgs.dim() == 4 else ""))
        if support_masks.dim() != 4:
            raise ValueError(f"support_masks must be (B, K, H, W), got {tuple(support_masks.shape)}"
                             + (" (add the shot axis: support_masks.unsqueeze(1))" if support_masks.dim() == 3 else ""))
        batch, shots = support_imgs.shape[:2]
        if query_img.shape[0] != batch or support_masks.shape[0] != batch:
            raise ValueError(f"batch sizes differ: query_img {query_img.shape[0]}, support_imgs {batch}, "
                             f"support_masks {support_masks.shape[0]}")
        if shots < 1:
            raise ValueError("at least one support image (K >= 1) is needed")
        if support_masks.shape[1] != shots:
            raise ValueError(f"{shots} support images but {support_masks.shape[1]} support masks per episode")
        size = tuple(query_img.shape[-2:])
        if tuple(support_imgs.shape[-2:]) != size:
            raise ValueError(f"support images are {tuple(support_imgs.shape[-2:])}, the query image {size}")
        if tuple(support_masks.shape[-2:]) != size:
            raise ValueError(f"support masks are {tuple(support_masks.shape[-2:])}, the images {size}")
        self.backbone.check_input_size(*size)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, backbone: str | None = None,
                        attn_impl: str = "auto") -> "DCAMA":
        """DCAMA from this project's checkpoint or an authors' released file, in eval mode.

        backbone: None infers it (from the recorded config, or from the authors' key names); if given it must
        agree with the file.
        """
        path = os.fspath(path)
        return cls.from_loaded(load_checkpoint_file(path), path, backbone=backbone, attn_impl=attn_impl)

    @classmethod
    def from_loaded(cls, blob: dict[str, Any], path: str, backbone: str | None = None,
                    attn_impl: str = "auto") -> "DCAMA":
        """DCAMA from a checkpoint file already read (`load_checkpoint_file(path)`), as `from_checkpoint`:
        for a command that also reads the file's other entries, so that it reads the file once."""
        if is_own_checkpoint(blob):
            config, state = checkpoint_parts(blob, path)
            # The state dict carries the backbone weights: do not read the ImageNet file again.
            config = {**config, "attn_impl": attn_impl, "backbone_weights": None}
            if backbone is not None and backbone != config["backbone"]:
                raise CheckpointError(f"checkpoint {path!r} holds a {config['backbone']} model, not the "
                                      f"{backbone} backbone asked for")
            model = cls(**config)
        else:
            name = backbone if backbone is not None else infer_backbone(blob, path)
            model = cls(backbone=name, attn_impl=attn_impl)
            state = checkpoint_filter_fn(blob, model, path)
        load_fitting_state(model, state, f"checkpoint {path!r} does not fit a DCAMA model with the "
                                         f"{model.config['backbone']} backbone")
        return model.eval()


def resize_logits(logits: torch.Tensor, out_size: tuple[int, int] | None) -> torch.Tensor:
    """Logits (B, C, h, w) resized to out_size (None: as they are) bilinearly with align_corners=True, in
    float32: the evaluation protocol's resize to the query's original size, made before any decision."""
    if out_size is None or tuple(out_size) == tuple(logits.shape[-2:]):
        return logits
    return _up(logits.float(), (int(out_size[0]), int(out_size[1])))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: DCAMA, source: str = "<state dict>") -> dict[str, Any]:
    """An authors' released state dict renamed to `model.state_dict()` keys (their backbone layout converted by
    the backbone); keys it does not know are kept as they are so that the mismatch report lists them."""
    state = _authors_keys(state_dict, source)
    backbone = {k[len(_BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(_BACKBONE_PREFIX)}
    out = {f"head.{k[len(_HEAD_PREFIX):]}": v for k, v in state.items() if k.startswith(_HEAD_PREFIX)}
    try:
        backbone = model.backbone.convert_state_dict(backbone)
    except CheckpointError as exc:  # the message names the tensor that does not convert
        raise CheckpointError(f"the backbone weights in {source!r} do not fit {model.config['backbone']}: "
                              f"{exc}") from None
    out.update({f"backbone.net.{k}": v for k, v in backbone.items()})
    out.update({k: v for k, v in state.items() if not k.startswith((_BACKBONE_PREFIX, _HEAD_PREFIX))})
    return out


def infer_backbone(state_dict: dict[str, Any], source: str = "<state dict>") -> str:
    """Backbone name of an authors' state dict, told apart by its key names: Swin has 'layers.*'; the
    ResNets by block type (a conv3 in bottlenecks) and blocks per stage."""
    keys = [k[len(_BACKBONE_PREFIX):] for k in _authors_keys(state_dict, source) if k.startswith(_BACKBONE_PREFIX)]
    if any(k.startswith("layers.") for k in keys):
        return "swin_b"
    depths = tuple(1 + max((int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in keys
    for name, spec in BACKBONES.items():
        if spec.kind == "resnet" and spec.depths == depths and (spec.channels[0] == 256) == bottleneck:
            return name
    raise CheckpointError(f"cannot tell the backbone of {source!r} from its keys (blocks per stage {depths}, "
                          f"{'bottleneck' if bottleneck else 'basic'} blocks); name it with --backbone "
                          "(backbone= from Python)")


def _authors_keys(state_dict: dict[str, Any], source: str) -> dict[str, Any]:
    """The state dict without DDP's 'module.' prefix, after checking that it holds an authors' DCAMA."""
    state = _strip_module(state_dict)
    if not any(k.startswith((_BACKBONE_PREFIX, _HEAD_PREFIX)) for k in state):
        raise CheckpointError(f"{source!r} is neither a {FORMAT} checkpoint nor an authors' DCAMA state dict "
                              f"(no 'module.feature_extractor.' or 'module.model.' keys; first keys: "
                              f"{list(state)[:5]})")
    return state


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    # Files saved from a DistributedDataParallel wrapper prefix every key with 'module.'.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
