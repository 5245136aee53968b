"""Pictures (dcama/visualize.py): panels scaled to one height, masks as a light fill under a contour that shows
on any colour, captions that stay inside their panel's column, a wrapped title, a legend."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcama.data.common import IMAGENET_MEAN, IMAGENET_STD
from dcama.visualize import (BACKGROUND, FILL_ALPHA, GAP, HALO, MARGIN, PANEL_HEIGHT, PREDICTION, SUPPORT, TRUTH,
                             Panel, compose, draw_panel, save_episode_png, to_rgb)


def grey_image(size: int) -> torch.Tensor:
    """A normalised image that is mid-grey (128) everywhere."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (torch.full((3, size, size), 128 / 255) - mean) / std


def square_mask(size: int, lo: int, hi: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 1
    return mask


def test_to_rgb_undoes_the_normalisation():
    assert torch.equal(to_rgb(grey_image(4)), torch.full((4, 4, 3), 128, dtype=torch.uint8))


def test_small_images_upscaled_with_a_light_fill_and_a_contour():
    image = np.full((16, 16, 3), 128, np.uint8)
    image[0, 0] = 0  # one dark pixel: nearest upscaling keeps it a sharp block
    panel = draw_panel(image, [(square_mask(16, 4, 12), PREDICTION)], "x")
    px = np.asarray(panel.image).astype(int)
    scale = PANEL_HEIGHT // 16
    assert px.shape == (PANEL_HEIGHT, PANEL_HEIGHT, 3)
    assert (px[:scale, :scale] == 0).all() and (px[scale, scale] == 128).all()
    light = np.round((1 - FILL_ALPHA) * 128 + FILL_ALPHA * np.array(PREDICTION.colour))
    centre = px[6 * scale:10 * scale, 6 * scale:10 * scale]
    assert (centre == light).all()
    assert np.abs(light - 128).sum() < np.abs(light - PREDICTION.colour).sum()  # light: nearer the image
    edge = 4 * scale  # the mask's left edge, in panel pixels
    row = px[8 * scale]
    assert (row[edge - 2:edge + 2] == PREDICTION.colour).all()  # a 4 px line centred on the edge
    assert (row[edge - 3] == HALO).all() and (row[edge + 2] == HALO).all()  # a dark line on each side
    assert (row[:edge - 3] == 128).all()  # outside the contour the image is untouched


def test_contour_shows_on_an_object_of_the_masks_own_colour():
    mask = square_mask(32, 8, 24)
    image = np.where(mask[..., None] == 1, np.array(TRUTH.colour, np.uint8), np.uint8(255)).astype(np.uint8)
    px = np.asarray(draw_panel(image, [(mask, TRUTH)], "x").image).astype(int)
    scale = PANEL_HEIGHT // 32
    for line in (px[16 * scale], px[:, 16 * scale]):  # across the left/right and the top/bottom edges
        dark = np.flatnonzero((line == HALO).all(axis=1))
        assert len(dark) == 4  # one dark line on each side of the coloured line, at both edges
        assert abs(dark[0] - 8 * scale) <= 3 and abs(dark[-1] - 24 * scale) <= 3


def test_masks_of_other_sizes_and_large_images_are_scaled_to_the_panel():
    big = np.full((600, 1000, 3), 90, np.uint8)
    mask = np.zeros((60, 100), np.uint8)
    mask[:, :50] = 1  # the left half, given at a tenth of the image's size
    px = np.asarray(draw_panel(big, [(mask, SUPPORT)], "x").image).astype(int)
    assert px.shape == (PANEL_HEIGHT, round(1000 * PANEL_HEIGHT / 600), 3)
    middle = px[PANEL_HEIGHT // 2]
    light = np.round((1 - FILL_ALPHA) * 90 + FILL_ALPHA * np.array(SUPPORT.colour))
    assert (middle[10:px.shape[1] // 2 - 5] == light).all() and (middle[px.shape[1] // 2 + 5:] == 90).all()


def panel_top(canvas: np.ndarray, value: int) -> int:
    return int(np.flatnonzero((canvas[:, MARGIN] == value).all(axis=1))[0])


def test_captions_stay_in_their_columns_and_the_title_wraps():
    panels = [Panel(Image.new("RGB", (100, 80), (128, 128, 128)), "a caption far too long for one panel " * 3),
              Panel(Image.new("RGB", (60, 80), (128, 128, 128)), "second")]
    title = "a long title " * 12
    one_line = np.asarray(compose(panels, "short", [SUPPORT])).astype(int)
    canvas = np.asarray(compose(panels, title, [SUPPORT, TRUTH, PREDICTION])).astype(int)
    assert canvas.shape[1] == 2 * MARGIN + 100 + GAP + 60
    top = panel_top(canvas, 128)
    assert top > panel_top(one_line, 128)  # the title took several lines
    text = canvas[:top]
    assert (text[:, -MARGIN:] == BACKGROUND).all() and (text[:, :MARGIN] == BACKGROUND).all()
    captions = canvas[top - 16:top]  # the caption line: its text ends before the gap between the columns
    assert (captions[:, MARGIN:MARGIN + 100] != BACKGROUND).any()  # the long caption is there, shortened
    assert (captions[:, MARGIN + 100:MARGIN + 100 + GAP] == BACKGROUND).all()
    legend = canvas[top + 80:]
    for style in (SUPPORT, TRUTH, PREDICTION):  # every style has its swatch in the legend
        assert (legend == style.colour).all(axis=2).any(), style.label


def test_episode_png(tmp_path):
    size, shots = 16, 2
    img = grey_image(size)
    mask = torch.from_numpy(square_mask(size, 0, 8))
    path = tmp_path / "episode.png"
    save_episode_png(path, torch.stack([img] * shots), torch.stack([mask.float()] * shots), img, mask.long(),
                     torch.zeros(8, 8, dtype=torch.long), "episode 0", iou=0.0)
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    assert pixels.shape[1] == 2 * MARGIN + (shots + 2) * PANEL_HEIGHT + (shots + 1) * GAP
    tiles = [pixels[:, MARGIN + i * (PANEL_HEIGHT + GAP):][:, :PANEL_HEIGHT] for i in range(shots + 2)]
    for i, style in enumerate([SUPPORT] * shots + [TRUTH]):
        assert (tiles[i] == style.colour).all(axis=2).any()
    assert not (tiles[-1] == PREDICTION.colour).all(axis=2).any()  # an empty prediction draws nothing
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("caption", ["", "x" * 500])
def test_any_caption_length(caption):
    compose([Panel(Image.new("RGB", (20, 20)), caption)], caption, [])
