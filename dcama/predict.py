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
import warnings
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
from .model import DCAMA, resize_logits
from .runtime import autocast_context, check_device, cpu_threads
from .visualize import (SUPPORT, MaskStyle, Panel, class_styles, draw_panel, labels_picture, prediction_picture,
                        save_picture)

__all__ = ["EncodedSupports", "InputError", "SupportSet", "SupportWarning", "class_margins", "encode_classes",
           "label_map", "load_model", "predict_files", "query_files", "read_support", "segment", "segment_classes",
           "support_classes"]

ImageLike = str | os.PathLike | Image.Image | np.ndarray
RESULTS_FILE = "predictions.json"
FOREGROUND, BACKGROUND = "foreground", "background"  # the one class of (image, mask) supports; label 0's name
MAX_CLASSES = 255  # labels 1..255 in an 8-bit label map
# A support pair that looks swapped: an "image" holding only 0 and 255, a "mask" with many grey levels (more
# than SWAP_LEVELS distinct values and over SWAP_MID_SHARE of its pixels strictly between the two bounds of
# SWAP_MID). A photo has most of its pixels mid-grey; a mask saved as JPEG or with soft edges only its edges.
SWAP_LEVELS, SWAP_MID, SWAP_MID_SHARE = 16, (32, 224), 0.25


class InputError(ValueError):
    """An input a prediction cannot use (a mask of the wrong size or empty, no query found, a full --out)."""


class SupportWarning(UserWarning):
    """A support image or mask that looks like the other kind (image and mask swapped?), used as given."""


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
    _check_not_swapped(np.asarray(img), values, image_name, mask_name)
    if m.shape != (img.height, img.width):
        raise InputError(f"mask {mask_name} is {m.shape[0]}x{m.shape[1]} (HxW) but its image {image_name} is "
                         f"{img.height}x{img.width}")
    if not m.any():
        top = 0 if values.dtype == bool or not values.size else int(values.max())
        hint = f"; its largest value is {top}: save a 0/1 mask as 0/255" if 0 < top < MASK_THRESHOLD else ""
        raise InputError(f"mask {mask_name} has no foreground pixel (grey value >= {MASK_THRESHOLD}){hint}")
    return img, m


def _check_not_swapped(rgb: np.ndarray, values: np.ndarray, image_name: str, mask_name: str) -> None:
    """InputError when the image looks like a mask and the mask like a photo (both: surely swapped); a
    SupportWarning when only one of them does (a black-and-white drawing, a soft mask: maybe meant)."""
    binary_image = bool(np.isin(rgb, (0, 255)).all())
    grey = values.astype(np.uint8) if values.dtype == bool else values
    mid = float(((grey > SWAP_MID[0]) & (grey < SWAP_MID[1])).mean()) if grey.size else 0.0
    photo_mask = values.dtype != bool and len(np.unique(grey)) > SWAP_LEVELS and mid > SWAP_MID_SHARE
    image_says = f"image {image_name} holds only the values 0 and 255 (like a mask)"
    mask_says = f"mask {mask_name} has {len(np.unique(grey))} grey levels, {mid:.0%} of its pixels mid-grey (like " \
                "a photo)"
    if binary_image and photo_mask:
        raise InputError(f"{image_says} and {mask_says}: image and mask look swapped; give the image first")
    if binary_image or photo_mask:
        said = image_says if binary_image else mask_says + f", read as foreground where grey >= {MASK_THRESHOLD}"
        warnings.warn(f"{said}: are image and mask swapped?", SupportWarning, stacklevel=3)


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


@dataclass
class EncodedSupports:
    """One class's K supports as the head takes them, computed once for all queries: the frozen backbone's
    block features (K, C, h, w) each, and the masks (K, S, S), on the model's device."""

    feats: list[torch.Tensor]
    masks: torch.Tensor

    @classmethod
    def encode(cls, model: DCAMA, supports: SupportSet, amp: str = "off") -> "EncodedSupports":
        device = next(model.parameters()).device
        with torch.no_grad(), autocast_context(device, amp):
            feats = model.encode(supports.images.to(device))
        return cls(feats, supports.masks.to(device))


