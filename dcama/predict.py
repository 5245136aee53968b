"""Prediction engine: segment one's own images from K support images with their masks.

`segment(model, supports, queries)` is the Python entry point (images in, masks out); `predict_files` is what
`eval/predict.py` runs: it reads and checks every file before the model is loaded, then writes each query's
mask at the query's original size and an overlay picture, every file atomically (docs/predict.md).

Images and masks are read as the folder benchmark reads them (`dcama.data.common`): RGB turned by the EXIF
orientation, masks converted to grey and thresholded at MASK_THRESHOLD; each query goes through the model as
an evaluation episode does, its logits resized to the original size by `DCAMA.predict`.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_checkpoint_file, trained_img_size
from .config import CPU_THREADS, PUBLISHED_IMG_SIZE
from .data.common import (MASK_THRESHOLD, grey_to_binary, image_size, load_grey_mask, load_rgb, mask_grey,
                          preprocess_image, resize_mask)
from .data.folder import FOLLOW_EXIF_ORIENTATION, IMAGE_SUFFIXES, image_names, natural_key
from .files import write_json
from .flags import check_img_size, check_output, writing
from .model import DCAMA
from .runtime import autocast_context, check_device, cpu_threads
from .visualize import SUPPORT, Panel, draw_panel, prediction_picture, save_picture

__all__ = ["InputError", "SupportSet", "load_model", "predict_files", "query_files", "read_support", "segment"]

ImageLike = str | os.PathLike | Image.Image | np.ndarray
RESULTS_FILE = "predictions.json"


class InputError(ValueError):
    """An input a prediction cannot use (a mask of the wrong size or empty, no query found, a full --out)."""


# ------------------------------------------------------------------------------------------------ inputs
def _image(image: ImageLike) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(os.fspath(image), exif_orientation=FOLLOW_EXIF_ORIENTATION)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def _mask_values(mask: ImageLike) -> np.ndarray:
    """Grey values (uint8) of a mask file, PIL image or numeric array, or a bool array as it is."""
    if isinstance(mask, (str, os.PathLike)):
        return load_grey_mask(os.fspath(mask))
    if isinstance(mask, Image.Image):
        return mask_grey(mask)
    return np.asarray(mask)


def _name(item: ImageLike, fallback: str) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else fallback


def read_support(image: ImageLike, mask: ImageLike, index: int = 0) -> tuple[Image.Image, np.ndarray]:
    """A support image (RGB) and its (H, W) {0, 1} uint8 mask, read as the folder benchmark reads them and
    checked: the same size, some foreground. Errors name the files."""
    img, values = _image(image), _mask_values(mask)
    m = values.astype(np.uint8) if values.dtype == bool else grey_to_binary(values)
    image_name, mask_name = _name(image, f"support image {index + 1}"), _name(mask, f"support mask {index + 1}")
    if m.shape != (img.height, img.width):
        raise InputError(f"mask {mask_name} is {m.shape[0]}x{m.shape[1]} (HxW) but its image {image_name} is "
                         f"{img.height}x{img.width}")
    if not m.any():
        top = 0 if values.dtype == bool or not values.size else int(values.max())
        hint = f"; its largest value is {top}: save a 0/1 mask as 0/255" if 0 < top < MASK_THRESHOLD else ""
        raise InputError(f"mask {mask_name} has no foreground pixel (grey value >= {MASK_THRESHOLD}){hint}")
    return img, m


@dataclass
class SupportSet:
    """The K supports as the model takes them: images (K, 3, S, S) normalised, masks (K, S, S) float {0, 1}."""

    images: torch.Tensor
    masks: torch.Tensor

    @classmethod
    def build(cls, supports: Sequence[tuple[Image.Image, np.ndarray]], img_size: int) -> "SupportSet":
        """Preprocessed as the data sets do: bilinear image resize, nearest mask resize (dcama.data.common)."""
        if not supports:
            raise InputError("at least one support image with its mask is needed")
        images = torch.stack([preprocess_image(img, img_size) for img, _ in supports])
        masks = torch.stack([resize_mask(torch.from_numpy(m), img_size) for _, m in supports]).float()
        return cls(images, masks)


def query_files(patterns: Sequence[str | os.PathLike]) -> list[str]:
    """Absolute paths of the image files that files, folders and glob patterns name, in the order given,
    duplicates dropped. A folder gives its images (not its subfolders'), in natural order, by the folder
    benchmark's rule, so the masks beside them are left out; a file named explicitly is taken as an image."""
    found: list[str] = []
    for pattern in map(os.fspath, patterns):
        if os.path.isdir(pattern):
            listed = image_names([e.name for e in os.scandir(pattern) if e.is_file()])
            if not listed:
                raise InputError(f"query folder {pattern} holds no image files (.png, {', '.join(IMAGE_SUFFIXES)})")
            found += [os.path.join(pattern, name) for name in listed]
        elif os.path.isfile(pattern):
            found.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted((p for p in glob.glob(pattern) if os.path.isfile(p)), key=natural_key)
            if not matches:
                raise InputError(f"query pattern {pattern!r} matches no file")
            found += matches
        else:
            raise FileNotFoundError(f"query file or folder not found: {pattern}")
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


# ------------------------------------------------------------------------------------------------- model
def load_model(checkpoint: str | os.PathLike, *, backbone: str | None = None, attn_impl: str = "auto",
               device: str | torch.device | None = None) -> tuple[DCAMA, int]:
    """A checkpoint's model (ours or the authors') on `device` (None: CUDA when there is one) in eval mode,
    and the image side to run it at: `dcama.checkpoint.trained_img_size`, whose fallback here is the
    published 384 (a file of ours that records no size). The file is read once: its dict gives the size and
    then the weights (`DCAMA.from_loaded`)."""
    dev = check_device(device)
    blob = load_checkpoint_file(checkpoint)
    side = trained_img_size(blob, PUBLISHED_IMG_SIZE)
    model = DCAMA.from_loaded(blob, os.fspath(checkpoint), backbone=backbone, attn_impl=attn_impl)
    del blob  # its tensors are the model's now
    return model.to(dev).eval(), side


# --------------------------------------------------------------------------------------------- inference
def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices into `sizes` in batches of at most batch_size queries of one (H, W): DCAMA.predict resizes a
    whole batch to one original size."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def predict_batch(model: DCAMA, supports: SupportSet, queries: Sequence[Image.Image], img_size: int,
                  amp: str = "off") -> torch.Tensor:
    """(B, H, W) long {0, 1} masks of queries that share one original size (H, W)."""
    device = next(model.parameters()).device
    batch = len(queries)
    query = torch.stack([preprocess_image(img, img_size) for img in queries]).to(device)
    images = supports.images.to(device).unsqueeze(0).expand(batch, -1, -1, -1, -1)
    masks = supports.masks.to(device).unsqueeze(0).expand(batch, -1, -1, -1)
    with torch.no_grad(), autocast_context(device, amp):
        return model.predict(query, images, masks, out_size=(queries[0].height, queries[0].width))


