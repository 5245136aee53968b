"""The folder benchmark: a person's own classes of images with masks, FSS-1000's layout generalised.

One folder per class, any number of images per class, any file names. The rule that pairs images with masks
(docs/data.md, "Your own classes: the folder benchmark"): the mask of `<name>.jpg` (or .jpeg, .bmp, .tif, .tiff,
.webp) is `<name>.png`; a `.png` that no such image claims is itself an image, and its mask is
`<name>.mask.png`. FSS-1000's own folder (`<n>.jpg` with `<n>.png`) is therefore a folder benchmark as it is.

The class split comes from an optional `splits.json` ({"trn": [...], "val": [...], "test": [...]}, class folder
names), otherwise from a seeded hash of the class names. Episodes are FSS-1000's (ImageFilesDataset).
Everything wrong with the folder is found while indexing and reported in one FolderLayoutError.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dcama.config import BENCHMARK_RULES, EVAL_EPISODES, PUBLISHED_IMG_SIZE
from dcama.data.common import (
    SPLITS,
    DatasetFileError,
    ImageFilesDataset,
    check_dir,
    image_size,
    unreadable_reason,
    validate_args,
)
from dcama.files import atomic_open

# Image formats besides PNG; a file of one of these formats has the mask <name>.png.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PNG_MASK_SUFFIX = ".mask.png"  # the mask of a PNG image <name>.png is <name>.mask.png
SPLITS_FILE = "splits.json"
# A seeded split without splits.json: 20% of the classes test, 20% val (at least one each), the rest trn.
SEEDED_FRACTION = {"test": 0.2, "val": 0.2}
MAX_LISTED = 100  # problems named in one report (the count of the others follows)
FOLLOW_EXIF_ORIENTATION = True  # images are turned as their EXIF orientation says, as photo viewers show them
_IGNORED_FOLDERS = ("__MACOSX",)  # left by zip archives made on macOS

LAYOUT = f"""Expected folder benchmark layout (docs/data.md, "Your own classes: the folder benchmark"):
  <datapath>/<class>/<name>.jpg  with its mask <datapath>/<class>/<name>.png   (also .jpeg .bmp .tif .tiff .webp)
  <datapath>/<class>/<name>.png  (a PNG image) with its mask <datapath>/<class>/<name>.mask.png
  masks: grey value >= 128 is foreground, the size of their image; every class needs K+1 images for K shots
  <datapath>/{SPLITS_FILE} (optional): {{"trn": [class, ...], "val": [...], "test": [...]}}; without it
  a seeded split puts {SEEDED_FRACTION['test']:.0%} of the classes in test, {SEEDED_FRACTION['val']:.0%} in val"""


class FolderLayoutError(DatasetFileError):
    """What is wrong with a folder benchmark (unpaired, unreadable or mis-sized files, small classes, a bad
    splits.json), every problem named in one message."""


def natural_key(name: str) -> list[Any]:
    """Sort key that orders digit runs by value: img2 before img10, FSS-1000's 1, 2, ..., 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _kind(name: str) -> tuple[str | None, str]:
    """("image" | "png" | "png-mask" | None, the name without its suffix) of a file name."""
    if name.lower().endswith(PNG_MASK_SUFFIX):
        return "png-mask", name[: -len(PNG_MASK_SUFFIX)]
    stem, ext = os.path.splitext(name)
    ext = ext.lower()
    return ("png" if ext == ".png" else "image" if ext in IMAGE_SUFFIXES else None), stem


