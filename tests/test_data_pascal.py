"""PASCAL-5i on tiny files written by the tests for the shipped split lists."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dcama.data import DatasetFileError, build_dataset
from dcama.data.common import split_file
from helpers import nearest


def read_pascal_list(split, fold):
    with open(split_file("pascal", split, f"fold{fold}.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def pascal_label(classes, h, w):
    """Label map: a block per listed class (1-based values), a 255 boundary row, a pixel of another class."""
    lab = np.zeros((h, w), np.uint8)
    for k, c in enumerate(classes):
        lab[2 + 2 * k: 4 + 2 * k, 2: w - 2] = c
    lab[0, 1:] = 255
    lab[h - 1, 0] = 20 if 20 not in classes else 1
    return lab


@pytest.fixture()
def pascal_root(tmp_path):
    """root/VOC2012/{JPEGImages,SegmentationClassAug} for the images of the fold-0 val list."""
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClassAug").mkdir()
    classes = {}
    for entry in read_pascal_list("val", 0):
        name, cls = entry.split("__")
        classes.setdefault(name, []).append(int(cls))
    labels = {}
    for k, (name, cls) in enumerate(classes.items()):
        h, w = (14, 12) if k % 2 else (12, 15)
        labels[name] = pascal_label(cls, h, w)
        Image.fromarray(np.full((h, w, 3), k % 256, np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(labels[name]).save(voc / "SegmentationClassAug" / f"{name}.png")
    return tmp_path, labels


def test_pascal_masks_ignore_pixels_and_query_cycling(pascal_root):
    root, labels = pascal_root
    entries = read_pascal_list("val", 0)
    ds = build_dataset("pascal", root, fold=0, split="test", shot=2, img_size=8, use_original_imgsize=True,
                       episodes=len(entries) + 3)
    assert ds.class_ids == [0, 1, 2, 3, 4] and len(ds) == len(entries) + 3
    for i in [0, 1, 2, len(entries), len(entries) + 1]:
        item = ds[i]
        name, cls = entries[i % len(entries)].split("__")
        c = int(cls) - 1
        assert (item["query_name"], item["class_id"]) == (name, c)
        lab = labels[name]
        want = np.where(lab == 255, 255, (lab == c + 1).astype(np.int64))
        assert torch.equal(item["query_mask"], torch.from_numpy(want))
        assert torch.equal(item["query_ignore_idx"], torch.from_numpy((lab == 255).astype(np.int64)))
        assert item["org_query_size"] == lab.shape
        assert len(set(item["support_names"])) == 2 and name not in item["support_names"]
        for s_name, m, ig in zip(item["support_names"], item["support_masks"], item["support_ignore_idxs"]):
            assert f"{s_name}__{cls}" in entries  # supports come from the same class's list
            assert torch.equal(m.long(), nearest(labels[s_name] == c + 1, 8))
            assert torch.equal(ig, nearest(labels[s_name] == 255, 8))
    resized = build_dataset("pascal", root, fold=0, split="val", img_size=8, episodes=4)[0]
    lab = labels[entries[0].split("__")[0]]
    c = int(entries[0].split("__")[1])
    assert torch.equal(resized["query_mask"], nearest(np.where(lab == 255, 255, lab == c), 8))
    assert set(resized["query_mask"].unique().tolist()) <= {0, 1, 255}


def test_pascal_train_split_and_errors(pascal_root, tmp_path):
    root, _ = pascal_root
    trn = build_dataset("pascal", root, fold=0, split="trn", shot=1, img_size=8)
    assert trn.class_ids == list(range(5, 20))
    assert len(trn) == sum(len(read_pascal_list("trn", f)) for f in (1, 2, 3))
    with pytest.raises(FileNotFoundError, match=r"image file missing: .*JPEGImages"):
        trn[0]  # the fold-1..3 train images were not written
    with pytest.raises(FileNotFoundError, match=r"(?s)VOC2012/SegmentationClassAug.*SBD"):
        build_dataset("pascal", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs a data root"):
        build_dataset("pascal", None)

    name = read_pascal_list("val", 0)[0].split("__")[0]
    bad = root / "VOC2012" / "SegmentationClassAug" / f"{name}.png"
    bad.write_bytes(b"\x89PNG garbage")
    ds = build_dataset("pascal", root, fold=0, split="test", episodes=2)
    with pytest.raises(DatasetFileError, match=f"cannot read mask .*{name}.png"):
        ds[0]
    # A failure inside a DataLoader worker reaches the main process with the file name.
    with pytest.raises(DatasetFileError, match=f"{name}.png"):
        next(iter(DataLoader(ds, batch_size=1, num_workers=1)))