def support_classes(supports: Sequence[Sequence[ImageLike]]) -> list[tuple[str, list[tuple[ImageLike, ImageLike]]]]:
    """The classes of `supports` in the order they are first given, each with its (image, mask) pairs.
    `supports` are all (image, mask) pairs (one class, FOREGROUND) or all (class name, image, mask) triples."""
    lengths = {len(s) for s in supports}
    if not supports or not lengths <= {2, 3} or len(lengths) > 1:
        raise InputError("supports must be all (image, mask) pairs (one class) or all (class name, image, mask) "
                         f"triples (several classes); got {sorted(lengths) or 'none'} items per support")
    if lengths == {2}:
        return [(FOREGROUND, [(img, m) for img, m in supports])]
    classes: dict[str, list[tuple[ImageLike, ImageLike]]] = {}
    for name, img, m in supports:
        name = str(name)
        if not name.strip() or name == BACKGROUND:
            raise InputError(f"class name {name!r}: choose a non-empty name other than {BACKGROUND!r} (label 0)")
        classes.setdefault(name, []).append((img, m))
    if len(classes) > MAX_CLASSES:
        raise InputError(f"{len(classes)} classes: a label map PNG holds at most {MAX_CLASSES}")
    return list(classes.items())


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


def class_margins(model: DCAMA, classes: Sequence[EncodedSupports], queries: Sequence[Image.Image], img_size: int,
                  amp: str = "off") -> torch.Tensor:
    """(B, N, H, W) float32: for each query (one original size (H, W)) and class, the foreground logit minus
    the background logit, resized to (H, W) as `DCAMA.predict` resizes them. The queries go through the
    backbone once for all N classes; the supports' features come encoded."""
    device = next(model.parameters()).device
    batch = len(queries)
    query = torch.stack([preprocess_image(img, img_size) for img in queries]).to(device)
    margins = []
    with torch.no_grad(), autocast_context(device, amp):
        query_feats = model.encode(query)
        for cls in classes:
            support_feats = [f.repeat(batch, 1, 1, 1) for f in cls.feats]  # (B*K, ...), an episode's shots adjacent
            masks = cls.masks.unsqueeze(0).expand(batch, -1, -1, -1)
            logits = resize_logits(model.head(query_feats, support_feats, masks, model.attn_impl),
                                   (queries[0].height, queries[0].width))
            margins.append(logits[:, 1].float() - logits[:, 0].float())
    return torch.stack(margins, dim=1)


def label_map(margins: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) margins -> (B, H, W) labels 0..N (docs/predict.md, "Several classes"): the class whose
    foreground beats its background by the most (the first given on a tie), when it does beat it (margin > 0,
    the 1-way argmax); else 0, background. With N = 1, exactly `DCAMA.predict`'s mask."""
    best = margins.argmax(dim=1)  # the first of equal maxima
    wins = margins.gather(1, best.unsqueeze(1)).squeeze(1) > 0
    return torch.where(wins, best + 1, torch.zeros_like(best))


