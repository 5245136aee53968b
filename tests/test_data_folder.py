"""The folder benchmark (dcama/data/folder.py) on small files written by the tests: the pairing rule, the one
report of every problem, splits.json and the seeded split, FSS-1000's own layout, and shapes written to a
folder coming back as exactly the tensors the shapes benchmark gives."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from dcama.config import BENCHMARK_DEFAULTS
from dcama.data import FolderLayoutError, build_dataset
from dcama.data.common import preprocess_image
from dcama.data.folder import SEEDED_FRACTION, image_names, pair_files, seeded_split
from dcama.data.fss import read_classes
from dcama.data.shapes import ShapesDataset, export_folder


def write_image(path, height=6, width=7, value=50, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).convert(mode).save(path)


def write_mask(path, height=6, width=7, grey=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if grey is None:
        grey = np.zeros((height, width), np.uint8)
        grey[1:4, 2:6] = 255
    Image.fromarray(grey).save(path)


def write_class(root, name, stems, image_ext=".jpg"):
    for stem in stems:
        write_image(root / name / f"{stem}{image_ext}")
        write_mask(root / name / (f"{stem}.mask.png" if image_ext == ".png" else f"{stem}.png"))


def test_pairing_rule():
    names = ["2.jpg", "2.png", "10.JPG", "10.png", "a.png", "a.mask.png", "b.webp", "b.png", "notes.txt", ".x.png",
             "lone.jpg", "lone.mask.png", "orphan.mask.png", "solo.png"]
    pairs, problems = pair_files(names)
    # Natural order (2 before 10); a .png is a mask beside an image of another format, otherwise an image.
    assert pairs == [("2.jpg", "2.png"), ("10.JPG", "10.png"), ("a.png", "a.mask.png"), ("b.webp", "b.png")]
    assert problems == ["lone.jpg: image without mask (expected lone.png)",
                        "solo.png: PNG image without mask (expected solo.mask.png; if it is a mask, its image "
                        "solo.jpg or another format is missing)",
                        "lone.mask.png: mask without image (the mask of lone.jpg is named lone.png)",
                        "orphan.mask.png: mask without image (expected the PNG image orphan.png)"]
    assert image_names(names) == ["2.jpg", "10.JPG", "a.png", "b.webp", "lone.jpg", "solo.png"]
    _, clash = pair_files(["c.jpg", "c.jpeg", "c.png", "d.jpg", "d.png", "d.mask.png"])
    assert clash == ["c.jpeg, c.jpg: names that differ only in case or extension",
                     "d.mask.png: mask without image (d.png is the mask of d.jpg)"]


def test_every_problem_reported_once_naming_the_files(tmp_path):
    write_class(tmp_path, "good", [1, 2, 3])
    write_class(tmp_path, "pngs", ["x", "y"], image_ext=".png")
    write_class(tmp_path, "small", [1])
    write_class(tmp_path, "broken", [1, 2, 3])
    (tmp_path / "broken" / "2.jpg").write_bytes(b"not an image")
    write_mask(tmp_path / "broken" / "3.png", height=5)
    write_image(tmp_path / "broken" / "4.jpg")  # no mask
    write_mask(tmp_path / "broken" / "5.mask.png")  # no image
    write_image(tmp_path / "broken" / "10.jpg")
    (tmp_path / "broken" / "10.png").write_bytes(b"not a mask")
    # "small" indexed first: the report is sorted all the same, by class, then file (in natural order), then
    # what is wrong with the class as a whole.
    (tmp_path / "splits.json").write_text(json.dumps({"trn": ["small", "good", "broken"], "test": ["pngs"]}))
    with pytest.raises(FolderLayoutError) as info:
        build_dataset("folder", tmp_path, split="test", shot=1, img_size=4)
    message = str(info.value)
    assert f"folder benchmark {tmp_path}: 7 problem(s) found while indexing" in message
    listed = [line[2:] for line in message.splitlines() if line.startswith("  ") and not line.startswith("  <")]
    # Every file named from the folder root, never by its absolute path.
    assert listed[:7] == ["broken/2.jpg: cannot read the image (not an image file PIL can identify)",
                          "broken/3.png: the mask is 5x7 (HxW), its image broken/3.jpg 6x7",
                          "broken/4.jpg: image without mask (expected broken/4.png)",
                          "broken/5.mask.png: mask without image (expected the PNG image broken/5.png)",
                          "broken/10.png: cannot read the mask (not an image file PIL can identify)",
                          "broken/: 1 image(s) with masks, 1-shot episodes need 2",
                          "small/: 1 image(s) with masks, 1-shot episodes need 2"]
    assert str(tmp_path / "broken") not in message
    assert "<datapath>/<class>/<name>.jpg" in message  # the layout follows the list
    # The classes of no split are not indexed: a splits.json that leaves the broken ones out works.
    (tmp_path / "splits.json").write_text(json.dumps({"trn": ["good"], "test": ["pngs"]}))
    ds = build_dataset("folder", tmp_path, split="test", shot=1, img_size=4)
    assert [ds[i]["query_name"] for i in range(len(ds))] == ["pngs/x.png", "pngs/y.png"]
    with pytest.raises(FolderLayoutError, match="splits.json gives no 'val' classes"):
        build_dataset("folder", tmp_path, split="val", shot=1, img_size=4)


def test_the_problems_are_listed_by_class_then_file_in_natural_order(tmp_path):
    """docs/data.md's order, not the lines' as strings: class a2 before a10 and a-b, a class's files before
    what is wrong with the class as a whole, whatever the characters after its name."""
    for name in ("a-b", "a10", "a2", "a"):
        write_class(tmp_path, name, ["x"])
    write_image(tmp_path / "a" / "z.jpg")  # no mask
    (tmp_path / "splits.json").write_text(json.dumps({"trn": ["a-b", "a"], "val": ["a10"], "test": ["a2"]}))
    with pytest.raises(FolderLayoutError) as info:
        build_dataset("folder", tmp_path, split="test", shot=1, img_size=4)
    listed = [line[2:] for line in str(info.value).splitlines() if line.startswith("  ") and not line.startswith("  <")]
    too_few = "1 image(s) with masks, 1-shot episodes need 2"
    assert listed[:5] == ["a/z.jpg: image without mask (expected a/z.png)", f"a/: {too_few}", f"a2/: {too_few}",
                          f"a10/: {too_few}", f"a-b/: {too_few}"]


@pytest.mark.parametrize("content, expected", [
    ("{", "cannot read"),
    ('["a"]', "must be a JSON object"),
    ('{"train": ["a"]}', r"unknown keys \['train'\]"),
    ('{"trn": ["a"], "test": ["a"]}', r"more than once: \['a'\]"),
    ('{"test": ["zebra"]}', r"without a folder: \['zebra'\]"),
])
def test_splits_json_errors(tmp_path, content, expected):
    write_class(tmp_path, "a", [1, 2])
    (tmp_path / "splits.json").write_text(content)
    with pytest.raises(FolderLayoutError, match=expected):
        build_dataset("folder", tmp_path, split="test", img_size=4)


def test_seeded_split_is_stable_and_recorded(tmp_path):
    classes = [f"class{i}" for i in range(10)]
    split = seeded_split(classes, 0)
    assert [len(split[s]) for s in ("trn", "val", "test")] == [6, 2, 2]
    assert sorted(sum(split.values(), [])) == sorted(classes) and split == seeded_split(classes[::-1], 0)
    assert seeded_split(classes, 1) != split
    # Adding classes moves none of the old ones into a split they were not in, except to fill the new sizes.
    bigger = seeded_split(classes + [f"new{i}" for i in range(5)], 0)
    assert len(set(split["test"]) - set(bigger["test"]) - set(bigger["val"])) <= 1
    assert SEEDED_FRACTION == {"test": 0.2, "val": 0.2}
    for name in classes[:5]:
        write_class(tmp_path, name, [1, 2])
    ds = build_dataset("folder", tmp_path, split="trn", shot=1, img_size=4)
    described = ds.describe()
    five = seeded_split(classes[:5], 0)
    assert described["splits"] == five and described["split_from"] == "seeded split (split_seed 0)"
    assert [ds.class_names[c] for c in ds.class_ids] == five["trn"]
    assert described["class_ids"] == {n: i for i, n in enumerate(classes[:5])}
    assert "write splits.json to choose your own" in described["summary"]
    assert all(f"{s}: {len(five[s])} classes: {', '.join(five[s])}" in described["summary"] for s in five)
    write_class(tmp_path / "two", "a", [1, 2])
    write_class(tmp_path / "two", "b", [1, 2])
    with pytest.raises(FolderLayoutError, match="a seeded split needs at least 3 class folders, found 2"):
        build_dataset("folder", tmp_path / "two", split="trn")


def test_masks_threshold_and_exif_orientation(tmp_path):
    grey = np.array([[0, 127, 128, 255]] * 2, np.uint8)  # the documented threshold: grey >= 128 is foreground
    for k, mode in enumerate(["L", "RGB", "P"]):  # palette masks are read through their colours
        write_image(tmp_path / "c" / f"{k}.jpg", 2, 4)
        Image.fromarray(grey).convert(mode).save(tmp_path / "c" / f"{k}.png")
    (tmp_path / "splits.json").write_text('{"test": ["c"]}')
    ds = build_dataset("folder", tmp_path, split="test", img_size=4, use_original_imgsize=True)
    for i in range(len(ds)):
        assert ds[i]["query_mask"].tolist() == [[0, 0, 1, 1]] * 2
    # A photo whose EXIF says "rotate 90": read as viewers show it, so its mask has the turned size.
    photo = Image.fromarray(np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "c" / "0.jpg", exif=exif)
    with pytest.raises(FolderLayoutError, match=r"the mask is 2x4 \(HxW\), its image c/0.jpg 4x2"):
        build_dataset("folder", tmp_path, split="test", img_size=4)
    write_mask(tmp_path / "c" / "0.png", height=4, width=2)
    item = build_dataset("folder", tmp_path, split="test", img_size=4, use_original_imgsize=True)[0]
    assert item["org_query_size"] == (4, 2)
    with Image.open(tmp_path / "c" / "0.jpg") as stored:
        turned = ImageOps.exif_transpose(stored).convert("RGB")
        assert turned.size == (2, 4) and torch.equal(item["query_img"], preprocess_image(turned, 4))


def test_fss1000_layout_reads_as_the_fss_benchmark(tmp_path):
    names = read_classes("test")
    base = tmp_path / "FSS-1000"
    for k, name in enumerate(names):
        for n in (1, 2, 10):
            write_image(base / name / f"{n}.jpg", value=(n * 20 + k) % 256)
            grey = np.zeros((6, 7), np.uint8)
            grey[1:4, k % 4:k % 4 + 3] = 128
            grey[4, :] = 127  # just below the threshold
            img = Image.fromarray(grey)
            (img.convert("RGB") if n == 2 else img).save(base / name / f"{n}.png")  # some releases ship RGB masks
    (base / "splits.json").write_text(json.dumps({"test": names}))
    fss = build_dataset("fss", tmp_path, split="test", shot=2, img_size=5)
    folder = build_dataset("folder", base, split="test", shot=2, img_size=5)
    assert len(folder) == len(fss) == 3 * len(names)
    assert [folder.class_names[c] for c in folder.class_ids] == names
    for i in range(0, len(fss), 7):
        a, b = fss[i], folder[i]
        assert a["class_id"] - 760 == b["class_id"]
        assert a["query_name"] == b["query_name"] and a["support_names"] == b["support_names"]
        for key in ("query_img", "query_mask", "support_imgs", "support_masks"):
            assert torch.equal(a[key], b[key]), (i, key)


def test_shapes_written_to_a_folder_come_back_exactly(tmp_path):
    export_folder(tmp_path, fold=1, images_per_class=3, img_size=32, seed=5)
    assert json.loads((tmp_path / "splits.json").read_text())["test"] == [
        f"c{c:02d}" for c in ShapesDataset(fold=1, split="test").class_ids]
    for split in ("trn", "val", "test"):
        shapes = ShapesDataset(fold=1, split=split, img_size=32, seed=5)
        folder = build_dataset("folder", tmp_path, split=split, shot=2, img_size=32)
        assert folder.class_ids == shapes.class_ids and len(folder) == 3 * len(shapes.class_ids)
        for i in range(len(folder)):
            item = folder[i]
            loaded = [shapes._load(int(name[1:3]), int(name[4:10]))
                      for name in [item["query_name"], *item["support_names"]]]
            assert torch.equal(item["query_img"], loaded[0][0]) and torch.equal(item["query_mask"], loaded[0][1].long())
            assert torch.equal(item["support_imgs"], torch.stack([img for img, _, _ in loaded[1:]]))
            assert torch.equal(item["support_masks"], torch.stack([m for _, m, _ in loaded[1:]]).float())
            assert item["class_id"] == int(item["query_name"][1:3])
            # Supports: other images of the query's class (the score test cannot see this: a model trained for
            # seconds barely uses its supports).
            assert {n.split("/")[0] for n in item["support_names"]} == {item["query_name"].split("/")[0]}
            assert len({item["query_name"], *item["support_names"]}) == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_default_workers_fit_the_machine_and_any_count_gives_the_same_episodes(tmp_path):
    # The real benchmarks' default of 8 DataLoader workers, capped by the CPUs this process may use (2 on
    # the CI VM: 8 workers there only compete with the main process).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert BENCHMARK_DEFAULTS["folder"]["workers"] == min(8, cpus)
    export_folder(tmp_path, images_per_class=4, img_size=24, splits=("test",))
    ds = build_dataset("folder", tmp_path, split="test", shot=2, img_size=24)
    runs = [list(DataLoader(ds, batch_size=3, num_workers=w)) for w in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == math.ceil(len(ds) / 3)
    for a, b in zip(*runs):
        assert a["query_name"] == b["query_name"] and a["support_names"] == b["support_names"]
        for key in ("query_img", "query_mask", "support_imgs", "support_masks"):
            assert torch.equal(a[key], b[key]), key
