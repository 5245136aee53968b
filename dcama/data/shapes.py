""""shapes": a procedurally generated few-shot benchmark that needs no download.

48 classes = 12 hues x 4 colour patterns (solid, stripes, checker, dots), each with its own shape family and
pattern scale. An image of class c shows 1-3 instances of c (the foreground) among 2-3 distractor objects of
other classes of the same split whose hue is >= 90 degrees away (clearly different), on a smooth
low-saturation background. Fold f (0..3) splits the classes:
test = {(hue + pattern) % 4 == f} (12 classes, all hues and patterns, one class per hue), val = the 6
even-hue classes with (hue + pattern) % 4 == f+1, trn = the other 30. Test classes are novel combinations
(shape family, hue, pattern) whose hue and pattern appear in training classes too.

Everything is a pure function of (seed, fold, split, class, image number) or, for episodes, of
(seed, epoch, index), rendered directly at img_size with vectorised numpy.
"""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from dcama.config import BENCHMARK_RULES, EVAL_EPISODES, PUBLISHED_IMG_SIZE
from dcama.data.common import SPLITS, FewShotDataset, draw_others, uint8_to_tensor, validate_args
from dcama.data.folder import write_image_and_mask, write_splits

N_HUES = 12
N_PATTERNS = 4  # 0 solid, 1 stripes, 2 checker, 3 dots
N_CLASSES = N_HUES * N_PATTERNS
N_FOLDS = BENCHMARK_RULES["shapes"].n_folds
MIN_HUE_GAP = 3  # distractor hues differ from the target's by >= 90 degrees
SHAPE_FAMILIES = ("ellipse", "rectangle", "triangle", "diamond", "star", "ring")
# Images per class that episodes draw from (a finite pool gives images stable names).
POOL_SIZE = {"trn": 100_000, "val": 1000, "test": 1000}
_IMAGE_TAG = 0x5A4E  # separates the image streams from the episode streams of common.episode_rng


def class_hue_pattern(c: int) -> tuple[int, int]:
    return c % N_HUES, c // N_HUES


def class_name(c: int) -> str:
    """The class's name in image names and exported folders: c00 .. c47."""
    return f"c{c:02d}"


def split_classes(fold: int, split: str) -> list[int]:
    """Class indices of a split of a fold (disjoint across trn / val / test)."""
    def group(g: int) -> list[int]:
        return [c for c in range(N_CLASSES) if sum(class_hue_pattern(c)) % N_FOLDS == g]

    test = group(fold)
    val = [c for c in group((fold + 1) % N_FOLDS) if class_hue_pattern(c)[0] % 2 == 0]
    if split == "test":
        return test
    if split == "val":
        return val
    return [c for c in range(N_CLASSES) if c not in test and c not in val]


def _hue_gap(a: int, b: int) -> int:
    d = abs(class_hue_pattern(a)[0] - class_hue_pattern(b)[0]) % N_HUES
    return min(d, N_HUES - d)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


