"""Shared pieces of the few-shot datasets: preprocessing, file reading with clear errors, episode seeding."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from dcama.config import BenchmarkRules

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("trn", "val", "test")
# Binary masks (FSS-1000, the folder benchmark, eval/predict.py): grey value >= 128 is foreground.
MASK_THRESHOLD = 128
_EXIF_ORIENTATION_TAG = 0x0112  # the EXIF tag ImageOps.exif_transpose follows


class DatasetFileError(OSError):
    """An image or mask file of a benchmark cannot be read (corrupt, truncated, wrong format)."""


def split_file(*parts: str) -> str:
    """Path of a split list shipped as package data under dcama/data/splits/."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits", *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shipped split list missing: {path} (reinstall the package)")
    return path


def check_dir(path: str, what: str, layout: str) -> None:
    """Raise FileNotFoundError naming the expected layout when a benchmark folder is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path!r} is not a directory.\n{layout}")


@contextmanager
def open_image(path: str, what: str) -> Iterator[Image.Image]:
    """Image.open(path) whose errors name the file and `what` it is: FileNotFoundError for a missing file,
    DatasetFileError for one PIL cannot identify or decode (errors raised inside the block included: PIL
    decodes lazily)."""
    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file missing: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetFileError(f"cannot read {what} {path}: {unreadable_reason(err)}") from err


def unreadable_reason(err: BaseException) -> str:
    """Why an image or mask file could not be read, in words that do not name it (the message names it once):
    `err` is what PIL or the system raised, or the DatasetFileError `open_image` raised from it."""
    cause = err.__cause__ if isinstance(err, DatasetFileError) and err.__cause__ else err
    if isinstance(cause, UnidentifiedImageError):  # PIL's text repeats the path
        return "not an image file PIL can identify"
    return cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)


def load_rgb(path: str, exif_orientation: bool = False) -> Image.Image:
    """Open an image as RGB, naming the file in any error (PIL opens lazily, so force the decode here).

    exif_orientation turns the pixels the way the file's EXIF orientation tag says (as photo viewers show
    them): the folder benchmark and eval/predict.py do, for people's photos; the published benchmarks read the
    pixels as stored, as the original code did.
    """
    with open_image(path, "image") as img:
        return (ImageOps.exif_transpose(img) if exif_orientation else img).convert("RGB")


def image_size(path: str, exif_orientation: bool = False, what: str = "image") -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels (as load_rgb would
    return it); errors as load_rgb's, naming the file as `what` ("mask")."""
    with open_image(path, what) as img:
        turned = exif_orientation and img.getexif().get(_EXIF_ORIENTATION_TAG) in (5, 6, 7, 8)
        return (img.width, img.height) if turned else (img.height, img.width)


def load_label(path: str) -> np.ndarray:
    """Read a label PNG as a (H, W) uint8 array of its palette indices / grey values, naming the file on error."""
    # Palette PNGs (VOC) keep their indices; RGB/RGBA masks (some FSS-1000 files) become grey values.
    with open_image(path, "mask") as img:
        return mask_grey(img, keep_palette=True)


def load_grey_mask(path: str) -> np.ndarray:
    """A mask file as (H, W) uint8 grey values (mask_grey), naming the file on error."""
    with open_image(path, "mask") as img:
        return mask_grey(img)


def load_binary_mask(path: str) -> np.ndarray:
    """A binary mask file as a (H, W) uint8 {0, 1} array (grey value >= MASK_THRESHOLD is foreground)."""
    return grey_to_binary(load_grey_mask(path))


def mask_grey(img: Image.Image, keep_palette: bool = False) -> np.ndarray:
    """A mask image as (H, W) uint8 grey values, every mode converted the way PIL shows it (palette entries
    through their colours, RGB by luminance, 1-bit as 0/255, alpha dropped), so a white-on-black mask reads
    the same whatever format it was saved in. keep_palette keeps a palette image's indices instead (VOC)."""
    if img.mode != "L" and not (keep_palette and img.mode == "P"):
        img = img.convert("L")
    return np.array(img, dtype=np.uint8)


def grey_to_binary(grey: np.ndarray) -> np.ndarray:
    """(H, W) grey values -> {0, 1} uint8: grey >= MASK_THRESHOLD is foreground (docs/data.md, "Masks")."""
    return (np.asarray(grey) >= MASK_THRESHOLD).astype(np.uint8)


_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)