def pair_files(names: list[str], folder: str = "") -> tuple[list[tuple[str, str]], list[str]]:
    """The (image, mask) file names among the file names of one class folder, by the layout's rule, in
    natural order of the image names, and the problems found (unpaired or ambiguous files), each "<file>:
    <what is wrong>" with the files named as <folder>/<name>. Hidden files and files of other formats are
    ignored."""
    at = (lambda name: f"{folder}/{name}") if folder else (lambda name: name)  # noqa: E731
    found: dict[str, dict[str, list[str]]] = {k: defaultdict(list) for k in ("image", "png", "png-mask")}
    for name in names:
        kind, stem = _kind(name)
        if kind is not None and not name.startswith("."):
            found[kind][stem].append(name)
    problems = [f"{', '.join(at(f) for f in sorted(files))}: names that differ only in case or extension"
                for kind in found.values() for files in kind.values() if len(files) > 1]
    single = {kind: {stem: files[0] for stem, files in by_stem.items() if len(files) == 1}
              for kind, by_stem in found.items()}
    unclear = {kind: {stem for stem, files in by_stem.items() if len(files) > 1} for kind, by_stem in found.items()}
    pairs = []
    for stem, image in single["image"].items():
        if stem in single["png"]:
            pairs.append((image, single["png"][stem]))
        elif stem not in unclear["png"]:
            problems.append(f"{at(image)}: image without mask (expected {at(stem + '.png')})")
    # The .png files that no image of another format claims as its mask are images.
    for stem, image in single["png"].items():
        if stem in found["image"]:
            continue
        if stem in single["png-mask"]:
            pairs.append((image, single["png-mask"].pop(stem)))
        elif stem not in unclear["png-mask"]:
            problems.append(f"{at(image)}: PNG image without mask (expected {at(stem + PNG_MASK_SUFFIX)}; if it is "
                            f"a mask, its image {at(stem + '.jpg')} or another format is missing)")
    for stem, mask in single["png-mask"].items():
        if stem not in unclear["png"]:
            image = found["image"][stem][0] if stem in found["image"] else None
            why = (f"expected the PNG image {at(stem + '.png')}" if image is None else
                   f"{at(stem + '.png')} is the mask of {at(image)}" if stem in found["png"] else
                   f"the mask of {at(image)} is named {at(stem + '.png')}")
            problems.append(f"{at(mask)}: mask without image ({why})")
    return sorted(pairs, key=lambda pair: natural_key(pair[0])), problems


def image_names(names: list[str]) -> list[str]:
    """The images among the file names of a folder by the layout's rule, in natural order: files of
    IMAGE_SUFFIXES, and the .png files that are neither <name>.mask.png nor the mask of an image of another
    format (hidden files and other formats left out)."""
    kinds = [(name, *_kind(name)) for name in names if not name.startswith(".")]
    claimed = {stem for _, kind, stem in kinds if kind == "image"}
    return sorted((name for name, kind, stem in kinds if kind == "image" or (kind == "png" and stem not in claimed)),
                  key=natural_key)


def list_classes(root: str) -> list[str]:
    """The class folder names under root, sorted (hidden folders and macOS archive residue left out)."""
    return sorted(e.name for e in os.scandir(root)
                  if e.is_dir() and not e.name.startswith(".") and e.name not in _IGNORED_FOLDERS)


def seeded_split(classes: list[str], split_seed: int) -> dict[str, list[str]]:
    """The split used without splits.json: classes ordered by a hash of (split_seed, name), the first
    SEEDED_FRACTION["test"] of them test, the next SEEDED_FRACTION["val"] val, the rest trn. A class keeps its
    place in the order when others are added, so adding classes moves few of them."""
    order = sorted(classes, key=lambda c: hashlib.sha256(f"{split_seed}/{c}".encode()).hexdigest())
    n_test, n_val = (max(1, round(len(order) * SEEDED_FRACTION[s])) for s in ("test", "val"))
    return {"trn": sorted(order[n_test + n_val:]), "val": sorted(order[n_test:n_test + n_val]),
            "test": sorted(order[:n_test])}