def _segment_iter(model: DCAMA, classes: Sequence[EncodedSupports], batches: Sequence[list[int]],
                  load: Callable[[int], Image.Image], img_size: int, amp: str,
                  progress: bool) -> Iterator[tuple[int, Image.Image, np.ndarray]]:
    """(index, query image, (H, W) uint8 label map) for every query, batch by batch (size_batches); `load(i)`
    reads query i."""
    total = sum(map(len, batches))
    with tqdm(total=total, desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            images = [load(i) for i in batch]
            labels = label_map(class_margins(model, classes, images, img_size, amp)).cpu().numpy().astype(np.uint8)
            for i, img, label in zip(batch, images, labels):
                yield i, img, label
            bar.update(len(batch))


def encode_classes(model: DCAMA, classes: Sequence[tuple[str, Sequence[tuple[Image.Image, np.ndarray]]]],
                   img_size: int, amp: str = "off") -> list[EncodedSupports]:
    """Every class's supports (read_support pairs) preprocessed and through the backbone, once."""
    return [EncodedSupports.encode(model, SupportSet.build(pairs, img_size), amp) for _, pairs in classes]


def _read_classes(supports: Sequence[Sequence[ImageLike]]) -> list[tuple[str, list[tuple[Image.Image, np.ndarray]]]]:
    """support_classes with every pair read and checked (read_support), numbered in the order given."""
    numbered, out = iter(range(len(supports))), []
    for name, pairs in support_classes(supports):
        out.append((name, [read_support(img, m, next(numbered)) for img, m in pairs]))
    return out


def segment_classes(model: DCAMA, supports: Sequence[tuple[str, ImageLike, ImageLike]], queries: Sequence[ImageLike],
                    *, img_size: int, batch_size: int = 8, amp: str = "off",
                    progress: bool = False) -> list[np.ndarray]:
    """Segment every query into the supports' classes: a (H, W) uint8 label map per query, at its own size,
    0 background and 1..N the classes in the order first given (`label_map` says how a pixel is decided).

    supports: (class name, image, mask) triples, K per class allowed; the rest as `segment`.
    """
    return _segment_all(model, _read_classes(supports), queries, img_size, batch_size, amp, progress)


def segment(model: DCAMA, supports: Sequence[tuple[ImageLike, ImageLike]], queries: Sequence[ImageLike], *,
            img_size: int, batch_size: int = 8, amp: str = "off", progress: bool = False) -> list[np.ndarray]:
    """Segment every query like the supports: a (H, W) bool mask per query, at the query's own size.

    supports: K (image, mask) pairs; images and queries are file paths, PIL images or (H, W, 3) uint8 arrays;
    masks are paths or PIL images (grey >= 128 is foreground), bool arrays, or grey arrays. `img_size` is the
    side the model runs at (`load_model` returns the checkpoint's). The model should be in eval mode.
    """
    labels = _segment_all(model, _read_classes(supports), queries, img_size, batch_size, amp, progress)
    return [label == 1 for label in labels]


def _segment_all(model: DCAMA, classes: Sequence[tuple[str, Sequence[tuple[Image.Image, np.ndarray]]]],
                 queries: Sequence[ImageLike], img_size: int, batch_size: int, amp: str,
                 progress: bool) -> list[np.ndarray]:
    encoded = encode_classes(model, classes, img_size, amp)
    images = [_image(q) for q in queries]
    batches = size_batches([(im.height, im.width) for im in images], batch_size)
    out: list[np.ndarray] = [np.zeros(0, dtype=np.uint8)] * len(images)
    for i, _, label in _segment_iter(model, encoded, batches, images.__getitem__, img_size, amp, progress):
        out[i] = label
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


def predict_files(checkpoint: str | os.PathLike, supports: Sequence[Sequence[str]], queries: Sequence[str],
                  out_dir: str | os.PathLike, *, img_size: int | None = None, batch_size: int = 8,
                  backbone: str | None = None, attn_impl: str = "auto", amp: str = "off",
                  device: str | None = None, threads: int = CPU_THREADS, overwrite: bool = False,
                  overlays: bool = True, progress: bool = True) -> dict[str, Any]:
    """What eval/predict.py does. With (image, mask) supports: masks of the query files (`query_files`
    expands folders and globs) into out_dir/masks/<name>.png (0/255, the query's size); with (class name,
    image, mask) supports: label maps into out_dir/labels/<name>.png (0 background, 1..N the classes in the
    order first given) with a legend labels/<name>.json (names, pixel shares). Overlay pictures go into
    out_dir/overlays/<name>.png, and out_dir/predictions.json (the settings and one entry per query) is
    written last. Every input is checked before the model is loaded; every file is written atomically; the
    supports go through the backbone once. `threads`: torch CPU threads on a CPU device
    (`runtime.cpu_threads`; 0: torch's default). Returns the predictions.json content."""
    out, dev = Path(out_dir), check_device(device)
    check_out_dir(out, overwrite)
    paths = query_files(queries)
    classes = _read_classes(supports)
    names = [name for name, _ in classes] if len(supports[0]) == 3 else None  # None: the 1-way outputs
    sizes, outputs = check_queries(paths), output_names(paths)
    batches = size_batches(sizes, batch_size)
    model, trained_size = load_model(checkpoint, backbone=backbone, attn_impl=attn_impl, device=dev)
    side = img_size or trained_size
    check_img_size(model.config["backbone"], side, built_for=model.backbone.img_size)
    styles = class_styles(names) if names else [SUPPORT]
    panels = _support_panels(classes, styles, support_classes(supports)) if overlays else []
    records: list[dict[str, Any]] = [{} for _ in paths]
    start = time.perf_counter()
    with cpu_threads(threads, dev):
        encoded = encode_classes(model, classes, side, amp)
        load = lambda i: load_rgb(paths[i], exif_orientation=FOLLOW_EXIF_ORIENTATION)  # noqa: E731
        for i, image, label in _segment_iter(model, encoded, batches, load, side, amp, progress):
            title = outputs[i] + os.path.splitext(paths[i])[1]
            records[i] = (_write_outputs(out, outputs[i], paths[i], title, image, label == 1, panels) if names is None
                          else _write_labels(out, outputs[i], paths[i], title, image, label, styles, panels))
    settings = {"checkpoint": os.fspath(checkpoint), "supports": [list(map(os.fspath, s)) for s in supports],
                **({"classes": names} if names else {}), "img_size": side, "batch_size": batch_size,
                "attn_impl": attn_impl, "amp": amp, "device": str(next(model.parameters()).device),
                "threads": threads, "model_config": dict(model.config),
                "seconds": round(time.perf_counter() - start, 3)}
    result = {"settings": settings, "queries": records}
    with writing(out / RESULTS_FILE):
        write_json(out / RESULTS_FILE, result)
    return result


def _support_panels(classes: Sequence[tuple[str, Sequence[tuple[Image.Image, np.ndarray]]]],
                    styles: Sequence[MaskStyle], files: Sequence[tuple[str, Sequence[Sequence[str]]]]) -> list[Panel]:
    """Each support (`classes`, read) with its mask in its class's colour, class by class, captioned 'support k'
    (one class) or '<class> k' and its image file's name (`files`: support_classes of the paths)."""
    panels = []
    for (name, pairs), style, (_, paths) in zip(classes, styles, files):
        lead = "support" if len(classes) == 1 and name == FOREGROUND else name
        panels += [draw_panel(img, [(m, style)], f"{lead} {k + 1}: {os.path.basename(os.fspath(path[0]))}")
                   for k, ((img, m), path) in enumerate(zip(pairs, paths))]
    return panels


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


def _write_labels(out: Path, name: str, path: str, title: str, image: Image.Image, labels: np.ndarray,
                  styles: Sequence[MaskStyle], panels: Sequence[Panel]) -> dict[str, Any]:
    """One query's label map PNG (8-bit grey, the label values), its legend JSON and overlay picture; its
    predictions.json entry."""
    names = [BACKGROUND, *(style.label for style in styles)]
    legend = {"image": path, "height": int(labels.shape[0]), "width": int(labels.shape[1]),
              "labels": {str(k): n for k, n in enumerate(names)},
              "shares": {n: round(float((labels == k).mean()), 6) for k, n in enumerate(names)}}
    record = {**legend, "label_map": f"labels/{name}.png", "legend": f"labels/{name}.json"}
    with writing(out / record["label_map"]):
        save_picture(out / record["label_map"], Image.fromarray(labels.astype(np.uint8)))
    with writing(out / record["legend"]):
        write_json(out / record["legend"], legend)
    if panels:
        record["overlay"] = f"overlays/{name}.png"
        with writing(out / record["overlay"]):
            save_picture(out / record["overlay"], labels_picture(image, labels, styles, panels, title))
    return record
