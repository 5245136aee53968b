"""PASCAL-5i: VOC2012 images with the SBD-augmented class masks (SegmentationClassAug), HSNet/DCAMA layout."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from typing import Any

import torch

from dcama.config import BENCHMARK_RULES, EVAL_EPISODES, IGNORE_INDEX, PUBLISHED_IMG_SIZE
from dcama.data.common import (
    FewShotDataset,
    check_dir,
    draw_others,
    load_label,
    load_rgb,
    preprocess_image,
    split_file,
    validate_args,
)

N_FOLDS = BENCHMARK_RULES["pascal"].n_folds
N_CLASSES = 20
# The VOC2012 class names: 0-based class c is CLASS_NAMES[c] (value c + 1 in the masks).
CLASS_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

LAYOUT = """Expected PASCAL-5i layout (HSNet/DCAMA convention):
  <root>/VOC2012/JPEGImages/<image id>.jpg           from the PASCAL VOC2012 trainval tar
                                                     (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)
  <root>/VOC2012/SegmentationClassAug/<image id>.png  VOC2012 + SBD augmented class masks
                                                     (SegmentationClassAug.zip, as distributed for
                                                     DeepLab/HSNet; values 1..20 = classes, 0 background,
                                                     255 boundary)"""


def fold_classes(fold: int) -> list[int]:
    """0-based test classes of a PASCAL-5i fold: contiguous {5f, ..., 5f+4}."""
    return list(range(5 * fold, 5 * fold + 5))


def read_list(split: str, fold: int) -> list[tuple[str, int]]:
    """Entries "imageid__classid" (class id 1-based) of a shipped split list, as (image id, 0-based class)."""
    entries = []
    with open(split_file("pascal", split, f"fold{fold}.txt")) as f:
        for line in f:
            line = line.strip()
            if line:
                name, cls = line.split("__")
                entries.append((name, int(cls) - 1))
    return entries


class PascalDataset(FewShotDataset):
    """PASCAL-5i episodes.

    trn: the queries are the (image, class) entries of the trn lists of the other three folds, one item each.
    val/test: the fold's val list; `episodes` items cycle through it as queries (docs/data.md).
    Supports are drawn from the entries of the same class in the same list, distinct and != the query image.
    """

    rules = BENCHMARK_RULES["pascal"]

    def __init__(self, root: str, fold: int = 0, split: str = "test", shot: int = 1, img_size: int = PUBLISHED_IMG_SIZE,
                 use_original_imgsize: bool = False, episodes: int = EVAL_EPISODES, seed: int = 0) -> None:
        validate_args(split, fold, self.rules.n_folds, shot, img_size, seed, episodes)
        super().__init__(split, shot, img_size, use_original_imgsize, seed)
        voc = os.path.join(str(root), "VOC2012")
        check_dir(str(root), "PASCAL-5i root", LAYOUT)
        self.img_dir = os.path.join(voc, "JPEGImages")
        self.ann_dir = os.path.join(voc, "SegmentationClassAug")
        check_dir(self.img_dir, "PASCAL VOC2012 images", LAYOUT)
        check_dir(self.ann_dir, "PASCAL SegmentationClassAug masks", LAYOUT)

        if split == "trn":
            self.class_ids = [c for c in range(N_CLASSES) if c not in fold_classes(fold)]
            entries = [e for f in range(N_FOLDS) if f != fold for e in read_list("trn", f)]
        else:  # the original evaluates on the val lists; "val" and "test" are the same episodes
            self.class_ids = fold_classes(fold)
            entries = read_list("val", fold)
        by_class: dict[int, dict[str, None]] = defaultdict(dict)  # ordered sets: a list may repeat an entry
        for name, cls in entries:
            by_class[cls][name] = None
        too_few = [c for c in self.class_ids if len(by_class[c]) < shot + 1]
        if too_few:
            warnings.warn(f"PASCAL-5i fold {fold} {split}: classes {too_few} have fewer than shot+1={shot + 1} "
                          "images and are skipped", stacklevel=2)
        self.entries = [(n, c) for n, c in entries if c not in too_few]
        if not self.entries:
            raise ValueError(f"PASCAL-5i fold {fold} {split}: no class has shot+1={shot + 1} images")
        self.by_class = {c: list(names) for c, names in by_class.items()}
        self.position = {(c, n): j for c, names in self.by_class.items() for j, n in enumerate(names)}
        self.length = len(self.entries) if split == "trn" else episodes

    def __len__(self) -> int:
        return self.length

    def class_name(self, class_id: int) -> str:
        return CLASS_NAMES[class_id]

    def _load(self, name: str, class_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = preprocess_image(load_rgb(os.path.join(self.img_dir, name + ".jpg")), self.img_size)
        label = torch.from_numpy(load_label(os.path.join(self.ann_dir, name + ".png")))
        ignore = (label == IGNORE_INDEX).to(torch.uint8)
        mask = (label == class_id + 1).to(torch.uint8)
        return img, mask, ignore

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self.check_index(index)
        rng = self.rng(index)
        q_name, class_id = self.entries[index % len(self.entries)]
        pool = self.by_class[class_id]
        s_names = [pool[j] for j in draw_others(rng, len(pool), self.position[class_id, q_name], self.shot)]
        q_img, q_mask, q_ignore = self._load(q_name, class_id)
        supports = [self._load(n, class_id) for n in s_names]
        # The query mask carries 255 on the boundary pixels so that the metric (and a loss with
        # ignore_index=255) skips them; query_ignore_idx / support_ignore_idxs flag the same pixels.
        item = self.assemble(
            class_id,
            (q_img, torch.where(q_ignore.bool(), IGNORE_INDEX, q_mask), q_name),
            [(img, m, n) for (img, m, _), n in zip(supports, s_names)],
            query_ignore=q_ignore,
            support_ignores=[ig for _, _, ig in supports],
        )
        return item