def read_splits(root: str, classes: list[str]) -> dict[str, list[str]] | None:
    """The class lists of root/splits.json (missing splits empty), or None when there is no such file."""
    path = os.path.join(root, SPLITS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            listed = json.load(f)
    except (OSError, ValueError) as err:
        raise FolderLayoutError(f"cannot read {path}: {err}") from err
    if not isinstance(listed, dict) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in listed.values()):
        raise FolderLayoutError(f"{path} must be a JSON object of class-name lists, e.g. "
                                '{"trn": ["cat", "dog"], "val": ["cow"], "test": ["horse"]}')
    problems = []
    if set(listed) - set(SPLITS):
        problems.append(f"unknown keys {sorted(set(listed) - set(SPLITS))} (the splits are {', '.join(SPLITS)})")
    names = [c for s in SPLITS for c in listed.get(s, [])]
    if len(set(names)) < len(names):
        problems.append(f"classes listed more than once: {sorted({c for c in names if names.count(c) > 1})}")
    if set(names) - set(classes):
        problems.append(f"classes without a folder: {sorted(set(names) - set(classes))}")
    if problems:
        raise FolderLayoutError(f"{path}: " + "; ".join(problems))
    return {s: list(listed.get(s, [])) for s in SPLITS}


@dataclass
class FolderIndex:
    """What indexing a folder benchmark found: the class split and every class's image and mask files."""

    root: str
    classes: list[str]  # every class folder, sorted: a class's id is its position here
    splits: dict[str, list[str]]
    split_from: str  # "splits.json" or "seeded split (split_seed N)"
    files: dict[str, list[tuple[str, str]]]  # class name -> (image path, mask path) per image

    def class_id(self, name: str) -> int:
        return self.classes.index(name)


def index_folder(root: str, shot: int, split_seed: int = 0) -> FolderIndex:
    """Split and index every class of the split lists; raises one FolderLayoutError naming every problem."""
    classes = list_classes(root)
    if not classes:
        raise FolderLayoutError(f"folder benchmark {root}: no class folders in it\n{LAYOUT}")
    splits = read_splits(root, classes)
    split_from = SPLITS_FILE
    if splits is None:
        if len(classes) < 3:
            raise FolderLayoutError(f"folder benchmark {root}: a seeded split needs at least 3 class folders, "
                                    f"found {len(classes)}; write {os.path.join(root, SPLITS_FILE)} to choose "
                                    'the split, e.g. {"test": [...]} to evaluate on all of them')
        splits, split_from = seeded_split(classes, split_seed), f"seeded split (split_seed {split_seed})"
    files, problems = {}, []
    for name in sorted((c for s in SPLITS for c in splits[s]), key=natural_key):  # the report's order
        files[name], found = _index_class(root, name, shot)
        problems += found
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise FolderLayoutError(f"folder benchmark {root}: {len(problems)} problem(s) found while indexing; fix "
                                f"them and run again:\n  {shown}{more}\n{LAYOUT}")
    return FolderIndex(root, classes, splits, split_from, files)


def _index_class(root: str, name: str, shot: int) -> tuple[list[tuple[str, str]], list[str]]:
    """One class folder's (image path, mask path) pairs and its problems, the files named as <class>/<file>:
    those of its files in natural order of the file names, then that of the class as a whole (too few images)."""
    folder = os.path.join(root, name)
    entries = list(os.scandir(folder))
    pairs, problems = pair_files([e.name for e in entries if e.is_file()], name)
    paths = []
    for image, mask in pairs:
        sizes = []
        for file, what, turned in ((image, "image", FOLLOW_EXIF_ORIENTATION), (mask, "mask", False)):
            try:
                sizes.append(image_size(os.path.join(folder, file), exif_orientation=turned, what=what))
            except OSError as err:  # DatasetFileError: corrupt or unreadable; named from the root here
                problems.append(f"{name}/{file}: cannot read the {what} ({unreadable_reason(err)})")
        if len(sizes) < 2:
            continue
        if sizes[0] != sizes[1]:
            problems.append(f"{name}/{mask}: the mask is {sizes[1][0]}x{sizes[1][1]} (HxW), "
                            f"its image {name}/{image} {sizes[0][0]}x{sizes[0][1]}")
            continue
        paths.append((os.path.join(folder, image), os.path.join(folder, mask)))
    problems.sort(key=lambda line: natural_key(line.partition(": ")[0]))  # by the files the line names
    if len(paths) < shot + 1:
        folders = [e.name for e in entries if e.is_dir()]
        hint = f" (it holds folders {folders[:3]}: is --datapath one level too high?)" if folders and not pairs else ""
        problems.append(f"{name}/: {len(paths)} image(s) with masks, {shot}-shot episodes need {shot + 1}{hint}")
    return paths, problems