def _segment_iter(model: DCAMA, supports: SupportSet, batches: Sequence[list[int]],
                  load: Callable[[int], Image.Image], img_size: int, amp: str,
                  progress: bool) -> Iterator[tuple[int, Image.Image, np.ndarray]]:
    """(index, query image, (H, W) bool mask) for every query, batch by batch (size_batches); `load(i)` reads
    query i."""
    total = sum(map(len, batches))
    with tqdm(total=total, desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            images = [load(i) for i in batch]
            masks = predict_batch(model, supports, images, img_size, amp).cpu().numpy().astype(bool)
            for i, img, mask in zip(batch, images, masks):
                yield i, img, mask
            bar.update(len(batch))


def segment(model: DCAMA, supports: Sequence[tuple[ImageLike, ImageLike]], queries: Sequence[ImageLike], *,
            img_size: int, batch_size: int = 8, amp: str = "off", progress: bool = False) -> list[np.ndarray]:
    """Segment every query like the supports: a (H, W) bool mask per query, at the query's own size.

    supports: K (image, mask) pairs; images and queries are file paths, PIL images or (H, W, 3) uint8 arrays;
    masks are paths or PIL images (grey >= 128 is foreground), bool arrays, or grey arrays. `img_size` is the
    side the model runs at (`load_model` returns the checkpoint's). The model should be in eval mode.
    """
    support_set = SupportSet.build([read_support(img, m, k) for k, (img, m) in enumerate(supports)], img_size)
    images = [_image(q) for q in queries]
    batches = size_batches([(im.height, im.width) for im in images], batch_size)
    out: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(images)
    for i, _, mask in _segment_iter(model, support_set, batches, images.__getitem__, img_size, amp, progress):
        out[i] = mask
    return out


# ----------------------------------------------------------------------------------------- files in, out
def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """--out must be a folder this process can write in (`check_output`), new or empty unless overwrite:
    results of another run are never mixed in silently."""
    check_output("out", out_dir, folder=True)
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"--out {out_dir} already holds files (e.g. {next(out_dir.iterdir()).name}): choose a new "
                         "or empty folder, or pass --overwrite to replace the results of the same names")