@lru_cache(maxsize=None)
def class_style(c: int) -> dict[str, Any]:
    """The fixed appearance of class c: shape family, two colours, pattern and its scale."""
    h, p = class_hue_pattern(c)
    hue = h / N_HUES
    primary = _hsv(hue, 0.9, 0.95)
    # Even hues pair with a dark tone of the hue, odd hues with a pale one: a second within-class cue.
    secondary = _hsv(hue, 0.9, 0.3) if h % 2 == 0 else _hsv(hue, 0.2, 1.0)
    return {
        "shape": SHAPE_FAMILIES[(h + 2 * p) % len(SHAPE_FAMILIES)],
        "pattern": p,
        "primary": primary,
        "secondary": secondary,
        "period": 0.45 + 0.15 * ((h // 2) % 2),  # pattern period in units of the object radius
    }


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "ellipse":
        return u * u + v * v <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":
        return (v >= -0.6) & (1.7320508 * np.abs(u) + v <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    rho = np.sqrt(u * u + v * v)
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.5)
    # star: five-pointed radial profile
    return rho <= 0.72 + 0.28 * np.cos(5.0 * np.arctan2(v, u))


def _pattern(pattern: int, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Boolean field: True where the secondary colour shows."""
    if pattern == 0:
        return np.zeros(u.shape, dtype=bool)
    if pattern == 1:
        return np.floor(u / period * 2.0).astype(np.int64) % 2 == 1
    if pattern == 2:
        return (np.floor(u / period).astype(np.int64) + np.floor(v / period).astype(np.int64)) % 2 == 1
    du = u / period - np.round(u / period)
    dv = v / period - np.round(v / period)
    return du * du + dv * dv <= 0.09


def _draw(img: np.ndarray, c: int, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray | None:
    """Paint one instance of class c at a random place; returns its pixel mask within the image or None."""
    size = img.shape[0]
    st = class_style(c)
    r = size * rng.uniform(*scale)
    aspect = rng.uniform(0.75, 1.3)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    cx, cy = (float(v) for v in rng.uniform(0.1 * size, 0.9 * size, size=2))  # python floats keep float32 maths
    reach = r * max(1.0, aspect) + 1.0
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    xs, ys = _grid(size)
    dx, dy = xs[y0:y1, x0:x1] - cx, ys[y0:y1, x0:x1] - cy
    cos, sin = math.cos(theta), math.sin(theta)
    u = (dx * cos + dy * sin) / r
    v = (dy * cos - dx * sin) / (r * aspect)
    inside = _shape_mask(st["shape"], u, v)
    second = _pattern(st["pattern"], u, v, st["period"])
    colour = np.where(second[..., None], st["secondary"], st["primary"])
    # Gentle shading and brightness jitter: instances of a class vary, its colours stay recognisable.
    colour = colour * (rng.uniform(0.9, 1.05) - 0.08 * v)[..., None]
    region = img[y0:y1, x0:x1]
    region[inside] = colour[inside]
    full = np.zeros(img.shape[:2], dtype=bool)
    full[y0:y1, x0:x1] = inside
    return full


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth low-saturation background: tinted base, linear gradient, two soft waves, faint noise."""
    xs, ys = _grid(size)
    base = _hsv(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.75))
    a = [float(v) for v in rng.uniform(0.0, 2.0 * np.pi, size=3)]  # python floats keep float32 maths
    shade = rng.uniform(-0.15, 0.15) * ((xs * math.cos(a[0]) + ys * math.sin(a[0])) / size - 0.5)
    for angle in a[1:]:
        freq = 2.0 * math.pi / (size * rng.uniform(0.3, 1.0))
        shade += 0.05 * np.sin(freq * (xs * math.cos(angle) + ys * math.sin(angle)) + rng.uniform(0, 6.3))
    img = base[None, None, :] + shade[..., None]
    return img + 0.02 * rng.standard_normal(size=img.shape, dtype=np.float32)


@lru_cache(maxsize=None)
def _distractor_classes(c: int, pool: tuple[int, ...]) -> list[int]:
    # The split's classes whose hue is at least MIN_HUE_GAP steps from c's: no distractor shares the target's
    # colour family, so they are clearly different at every scale.
    return [d for d in pool if _hue_gap(d, c) >= MIN_HUE_GAP]


def render_image(c: int, distractor_pool: list[int], size: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One image of class c: (H, W, 3) float32 RGB in [0, 1] and its (H, W) uint8 foreground mask."""
    img = _background(size, rng).astype(np.float32)
    others = _distractor_classes(c, tuple(distractor_pool))
    n_distractors = int(rng.integers(2, 4))
    for d in rng.choice(others, size=min(n_distractors, len(others)), replace=False):
        _draw(img, int(d), rng, (0.10, 0.18))
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)):
        drawn = _draw(img, c, rng, (0.12, 0.20))
        if drawn is not None:
            mask |= drawn
    if rng.random() < 0.3:  # a small distractor in front, so instances are sometimes partly occluded
        before = img.copy()
        drawn = _draw(img, int(rng.choice(others)), rng, (0.05, 0.08))
        if drawn is not None and (mask & ~drawn).any():
            mask &= ~drawn
        else:  # never hide the whole foreground
            img = before
    return np.clip(img, 0.0, 1.0), mask.astype(np.uint8)


class ShapesDataset(FewShotDataset):
    """Episodes of the shapes benchmark; len = `episodes` for every split (root is not used).

    Each class has a fixed pool of numbered images (POOL_SIZE per split); an episode draws a class uniformly,
    then a query and K distinct other support images from the class's pool.
    """

    rules = BENCHMARK_RULES["shapes"]  # its max_shot: the smallest pool less the query (tested)

    def __init__(self, root: str | None = None, fold: int = 0, split: str = "test", shot: int = 1,
                 img_size: int = PUBLISHED_IMG_SIZE, use_original_imgsize: bool = False, episodes: int = EVAL_EPISODES,
                 seed: int = 0) -> None:
        validate_args(split, fold, self.rules.n_folds, shot, img_size, seed, episodes)
        super().__init__(split, shot, img_size, use_original_imgsize, seed)
        self.fold = fold
        self.class_ids = split_classes(fold, split)
        self.length = episodes

    def __len__(self) -> int:
        return self.length

    def class_name(self, class_id: int) -> str:
        return class_name(class_id)

    def render(self, class_id: int, number: int) -> tuple[np.ndarray, np.ndarray]:
        """Image `number` of a class's pool: (H, W, 3) uint8 RGB and (H, W) {0, 1} uint8 mask.

        8-bit like a picture file, so that the images written as PNG files (export_folder) are exactly the
        images the benchmark gives."""
        rng = np.random.default_rng(np.random.SeedSequence(
            [self.seed, _IMAGE_TAG, self.fold, SPLITS.index(self.split), class_id, number]))
        rgb, mask = render_image(class_id, self.class_ids, self.img_size, rng)
        return np.round(rgb * 255.0).astype(np.uint8), mask

    def _load(self, class_id: int, number: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        rgb, mask = self.render(class_id, number)
        return uint8_to_tensor(rgb), torch.from_numpy(mask), f"shapes/{self.split}/{class_name(class_id)}/{number:06d}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self.check_index(index)
        rng = self.rng(index)
        class_id = self.class_ids[int(rng.integers(len(self.class_ids)))]
        pool = POOL_SIZE[self.split]
        q = int(rng.integers(pool))
        picks = draw_others(rng, pool, q, self.shot)
        return self.assemble(class_id, self._load(class_id, q), [self._load(class_id, j) for j in picks])


def export_folder(root: str, fold: int = 0, images_per_class: int = 20, img_size: int = 96, seed: int = 0,
                  splits: tuple[str, ...] = SPLITS) -> None:
    """Write the classes of a fold's splits as a folder benchmark (docs/data.md): <root>/c<class>/<number>.png
    with <number>.mask.png for numbers 000000 .. images_per_class - 1, and splits.json with the fold's split.

    `build_dataset("folder", root, split=s, img_size=img_size)` then reads back exactly the images and masks
    that `ShapesDataset(fold=fold, split=s, img_size=img_size, seed=seed)` renders; with all three splits
    exported the class ids agree too (a folder class's id is its place among the sorted class folders).
    """
    listed = {}
    for split in splits:
        ds = ShapesDataset(fold=fold, split=split, img_size=img_size, seed=seed)
        listed[split] = [class_name(c) for c in ds.class_ids]
        for c in ds.class_ids:
            for number in range(images_per_class):
                write_image_and_mask(root, class_name(c), f"{number:06d}", *ds.render(c, number))
    write_splits(root, listed)
