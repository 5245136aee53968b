"""COCO-20i rendered straight from the official COCO 2014 instances JSON (no third-party mask PNGs needed)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from dcama.config import BENCHMARK_RULES, EVAL_EPISODES, PUBLISHED_IMG_SIZE
from dcama.data.common import (
    DatasetFileError,
    FewShotDataset,
    check_dir,
    draw_others,
    load_label,
    load_rgb,
    preprocess_image,
    validate_args,
)
from dcama.files import atomic_open

N_FOLDS = BENCHMARK_RULES["coco"].n_folds
N_CLASSES = 80
# COCO's 80 category names in ascending category-id order: class index i is CLASS_NAMES[i].
CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
INDEX_FORMAT = "dcama-coco-index"
INDEX_VERSION = 1

LAYOUT = """Expected COCO-20i layout (the official COCO 2014 files, https://cocodataset.org/#download):
  <root>/COCO2014/train2014/COCO_train2014_*.jpg          from train2014.zip
  <root>/COCO2014/val2014/COCO_val2014_*.jpg              from val2014.zip
  <root>/COCO2014/annotations/instances_train2014.json    from annotations_trainval2014.zip
  <root>/COCO2014/annotations/instances_val2014.json      from annotations_trainval2014.zip
  optional, only for mask_source="png": the label PNGs of the HSNet/DCAMA release
  <root>/COCO2014/annotations/{train2014,val2014}/COCO_*.png (value = class index + 1, 0 = background)"""


def fold_classes(fold: int) -> list[int]:
    """Test classes of a COCO-20i fold: interleaved {f, f+4, ..., f+76}."""
    return list(range(fold, N_CLASSES, N_FOLDS))


def _source_stamp(ann_file: str) -> dict[str, Any]:
    st = os.stat(ann_file)
    return {"file": os.path.basename(ann_file), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_index(ann_file: str) -> dict[str, Any]:
    """Render, for every (image, class) pair, the union of the class's instance masks as a compressed RLE.

    Every annotation counts: polygons, uncompressed and compressed RLE, and crowd regions (iscrowd=1), which
    are part of the class's pixels. Pairs whose union has zero area (degenerate annotations) are dropped.
    Returns {"categories": ascending COCO category ids, "images": {image id: [file_name, height, width]},
    "classes": [[[image id, RLE counts], ...] for class index 0..79]}.
    """
    from pycocotools.coco import COCO  # imports matplotlib: only when an index is (re)built

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO(ann_file)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetFileError(f"cannot read COCO annotation file {ann_file}: {err!r}") from err
    categories = sorted(coco.getCatIds())
    class_of = {cat: i for i, cat in enumerate(categories)}
    classes: list[list[list[Any]]] = [[] for _ in categories]
    images = {}
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        images[str(img_id)] = [info["file_name"], info["height"], info["width"]]
        by_cat: dict[int, list[dict]] = {}
        for ann in coco.imgToAnns.get(img_id, []):
            by_cat.setdefault(ann["category_id"], []).append(ann)
        for cat in sorted(by_cat):
            try:
                rle = mask_utils.merge([coco.annToRLE(ann) for ann in by_cat[cat]])
            except Exception as err:  # malformed segmentation: name the annotation, not a bare pycocotools error
                ids = [ann.get("id") for ann in by_cat[cat]]
                raise DatasetFileError(f"{ann_file}: cannot render annotations {ids} of image {img_id}: "
                                       f"{err!r}") from err
            if mask_utils.area(rle) > 0:
                classes[class_of[cat]].append([img_id, rle["counts"].decode("ascii")])
    return {"categories": categories, "images": images, "classes": classes}


def load_index(ann_file: str, cache_file: str) -> dict[str, Any]:
    """The class-to-images index of an annotation file, from its JSON cache when the cache matches the file's
    size and mtime, else built with pycocotools and written to the cache (skipped with a warning when the
    folder is not writable)."""
    stamp = _source_stamp(ann_file)
    try:
        with open(cache_file) as f:
            cached = json.load(f)
        if (cached.get("format"), cached.get("version"), cached.get("source")) == (INDEX_FORMAT, INDEX_VERSION,
                                                                                     stamp):
            return cached
    except (OSError, ValueError):  # absent or unreadable cache: rebuild
        pass
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "source": stamp, **build_index(ann_file)}
    try:
        with atomic_open(cache_file, "w") as f:  # concurrent readers see the old or the new file
            json.dump(index, f)
    except OSError as err:
        warnings.warn(f"cannot write the COCO index cache {cache_file} ({err}); it will be rebuilt next time",
                      stacklevel=3)
    return index


class COCODataset(FewShotDataset):
    """COCO-20i episodes (docs/data.md, "COCO-20i from the official annotations").

    trn (train2014, the 60 classes outside the fold): one item per (image, class) pair, supports random.
    val/test (val2014, the fold's 20 classes): `episodes` items; class uniform, query uniform among the
    class's images, K distinct other supports. Masks: union of the class's instances rendered from the
    instances JSON (mask_source="json") or the release's label PNGs (mask_source="png").
    """

    rules = BENCHMARK_RULES["coco"]

    def __init__(self, root: str, fold: int = 0, split: str = "test", shot: int = 1, img_size: int = PUBLISHED_IMG_SIZE,
                 use_original_imgsize: bool = False, episodes: int = EVAL_EPISODES, seed: int = 0,
                 mask_source: str = "json") -> None:
        validate_args(split, fold, self.rules.n_folds, shot, img_size, seed, episodes)
        if mask_source not in ("json", "png"):
            raise ValueError(f"mask_source must be 'json' or 'png', got {mask_source!r}")
        super().__init__(split, shot, img_size, use_original_imgsize, seed)
        self.subset = "train2014" if split == "trn" else "val2014"
        base = os.path.join(str(root), "COCO2014")
        check_dir(str(root), "COCO-20i root", LAYOUT)
        check_dir(base, "COCO2014 folder", LAYOUT)
        self.img_dir = os.path.join(base, self.subset)
        check_dir(self.img_dir, f"COCO {self.subset} images", LAYOUT)
        ann_dir = os.path.join(base, "annotations")
        ann_file = os.path.join(ann_dir, f"instances_{self.subset}.json")
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file}\n{LAYOUT}")
        self.mask_source = mask_source
        self.png_dir = os.path.join(ann_dir, self.subset)
        if mask_source == "png":
            check_dir(self.png_dir, f"COCO {self.subset} label PNGs (mask_source='png')", LAYOUT)

        index = load_index(ann_file, os.path.join(ann_dir, f"dcama_index_{self.subset}.json"))
        if len(index["categories"]) != N_CLASSES:
            raise DatasetFileError(f"{ann_file} has {len(index['categories'])} categories, COCO-20i needs "
                                   f"{N_CLASSES}")
        self.images: dict[str, list] = index["images"]
        test_classes = fold_classes(fold)
        self.class_ids = test_classes if split != "trn" else [c for c in range(N_CLASSES) if c not in test_classes]
        self.class_images = {c: index["classes"][c] for c in self.class_ids}
        too_few = [c for c in self.class_ids if len(self.class_images[c]) < shot + 1]
        if too_few:
            warnings.warn(f"COCO-20i fold {fold} {split}: classes {too_few} have fewer than shot+1={shot + 1} "
                          "images and are skipped for sampling", stacklevel=2)
        self.sampled_classes = [c for c in self.class_ids if c not in too_few]
        if not self.sampled_classes:
            raise ValueError(f"COCO-20i fold {fold} {split}: no class has shot+1={shot + 1} images")
        if split == "trn":  # every (image, class) query pair once per epoch, as in the original
            self.pair_class = np.repeat(self.sampled_classes,
                                        [len(self.class_images[c]) for c in self.sampled_classes])
            self.pair_pos = np.concatenate([np.arange(len(self.class_images[c])) for c in self.sampled_classes])
            self.length = len(self.pair_class)
        else:
            self.length = episodes

    def __len__(self) -> int:
        return self.length

    def class_name(self, class_id: int) -> str:
        return CLASS_NAMES[class_id]

    def _load(self, class_id: int, pos: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        img_id, counts = self.class_images[class_id][pos]
        file_name, height, width = self.images[str(img_id)]
        img = preprocess_image(load_rgb(os.path.join(self.img_dir, file_name)), self.img_size)
        if self.mask_source == "json":
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
            with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 copy=False deprecation
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = np.ascontiguousarray(mask_utils.decode(rle))
        else:
            label = load_label(os.path.join(self.png_dir, os.path.splitext(file_name)[0] + ".png"))
            mask = (label == class_id + 1).astype(np.uint8)
        return img, torch.from_numpy(mask), f"{self.subset}/{file_name}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self.check_index(index)
        rng = self.rng(index)
        if self.split == "trn":
            class_id, q = int(self.pair_class[index]), int(self.pair_pos[index])
        else:
            class_id = self.sampled_classes[int(rng.integers(len(self.sampled_classes)))]
            q = int(rng.integers(len(self.class_images[class_id])))
        picks = draw_others(rng, len(self.class_images[class_id]), q, self.shot)
        return self.assemble(class_id, self._load(class_id, q), [self._load(class_id, j) for j in picks])
