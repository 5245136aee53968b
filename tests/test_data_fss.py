"""FSS-1000 on tiny files written by the tests for the shipped split lists."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dcama.data import DatasetFileError, build_dataset
from dcama.data.common import split_file
from helpers import nearest


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