def output_names(queries: Sequence[str]) -> list[str]:
    """Each query's output name: its path relative to the queries' common folder, without the extension.
    Two queries that would write the same files are an error."""
    common = os.path.commonpath([os.path.dirname(q) for q in queries])
    names = [os.path.splitext(os.path.relpath(q, common))[0] for q in queries]
    seen: dict[str, str] = {}
    for name, query in zip(names, queries):
        if name in seen:
            raise InputError(f"queries {seen[name]} and {query} would write the same mask {name}.png: rename one")
        seen[name] = query
    return names


def check_queries(queries: Sequence[str]) -> list[tuple[int, int]]:
    """Each query's (H, W) from its header; every unreadable file named in one error."""
    sizes, bad = [], []
    for q in queries:
        try:
            sizes.append(image_size(q, exif_orientation=FOLLOW_EXIF_ORIENTATION))
        except OSError as err:  # DatasetFileError and FileNotFoundError name the file
            bad.append(str(err))
    if bad:
        raise InputError(f"{len(bad)} query file(s) cannot be read: " + "; ".join(bad))
    return sizes


def predict_files(checkpoint: str | os.PathLike, supports: Sequence[tuple[str, str]], queries: Sequence[str],
                  out_dir: str | os.PathLike, *, img_size: int | None = None, batch_size: int = 8,
                  backbone: str | None = None, attn_impl: str = "auto", amp: str = "off",
                  device: str | None = None, threads: int = CPU_THREADS, overwrite: bool = False,
                  overlays: bool = True, progress: bool = True) -> dict[str, Any]:
    """What eval/predict.py does: masks of the query files (`query_files` expands folders and globs) into
    out_dir/masks/<name>.png (0/255, the query's size), overlay pictures into out_dir/overlays/<name>.png,
    and out_dir/predictions.json (the settings and one entry per query), written last. Every input is
    checked before the model is loaded; every file is written atomically. `threads`: torch CPU threads
    on a CPU device (`runtime.cpu_threads`; 0: torch's default). Returns the predictions.json content."""
    out, dev = Path(out_dir), check_device(device)
    check_out_dir(out, overwrite)
    paths = query_files(queries)
    pairs = [read_support(img, m, k) for k, (img, m) in enumerate(supports)]
    sizes, names = check_queries(paths), output_names(paths)
    batches = size_batches(sizes, batch_size)
    model, trained_size = load_model(checkpoint, backbone=backbone, attn_impl=attn_impl, device=dev)
    side = img_size or trained_size
    check_img_size(model.config["backbone"], side, built_for=model.backbone.img_size)
    support_set = SupportSet.build(pairs, side)
    panels = _support_panels(pairs, supports) if overlays else []
    records: list[dict[str, Any]] = [{} for _ in paths]
    start = time.perf_counter()
    with cpu_threads(threads, dev):
        load = lambda i: load_rgb(paths[i], exif_orientation=FOLLOW_EXIF_ORIENTATION)  # noqa: E731
        for i, image, mask in _segment_iter(model, support_set, batches, load, side, amp, progress):
            title = names[i] + os.path.splitext(paths[i])[1]
            records[i] = _write_outputs(out, names[i], paths[i], title, image, mask, panels)
    result = {"settings": {"checkpoint": os.fspath(checkpoint), "supports": [list(map(os.fspath, s)) for s in supports],
                           "img_size": side, "batch_size": batch_size, "attn_impl": attn_impl, "amp": amp,
                           "device": str(next(model.parameters()).device), "threads": threads,
                           "model_config": dict(model.config),
                           "seconds": round(time.perf_counter() - start, 3)},
              "queries": records}
    with writing(out / RESULTS_FILE):
        write_json(out / RESULTS_FILE, result)
    return result


def _support_panels(pairs: Sequence[tuple[Image.Image, np.ndarray]], files: Sequence[tuple[str, str]]) -> list[Panel]:
    return [draw_panel(img, [(m, SUPPORT)], f"support {k + 1}: {os.path.basename(os.fspath(files[k][0]))}")
            for k, (img, m) in enumerate(pairs)]


def _write_outputs(out: Path, name: str, path: str, title: str, image: Image.Image, mask: np.ndarray,
                   panels: Sequence[Panel]) -> dict[str, Any]:
    """One query's mask PNG (0/255) and overlay picture; its predictions.json entry."""
    record: dict[str, Any] = {"image": path, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                              "foreground": round(float(mask.mean()), 6), "mask": f"masks/{name}.png"}
    with writing(out / record["mask"]):
        save_picture(out / record["mask"], Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))
    if panels:
        record["overlay"] = f"overlays/{name}.png"
        with writing(out / record["overlay"]):
            save_picture(out / record["overlay"], prediction_picture(image, mask, panels, title))
    return record
