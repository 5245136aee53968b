"""Episode pictures (dcama/visualize.py): one row of tiles, the masks tinted, the title above."""

import numpy as np
import torch
from PIL import Image

from dcama.data.common import IMAGENET_MEAN, IMAGENET_STD
from dcama.visualize import save_episode_png, to_rgb


def grey_image(size: int) -> torch.Tensor:
    """A normalised image that is mid-grey (128) everywhere."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (torch.full((3, size, size), 128 / 255) - mean) / std


def test_to_rgb_undoes_the_normalisation():
    assert torch.equal(to_rgb(grey_image(4)), torch.full((4, 4, 3), 128, dtype=torch.uint8))


def test_episode_png_tiles_and_tints(tmp_path):
    size, shots = 16, 2
    img = grey_image(size)
    mask = torch.zeros(size, size)
    mask[:, :8] = 1
    path = tmp_path / "episode.png"
    save_episode_png(path, torch.stack([img] * shots), torch.stack([mask] * shots), img, mask.long(),
                     torch.zeros(8, 8, dtype=torch.long), "episode 0")
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    header = pixels.shape[0] - size
    assert pixels.shape[1] == (shots + 2) * size and header > 0
    tile = lambda i: pixels[header:, i * size:(i + 1) * size]  # noqa: E731
    for i in range(shots):  # supports: the masked half tinted red, the rest untouched
        assert (tile(i)[:, :8] == [192, 64, 64]).all() and (tile(i)[:, 8:] == 128).all()
    assert (tile(shots)[:, :8] == [64, 164, 64]).all()  # ground truth in green
    assert (tile(shots + 1) == 128).all()  # an empty prediction (resized to the tile) tints nothing
