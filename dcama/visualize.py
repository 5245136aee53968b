"""Pictures a person reads at a glance, for `eval/run.py --visualize` (episodes) and `eval/predict.py`
(predictions on one's own images) alike.

A picture is a title, a row of captioned panels and a legend. Every panel is scaled to PANEL_HEIGHT pixels
(small images upscaled with nearest neighbour, so their pixels stay visible; large ones reduced), and every mask
is drawn at that scale as a contour, a coloured line between two dark ones that stays visible on any colour
(on objects of the mask's own colour too), over a light fill. Captions are shortened to their panel's width
and the panels stand apart, so no label runs into another; the title and the legend wrap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .data.common import IMAGENET_MEAN, IMAGENET_STD
from .files import atomic_open

__all__ = ["CLASS_COLOURS", "PREDICTION", "SUPPORT", "TRUTH", "MaskStyle", "Panel", "class_styles", "compose",
           "draw_panel", "labels_picture", "prediction_picture", "save_episode_png", "save_picture", "to_rgb"]

PANEL_HEIGHT = 288  # 96 px shapes images x 3
FILL_ALPHA = 0.3  # the light fill: 30% of the mask's colour over the image
LINE_WIDTH = 4  # the coloured line of a contour, centred on the mask's edge (pixels)
HALO_WIDTH = 1  # the dark line on each side of it
HALO = (20, 20, 20)
MARGIN, GAP, PAD = 10, 16, 4  # canvas margin, space between panels, space around text
FONT_SIZE, TITLE_SIZE = 14, 16
BACKGROUND, TEXT = (255, 255, 255), (20, 20, 20)


@dataclass(frozen=True)
class MaskStyle:
    """How one kind of mask is drawn: its colour and its name in the legend."""

    label: str
    colour: tuple[int, int, int]


# Orange, green and magenta: far apart in hue, and told apart with the common colour-vision deficiencies by
# their brightness too.
SUPPORT = MaskStyle("support mask", (255, 150, 0))
TRUTH = MaskStyle("ground truth", (0, 210, 90))
PREDICTION = MaskStyle("prediction", (235, 30, 220))
# The classes of an N-way prediction, label k in CLASS_COLOURS[(k - 1) % 10]: the Okabe-Ito colours (told apart
# with the common colour-vision deficiencies), then the magenta, green and a brown, repeated past 10 classes.
CLASS_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
                 (204, 121, 167), (235, 30, 220), (0, 210, 90), (140, 80, 30))


@dataclass
class Panel:
    """An image scaled to the panel height with its masks drawn, and the caption above it."""

    image: Image.Image
    caption: str


def to_rgb(img: torch.Tensor) -> torch.Tensor:
    """(3,H,W) normalised float -> (H,W,3) uint8."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (img.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1 or built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _as_image(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def _scale(image: Image.Image, size: tuple[int, int], binary: bool = False) -> Image.Image:
    """Resize to size (w, h): nearest when enlarging (pixels stay visible), area-weighted when reducing; a
    binary 0/255 mask stays binary (a reduced pixel is foreground when at least half of it was)."""
    if image.size == size:
        return image
    if size[1] >= image.height:
        return image.resize(size, Image.Resampling.NEAREST)
    out = image.resize(size, Image.Resampling.BOX if binary else Image.Resampling.LANCZOS)
    return out.point(lambda v: 255 if v >= 128 else 0) if binary else out


def _band(mask: Image.Image, width: int) -> np.ndarray:
    """Pixels within width/2 of the mask's edge, on either side (a dilation minus an erosion)."""
    size = width + 1 if width % 2 == 0 else width + 2
    grown = np.asarray(mask.filter(ImageFilter.MaxFilter(size)))
    shrunk = np.asarray(mask.filter(ImageFilter.MinFilter(size)))
    return grown != shrunk


def draw_panel(image: Image.Image | np.ndarray | torch.Tensor,
               masks: Sequence[tuple[np.ndarray | torch.Tensor, MaskStyle]], caption: str,
               height: int = PANEL_HEIGHT) -> Panel:
    """The image (PIL, (H, W, 3) uint8 array) scaled to `height` with each {0, 1} mask (any size: it is
    scaled to the image) drawn as a light fill and a contour, in the order given."""
    img = _as_image(image)
    size = (max(1, round(img.width * height / img.height)), height)
    out = np.asarray(_scale(img, size)).astype(np.float32)
    for mask, style in masks:
        m = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
        scaled = _scale(Image.fromarray(np.where(m == 1, 255, 0).astype(np.uint8)), size, binary=True)
        inside = np.asarray(scaled) == 255
        colour = np.array(style.colour, dtype=np.float32)
        out[inside] = (1 - FILL_ALPHA) * out[inside] + FILL_ALPHA * colour
        out[_band(scaled, LINE_WIDTH + 2 * HALO_WIDTH)] = HALO
        out[_band(scaled, LINE_WIDTH)] = colour
    return Panel(Image.fromarray(out.round().astype(np.uint8)), caption)


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """text, shortened with an ellipsis until it is at most `width` pixels wide."""
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if font.getlength(text[:mid] + "…") <= width else (lo, mid - 1)
    return text[:lo] + "…" if lo else ""


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Words of text on lines at most `width` pixels wide (a word too long for a line is shortened)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(_fit(word, font, width))
    return lines or [""]


