"""Few-shot segmentation benchmarks: COCO-20i, PASCAL-5i, FSS-1000, a folder of one's own classes ("folder")
and the embedded "shapes".

`build_dataset` is the entry point; items are dicts (see FewShotDataset.assemble) and batch with torch's
default collate, or with `collate_episodes` when use_original_imgsize is set.
"""

from __future__ import annotations

from typing import Any

from dcama.config import EVAL_EPISODES, PUBLISHED_IMG_SIZE
from dcama.data.coco import COCODataset
from dcama.data.common import DatasetFileError, FewShotDataset, collate_episodes, episode_rng
from dcama.data.folder import FolderDataset, FolderLayoutError
from dcama.data.fss import FSSDataset
from dcama.data.pascal import PascalDataset
from dcama.data.shapes import ShapesDataset

__all__ = [
    "build_dataset",
    "collate_episodes",
    "episode_rng",
    "DatasetFileError",
    "FolderLayoutError",
    "FewShotDataset",
    "COCODataset",
    "PascalDataset",
    "FSSDataset",
    "FolderDataset",
    "ShapesDataset",
    "BENCHMARKS",
]

BENCHMARKS = {"coco": COCODataset, "pascal": PascalDataset, "fss": FSSDataset, "folder": FolderDataset,
              "shapes": ShapesDataset}


def build_dataset(
    benchmark: str,
    root: str | None,
    fold: int = 0,
    split: str = "test",
    shot: int = 1,
    img_size: int = PUBLISHED_IMG_SIZE,
    use_original_imgsize: bool = False,
    episodes: int = EVAL_EPISODES,
    seed: int = 0,
    **options: Any,
) -> FewShotDataset:
    """Build the episode dataset of a benchmark ("coco", "pascal", "fss", "folder", "shapes").

    root is the folder that holds COCO2014/, VOC2012/ or FSS-1000/, for "folder" the folder of class folders
    (unused, may be None, for "shapes"). options go to the benchmark's class (COCO: mask_source="json"|"png";
    folder: split_seed).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    if root is None and BENCHMARKS[benchmark].rules.needs_root:
        raise ValueError(f"benchmark {benchmark!r} needs a data root (only 'shapes' runs without one)")
    return BENCHMARKS[benchmark](root, fold=fold, split=split, shot=shot, img_size=img_size,
                                 use_original_imgsize=use_original_imgsize, episodes=episodes, seed=seed,
                                 **options)