def normalize_array(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float array in [0, 1] -> normalised (3, H, W) float32 tensor (numpy: no torch thread pool)."""
    out = (rgb.astype(np.float32, copy=False) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def uint8_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> normalised (3, H, W) float32 tensor: scaled to [0, 1], ImageNet statistics."""
    return normalize_array(np.asarray(rgb, dtype=np.float32) / 255.0)


def preprocess_image(img: Image.Image, img_size: int) -> torch.Tensor:
    """Resize to a square with PIL bilinear (antialiased when shrinking), scale to [0, 1],
    normalise with the ImageNet statistics.

    This is what torchvision's Resize + ToTensor + Normalize do on a PIL image (same PIL call, same float
    ops; a test checks the equality), without importing torchvision in every data process.
    """
    return uint8_to_tensor(np.asarray(img.resize((img_size, img_size), Image.Resampling.BILINEAR)))


def resize_mask(mask: torch.Tensor, img_size: int) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) integer mask with torch interpolate (docs/data.md, "Preprocessing")."""
    if tuple(mask.shape) == (img_size, img_size):
        return mask.long()
    # Nearest picks source pixels, so uint8 (values 0, 1, 255) gives the float result with fewer conversions.
    out = F.interpolate(mask[None, None].to(torch.uint8), size=(img_size, img_size), mode="nearest")
    return out[0, 0].long()


def episode_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of every random choice of item `index`: a pure function of (seed, epoch, index).

    SeedSequence hashes the three integers, so items do not depend on the DataLoader worker that builds them,
    neighbouring indices get unrelated streams, and a resumed run rebuilds the same episodes.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def draw_others(rng: np.random.Generator, n: int, exclude: int, k: int) -> list[int]:
    """k distinct positions in range(n), all different from `exclude` (uniformly, without replacement)."""
    picks = rng.choice(n - 1, size=k, replace=False)
    return [int(p) + (p >= exclude) for p in picks]


def validate_args(split: str, fold: int, n_folds: int, shot: int, img_size: int, seed: int, episodes: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    if shot < 1:
        raise ValueError(f"shot must be >= 1, got {shot}")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")


class FewShotDataset(Dataset):
    """Base of the episode datasets: seeding, epoch, and assembly of an item from loaded images and masks."""

    # What the benchmark accepts (folds, K, a data folder): dcama.config.BENCHMARK_RULES, which the flag checks
    # read before torch is imported.
    rules: ClassVar[BenchmarkRules]

    def __init__(self, split: str, shot: int, img_size: int, use_original_imgsize: bool, seed: int) -> None:
        self.split = split
        self.shot = shot
        self.img_size = img_size
        self.use_original_imgsize = use_original_imgsize
        self.seed = seed
        self.epoch = 0
        self.class_ids: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        """Select the episodes of a training epoch (evaluation keeps epoch 0 so runs repeat exactly)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return episode_rng(self.seed, self.epoch, index)

    def describe(self, listed_in: str | None = "the run's config.json") -> dict[str, Any]:
        """What a run records about its data beyond the settings that built it (the folder benchmark: its
        class split, with a "summary" for people that says the record is `listed_in`, None: not written);
        {} for the benchmarks whose classes are fixed."""
        return {}

    def class_name(self, class_id: int) -> str:
        """The name of a class id of this benchmark, for people (per-class lines); each benchmark lists its own."""
        return str(class_id)

    def check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"episode index {index} out of range for {len(self)} episodes")
        return index % len(self)

    def assemble(
        self,
        class_id: int,
        query: tuple[torch.Tensor, torch.Tensor, str],
        supports: Sequence[tuple[torch.Tensor, torch.Tensor, str]],
        query_ignore: torch.Tensor | None = None,
        support_ignores: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Build the item dict from a preprocessed query image, raw-size masks and names.

        query/supports are (image (3,S,S), mask (H,W) integer, name). Masks are resized nearest to S except the
        query's with use_original_imgsize, which stays at its original size (and "org_query_size" is added);
        query masks come out int64, support masks float32.
        """
        q_img, q_mask, q_name = query
        s = self.img_size
        item: dict[str, Any] = {
            "query_img": q_img,
            "query_name": q_name,
            "support_imgs": torch.stack([img for img, _, _ in supports]),
            # Float supports: the model interpolates them to feature sizes; values are exactly {0, 1}.
            "support_masks": torch.stack([resize_mask(m, s) for _, m, _ in supports]).float(),
            "support_names": [name for _, _, name in supports],
            "class_id": int(class_id),
        }
        if self.use_original_imgsize:
            item["query_mask"] = q_mask.long()
            item["org_query_size"] = (int(q_mask.shape[0]), int(q_mask.shape[1]))
        else:
            item["query_mask"] = resize_mask(q_mask, s)
        if query_ignore is not None:
            item["query_ignore_idx"] = (query_ignore.long() if self.use_original_imgsize
                                        else resize_mask(query_ignore, s))
            item["support_ignore_idxs"] = torch.stack([resize_mask(m, s) for m in support_ignores])
        return item


_VARIABLE_SIZE_KEYS = ("query_mask", "query_ignore_idx", "org_query_size")


def collate_episodes(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader collate for any item kind, including use_original_imgsize.

    Identical to torch's default collate, except that with use_original_imgsize (items carry
    "org_query_size") query_mask and query_ignore_idx are lists of (H_i, W_i) tensors and org_query_size a
    list of (H, W) int tuples, since the original sizes differ within a batch.
    """
    if "org_query_size" not in batch[0]:
        return default_collate(batch)
    fixed = [{k: v for k, v in item.items() if k not in _VARIABLE_SIZE_KEYS} for item in batch]
    out = default_collate(fixed)
    for key in _VARIABLE_SIZE_KEYS:
        if key in batch[0]:
            out[key] = [item[key] for item in batch]
    return out


class ImageFilesDataset(FewShotDataset):
    """Episodes over classes of (image, mask) files, FSS-1000's protocol: every image of the split's classes
    is a query once (len = number of images, `episodes` is ignored), its K supports drawn from the other
    images of its class. Masks are binary (load_binary_mask); names are the image paths relative to `base`.

    Subclasses index their layout and call `set_files`.
    """

    exif_orientation = False

    def set_files(self, base: str, files: dict[int, list[tuple[str, str]]]) -> None:
        """files: class id -> (image path, mask path) of each of its images, in query order."""
        self.base = base
        self.files = files
        self.queries = [(cid, j) for cid, pairs in files.items() for j in range(len(pairs))]

    def __len__(self) -> int:
        return len(self.queries)

    def load_pair(self, image_path: str, mask_path: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        img = preprocess_image(load_rgb(image_path, self.exif_orientation), self.img_size)
        mask = torch.from_numpy(load_binary_mask(mask_path))
        return img, mask, os.path.relpath(image_path, self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self.check_index(index)
        class_id, q = self.queries[index]
        pairs = self.files[class_id]
        picks = draw_others(self.rng(index), len(pairs), q, self.shot)
        return self.assemble(class_id, self.load_pair(*pairs[q]), [self.load_pair(*pairs[j]) for j in picks])