class FolderDataset(ImageFilesDataset):
    """Episodes of a folder benchmark, FSS-1000's protocol (len = the split's images; `episodes` is ignored).

    Class ids are positions in the sorted list of all class folders; `class_names` maps them back. Images
    follow their EXIF orientation (as photo viewers show them); masks must have that size.
    """

    rules = BENCHMARK_RULES["folder"]
    exif_orientation = FOLLOW_EXIF_ORIENTATION

    def __init__(self, root: str, fold: int = 0, split: str = "test", shot: int = 1,
                 img_size: int = PUBLISHED_IMG_SIZE, use_original_imgsize: bool = False,
                 episodes: int = EVAL_EPISODES, seed: int = 0, split_seed: int = 0) -> None:
        validate_args(split, fold, self.rules.n_folds, shot, img_size, seed, episodes)
        super().__init__(split, shot, img_size, use_original_imgsize, seed)
        root = str(root)
        check_dir(root, "folder benchmark", LAYOUT)
        self.index = index_folder(root, shot, split_seed)
        names = self.index.splits[split]
        if not names:
            raise FolderLayoutError(f"folder benchmark {root}: {self.index.split_from} gives no {split!r} classes")
        self.class_names = {self.index.class_id(n): n for n in names}
        self.class_ids = list(self.class_names)
        self.set_files(root, {cid: self.index.files[n] for cid, n in self.class_names.items()})

    def class_name(self, class_id: int) -> str:
        return self.index.classes[class_id]

    def describe(self, listed_in: str | None = "the run's config.json") -> dict[str, Any]:
        index = self.index
        return {"benchmark": "folder", "root": index.root, "split_from": index.split_from,
                "splits": index.splits, "class_ids": {n: index.class_id(n) for s in SPLITS for n in index.splits[s]},
                "summary": split_summary(index, listed_in)}


def split_summary(index: FolderIndex, listed_in: str | None, shown: int = 8) -> str:
    """One line per split for people: how the split was made and the first class names of each split, with
    where all of them are: `listed_in` (the file the caller writes them to), else splits.json if it made the
    split."""
    from_file = index.split_from == SPLITS_FILE
    lines = [f"folder benchmark {index.root}: {index.split_from}"
             + ("" if from_file else f" (write {SPLITS_FILE} to choose your own)")]
    listed_in = listed_in or (os.path.join(index.root, SPLITS_FILE) if from_file else None)
    where = f"; all in {listed_in}" if listed_in else ""
    for s in SPLITS:
        names = index.splits[s]
        more = f", ... ({len(names) - shown} more{where})" if len(names) > shown else ""
        lines.append(f"  {s}: {len(names)} classes: {', '.join(names[:shown])}{more}")
    return "\n".join(lines)


def write_image_and_mask(root: str, class_name: str, name: str, rgb: np.ndarray, mask: np.ndarray) -> None:
    """Write one image of a class in the layout, losslessly: <class>/<name>.png (RGB) and its
    <name>.mask.png (0/255 grey); each file written atomically."""
    folder = os.path.join(root, class_name)
    for path, array in ((os.path.join(folder, f"{name}.png"), np.asarray(rgb, dtype=np.uint8)),
                        (os.path.join(folder, f"{name}{PNG_MASK_SUFFIX}"), np.where(mask, 255, 0).astype(np.uint8))):
        with atomic_open(path) as f:
            Image.fromarray(array).save(f, format="PNG")


def write_splits(root: str, splits: Mapping[str, list[str]]) -> None:
    """root/splits.json listing the classes of each split."""
    with atomic_open(os.path.join(root, SPLITS_FILE), "w") as f:
        f.write(json.dumps({s: list(splits.get(s, [])) for s in SPLITS}, indent=2) + "\n")
