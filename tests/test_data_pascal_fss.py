"""PASCAL-5i and FSS-1000 on tiny files written by the tests for the shipped split lists."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from dcama.data import DatasetFileError, build_dataset
from dcama.data.common import split_file


def read_pascal_list(split, fold):
    with open(split_file("pascal", split, f"fold{fold}.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def nearest(m, size):
    return F.interpolate(torch.as_tensor(m).float()[None, None], size=(size, size), mode="nearest")[0, 0].long()


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


def write_fss(root, split="test"):
    with open(split_file("fss", f"{split}.txt")) as f:
        names = sorted(line.strip() for line in f if line.strip())
    base = root / "FSS-1000"
    masks = {}
    for k, name in enumerate(names):
        d = base / name
        d.mkdir(parents=True)
        numbers = [1] if k == 5 else ([2, 10, 1] if k == 0 else [1, 2])
        for n in numbers:
            Image.fromarray(np.full((6, 7, 3), n * 20, np.uint8)).save(d / f"{n}.jpg")
            grey = np.zeros((6, 7), np.uint8)
            grey[1:4, 2:6] = 128
            grey[4, :] = 127  # just below the >= 128 threshold
            grey[0, 0] = 200 + n
            masks[f"{name}/{n}.jpg"] = (grey >= 128).astype(np.int64)
            img = Image.fromarray(grey)
            (img.convert("RGB") if n == 2 else img).save(d / f"{n}.png")  # some releases ship RGB masks
    return names, masks


def test_fss_layout_class_ids_and_every_image_a_query(tmp_path):
    names, masks = write_fss(tmp_path)
    with pytest.warns(UserWarning, match=f"classes \\['{names[5]}'\\] have fewer than shot\\+1=2"):
        ds = build_dataset("fss", tmp_path, split="test", shot=1, img_size=5, use_original_imgsize=True,
                           episodes=7)
    assert len(names) == 240 and ds.class_ids == list(range(760, 1000))
    assert len(ds) == 3 + 2 * 238  # every image of the kept classes, `episodes` ignored
    queries = [ds[i] for i in range(4)]
    assert [q["query_name"] for q in queries] == [f"{names[0]}/{n}.jpg" for n in (1, 2, 10)] + [f"{names[1]}/1.jpg"]
    assert [q["class_id"] for q in queries] == [760, 760, 760, 761]
    for q in queries:
        assert torch.equal(q["query_mask"], torch.from_numpy(masks[q["query_name"]]))
        assert q["support_names"][0] != q["query_name"]
        assert q["support_names"][0].split("/")[0] == q["query_name"].split("/")[0]
        assert torch.equal(q["support_masks"][0].long(), nearest(masks[q["support_names"][0]], 5))


def test_fss_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)FSS-1000 folder.*<root>/FSS-1000/<class name>/<n>\.jpg"):
        build_dataset("fss", tmp_path, split="test")
    names, _ = write_fss(tmp_path, "val")
    (tmp_path / "FSS-1000" / names[0] / "1.jpg").write_bytes(b"garbage")
    ds = build_dataset("fss", tmp_path, split="val", shot=1, img_size=4)
    assert ds.class_ids[0] == 520
    with pytest.raises(DatasetFileError, match=f"cannot read image .*{names[0]}{os.sep}1.jpg"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="FSS-1000 class folder"):
        build_dataset("fss", tmp_path, split="test")
