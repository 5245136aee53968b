"""FSS-1000: 1000 classes of 10 images each, split 520 / 240 / 240 by the shipped class lists."""

from __future__ import annotations

import os
import re
import warnings

from dcama.config import BENCHMARK_RULES, EVAL_EPISODES, PUBLISHED_IMG_SIZE
from dcama.data.common import ImageFilesDataset, check_dir, split_file, validate_args

LAYOUT = """Expected FSS-1000 layout (HSNet/DCAMA convention):
  <root>/FSS-1000/<class name>/<n>.jpg and <n>.png, n = 1..10 (mask: grey value >= 128 is foreground)
  from the FSS-1000 release (https://github.com/HKUSTCV/FSS-1000, fewshot_data.zip); the class names
  of each split are the shipped lists dcama/data/splits/fss/{trn,val,test}.txt"""

# Class indices: position in the sorted class list of the split plus the split's offset (HSNet convention),
# so the 1000 classes get distinct indices 0..999.
CLASS_OFFSET = {"trn": 0, "val": 520, "test": 760}
IMAGES_PER_CLASS = BENCHMARK_RULES["fss"].max_shot + 1
_NUMBERED_JPG = re.compile(r"^(\d+)\.jpg$")


def read_classes(split: str) -> list[str]:
    with open(split_file("fss", f"{split}.txt")) as f:
        return sorted(line.strip() for line in f if line.strip())


class FSSDataset(ImageFilesDataset):
    """FSS-1000 episodes: every image of the split's classes is a query once (len = number of images, for
    every split; `episodes` is ignored); supports are drawn from the other images of its class."""

    rules = BENCHMARK_RULES["fss"]

    def __init__(self, root: str, fold: int = 0, split: str = "test", shot: int = 1, img_size: int = PUBLISHED_IMG_SIZE,
                 use_original_imgsize: bool = False, episodes: int = EVAL_EPISODES, seed: int = 0) -> None:
        validate_args(split, fold, self.rules.n_folds, shot, img_size, seed, episodes)
        super().__init__(split, shot, img_size, use_original_imgsize, seed)
        check_dir(str(root), "FSS-1000 root", LAYOUT)
        base = os.path.join(str(root), "FSS-1000")
        check_dir(base, "FSS-1000 folder", LAYOUT)
        names = read_classes(split)
        self.class_ids = [CLASS_OFFSET[split] + i for i in range(len(names))]
        self.names = dict(zip(self.class_ids, names))
        files: dict[int, list[tuple[str, str]]] = {}  # class id -> (n.jpg, n.png) by number n
        too_few = []
        for cid, name in zip(self.class_ids, names):
            cdir = os.path.join(base, name)
            check_dir(cdir, f"FSS-1000 class folder {name!r}", LAYOUT)
            numbers = sorted(int(m.group(1)) for f in os.listdir(cdir) if (m := _NUMBERED_JPG.match(f)))
            if len(numbers) < shot + 1:
                too_few.append(name)
                continue
            files[cid] = [(os.path.join(cdir, f"{n}.jpg"), os.path.join(cdir, f"{n}.png")) for n in numbers]
        if too_few:
            warnings.warn(f"FSS-1000 {split}: classes {too_few} have fewer than shot+1={shot + 1} images and "
                          "are skipped", stacklevel=2)
        self.set_files(base, files)
        if not self.queries:
            raise ValueError(f"FSS-1000 {split}: no class has shot+1={shot + 1} images")

    def class_name(self, class_id: int) -> str:
        return self.names[class_id]
