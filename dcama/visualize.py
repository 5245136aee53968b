"""Pictures of episodes: the supports with their masks, the query with its ground truth, and the prediction."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .data.common import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["save_episode_png", "to_rgb"]


def to_rgb(img: torch.Tensor) -> torch.Tensor:
    """(3,H,W) normalised float -> (H,W,3) uint8."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (img.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 0)


def _overlay(img: torch.Tensor, mask: torch.Tensor, color: tuple[int, int, int]) -> Image.Image:
    """PIL image of `img` with `mask == 1` tinted in `color` (mask resized to the image if needed)."""
    rgb = to_rgb(img)
    m = mask.detach().cpu()
    if m.shape != rgb.shape[:2]:
        m = F.interpolate(m[None, None].float(), size=rgb.shape[:2], mode="nearest")[0, 0]
    tint = torch.tensor(color, dtype=torch.float32)
    out = rgb.float()
    fg = (m == 1)[..., None]
    out = torch.where(fg, 0.5 * out + 0.5 * tint, out)
    return Image.fromarray(out.round().to(torch.uint8).numpy())


def save_episode_png(path: Path, support_imgs: torch.Tensor, support_masks: torch.Tensor, query_img: torch.Tensor,
                     query_mask: torch.Tensor, pred: torch.Tensor, title: str) -> None:
    """One row: the K supports with their masks (red), the query with its ground truth (green), the prediction
    (blue); the title above it."""
    tiles = [_overlay(img, m, (255, 0, 0)) for img, m in zip(support_imgs, support_masks)]
    tiles += [_overlay(query_img, query_mask, (0, 200, 0)), _overlay(query_img, pred, (0, 80, 255))]
    labels = [f"support {k + 1}" for k in range(len(support_imgs))] + ["query + ground truth", "prediction"]
    w, h = tiles[0].size
    header = 28
    canvas = Image.new("RGB", (w * len(tiles), h + header), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=(0, 0, 0))
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        canvas.paste(tile, (i * w, header))
        draw.text((i * w + 4, 15), label, fill=(0, 0, 0))
    canvas.save(path)