def _line_height(font: ImageFont.ImageFont) -> int:
    return font.getbbox("Ag|")[3] + PAD


def _legend_rows(legend: Sequence[MaskStyle], font: ImageFont.ImageFont, width: int) -> list[list[MaskStyle]]:
    swatch = _line_height(font)
    rows: list[list[MaskStyle]] = [[]]
    used = 0
    for style in legend:
        need = swatch + PAD + int(font.getlength(style.label)) + GAP
        if rows[-1] and used + need > width:
            rows.append([])
            used = 0
        rows[-1].append(style)
        used += need
    return rows


def compose(panels: Sequence[Panel], title: str, legend: Sequence[MaskStyle]) -> Image.Image:
    """The title (wrapped), the panels side by side, each under its caption, and the legend (wrapped)."""
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)
    width = 2 * MARGIN + sum(p.image.width for p in panels) + GAP * (len(panels) - 1)
    inner = width - 2 * MARGIN
    title_lines = _wrap(title, title_font, inner)
    rows = _legend_rows(legend, font, inner)
    line, title_line = _line_height(font), _line_height(title_font)
    top = MARGIN + title_line * len(title_lines) + PAD
    panel_top = top + line
    height = panel_top + max(p.image.height for p in panels) + PAD + line * len(rows) + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + i * title_line), text, fill=TEXT, font=title_font)
    x = MARGIN
    for panel in panels:
        draw.text((x, top), _fit(panel.caption, font, panel.image.width), fill=TEXT, font=font)
        canvas.paste(panel.image, (x, panel_top))
        x += panel.image.width + GAP
    y = panel_top + max(p.image.height for p in panels) + PAD
    for row in rows:
        _draw_legend_row(draw, row, font, y)
        y += line
    return canvas


def _draw_legend_row(draw: ImageDraw.ImageDraw, row: Sequence[MaskStyle], font: ImageFont.ImageFont, y: int) -> None:
    side = _line_height(font) - PAD
    x = MARGIN
    for style in row:
        light = tuple(round((1 - FILL_ALPHA) * b + FILL_ALPHA * c) for b, c in zip(BACKGROUND, style.colour))
        draw.rectangle((x, y, x + side, y + side), fill=light, outline=HALO, width=HALO_WIDTH)
        draw.rectangle((x + HALO_WIDTH, y + HALO_WIDTH, x + side - HALO_WIDTH, y + side - HALO_WIDTH),
                       outline=style.colour, width=max(1, LINE_WIDTH // 2))
        draw.text((x + side + PAD, y), style.label, fill=TEXT, font=font)
        x += side + PAD + int(font.getlength(style.label)) + GAP


def save_picture(path: str | os.PathLike, picture: Image.Image) -> None:
    """The picture as a PNG file, written atomically."""
    with atomic_open(path) as f:
        picture.save(f, format="PNG")


def save_episode_png(path: str | os.PathLike, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                     query_img: torch.Tensor, query_mask: torch.Tensor, pred: torch.Tensor, title: str,
                     iou: float | None = None) -> None:
    """One episode: the K supports with their masks, the query with its ground truth, the query with the
    prediction (its caption carries the IoU), and the legend. Images are normalised (3, S, S) tensors; masks
    may have another size (the query's original one): they are scaled to the panel."""
    panels = [draw_panel(to_rgb(img), [(m, SUPPORT)], f"support {k + 1}")
              for k, (img, m) in enumerate(zip(support_imgs, support_masks))]
    query = to_rgb(query_img)
    panels.append(draw_panel(query, [(query_mask, TRUTH)], "ground truth"))
    panels.append(draw_panel(query, [(pred, PREDICTION)], "prediction" + (f"  IoU {iou:.1f}%" if iou is not None
                                                                          else "")))
    save_picture(path, compose(panels, title, [SUPPORT, TRUTH, PREDICTION]))


def prediction_picture(query: Image.Image | np.ndarray, pred: np.ndarray, supports: Sequence[Panel],
                       title: str) -> Image.Image:
    """A prediction on one's own image: the support panels (draw_panel(image, [(mask, SUPPORT)], caption),
    drawn once for all queries), then the query with the predicted mask and its share of the image."""
    share = float(np.asarray(pred).astype(bool).mean())
    panel = draw_panel(query, [(pred, PREDICTION)], f"prediction: {share:.1%} of the image")
    return compose([*supports, panel], title, [SUPPORT, PREDICTION])


def class_styles(names: Sequence[str]) -> list[MaskStyle]:
    """One style per class of an N-way prediction, in label order (label k: names[k - 1])."""
    return [MaskStyle(name, CLASS_COLOURS[k % len(CLASS_COLOURS)]) for k, name in enumerate(names)]


def labels_picture(query: Image.Image | np.ndarray, labels: np.ndarray, styles: Sequence[MaskStyle],
                   supports: Sequence[Panel], title: str) -> Image.Image:
    """An N-way prediction: the support panels (each in its class's colour), then the query with every class's
    region in its colour (label k: styles[k - 1]) and a legend naming each class with its share of the image."""
    labels = np.asarray(labels)
    masks = [(labels == k + 1, style) for k, style in enumerate(styles)]
    panel = draw_panel(query, masks, f"prediction: {(labels > 0).mean():.1%} of the image in a class")
    legend = [MaskStyle(f"{style.label} {mask.mean():.1%}", style.colour) for mask, style in masks]
    return compose([*supports, panel], title, legend)
