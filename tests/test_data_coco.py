"""COCO-20i on a tiny COCO-format data set written by the tests: polygons, RLE (both encodings), crowd."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

import dcama.data.coco as coco_mod
from dcama.data import DatasetFileError, build_dataset, collate_episodes

# 80 category ids as in COCO (1..90 without 10 ids), listed shuffled in the JSON on purpose.
MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
CAT_IDS = [i for i in range(1, 91) if i not in MISSING_IDS]


def cat(class_index):
    return CAT_IDS[class_index]


def rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1  # COCO pixel (x, y) covers [x, x+1): a polygon corner at x1 stops before column x1
    return m


def polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rle_counts(m):
    """Column-major run lengths starting with a (possibly empty) run of zeros, as COCO stores masks."""
    flat = m.flatten(order="F")
    counts, value, run = [], 0, 0
    for px in flat:
        if px == value:
            run += 1
        else:
            counts.append(run)
            value, run = px, 1
    counts.append(run)
    return counts


def rle_string(counts):
    """COCO's compressed RLE string, written here from the format description (not with pycocotools)."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = x != -1 if ch & 0x10 else x != 0
            out.append(chr((ch | 0x20 if more else ch) + 48))
    return "".join(out)


def triangle(h, w):
    m = np.zeros((h, w), np.uint8)
    for r in range(h):
        m[r, max(0, w - 3 - r): w - 1] = 1 if r >= 10 else 0
    return m


def write_image(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def make_coco(root):
    """Write root/COCO2014 with val2014 (4 images) and train2014 (3 images); return the expected masks
    {(subset/file_name, class index): (H, W) uint8} drawn here with numpy."""
    base = root / "COCO2014"
    (base / "annotations").mkdir(parents=True)
    expected = {}
    specs = {
        "val2014": [
            # image id, (h, w), [(class, kind, payload, iscrowd)]
            (101, (20, 28), [(0, "poly", [polygon(2, 3, 10, 8)], 0),
                             (0, "rle", triangle(20, 28), 0),
                             (4, "urle", rect(20, 28, 20, 1, 27, 6), 1)]),
            (102, (24, 18), [(0, "poly", [polygon(1, 1, 5, 4), polygon(8, 10, 12, 20)], 0),
                             (4, "poly", [polygon(13, 2, 17, 9)], 0)]),
            (103, (16, 16), [(0, "urle", rect(16, 16, 3, 3, 13, 9), 1)]),
            (104, (22, 30), [(8, "poly", [polygon(0, 0, 30, 22)], 0),
                             (1, "poly", [polygon(4, 4, 9, 9)], 0),
                             (12, "poly", [[5, 5, 5, 5, 5, 5]], 0)]),  # zero-area polygon: no (image, class) pair
        ],
        "train2014": [
            (201, (18, 20), [(1, "poly", [polygon(2, 2, 8, 8)], 0), (0, "poly", [polygon(10, 10, 15, 15)], 0)]),
            (202, (20, 18), [(1, "rle", rect(20, 18, 0, 0, 6, 20), 0)]),
            (203, (16, 24), [(1, "poly", [polygon(3, 3, 20, 10)], 0), (2, "poly", [polygon(0, 10, 5, 16)], 0)]),
        ],
    }
    for subset, images in specs.items():
        (base / subset).mkdir()
        js = {"images": [], "annotations": [], "categories": []}
        for cid in sorted(CAT_IDS, key=lambda c: (c * 37) % 91):
            js["categories"].append({"id": cid, "name": f"cat{cid}", "supercategory": "x"})
        ann_id = 1
        for img_id, (h, w), anns in images:
            name = f"COCO_{subset}_{img_id:012d}.jpg"
            write_image(base / subset / name, h, w, img_id)
            js["images"].append({"id": img_id, "file_name": name, "height": h, "width": w})
            for cls, kind, payload, crowd in anns:
                if kind == "poly":
                    seg = payload
                    drawn = np.zeros((h, w), np.uint8)
                    for p in payload:
                        xs, ys = p[0::2], p[1::2]
                        if max(xs) > min(xs) and max(ys) > min(ys):
                            drawn |= rect(h, w, min(xs), min(ys), max(xs), max(ys))
                elif kind == "rle":
                    seg = {"size": [h, w], "counts": rle_string(rle_counts(payload))}
                    drawn = payload
                else:
                    seg = {"size": [h, w], "counts": rle_counts(payload)}
                    drawn = payload
                key = (f"{subset}/{name}", cls)
                expected[key] = expected.get(key, np.zeros((h, w), np.uint8)) | drawn
                js["annotations"].append({"id": ann_id, "image_id": img_id, "category_id": cat(cls),
                                          "segmentation": seg, "iscrowd": crowd, "area": float(drawn.sum()),
                                          "bbox": [0, 0, w, h]})
                ann_id += 1
        with open(base / "annotations" / f"instances_{subset}.json", "w") as f:
            json.dump(js, f)
    return {k: v for k, v in expected.items() if v.any()}


@pytest.fixture()
def coco_root(tmp_path):
    return tmp_path, make_coco(tmp_path)


def test_masks_match_drawn_masks_pixel_by_pixel(coco_root):
    root, expected = coco_root
    with pytest.warns(UserWarning, match=r"classes \[8, 12, .*, 76\] have fewer than shot\+1=2"):
        ds = build_dataset("coco", root, fold=0, split="test", shot=1, img_size=32, use_original_imgsize=True,
                           episodes=40)
    assert ds.class_ids == list(range(0, 80, 4))
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        c = item["class_id"]
        assert c in (0, 4)  # class 8 has one image: skipped for sampling
        want = expected[(item["query_name"], c)]
        assert item["org_query_size"] == want.shape
        assert torch.equal(item["query_mask"], torch.from_numpy(want).long())
        for name, m in zip(item["support_names"], item["support_masks"]):
            assert name != item["query_name"]
            raw = torch.from_numpy(expected[(name, c)]).float()[None, None]
            assert torch.equal(m, F.interpolate(raw, size=(32, 32), mode="nearest")[0, 0])
        seen.add((item["query_name"], c))
    # Crowd-only image 103 contains class 0; all (image, class) pairs of the test classes get sampled.
    assert seen == {k for k in expected if k[0].startswith("val2014") and k[1] in (0, 4)}


def test_image_preprocessing_and_resized_masks(coco_root):
    root, expected = coco_root
    ds = build_dataset("coco", root, fold=0, split="val", shot=2, img_size=16, episodes=5)
    item = ds[0]
    assert item["query_img"].shape == (3, 16, 16) and item["support_imgs"].shape == (2, 3, 16, 16)
    assert item["query_mask"].shape == (16, 16) and item["query_mask"].dtype == torch.long
    assert item["support_masks"].shape == (2, 16, 16)
    assert len(set(item["support_names"]) | {item["query_name"]}) == 3
    img = Image.open(root / "COCO2014" / item["query_name"]).convert("RGB")
    ref = TF.normalize(TF.to_tensor(TF.resize(img, [16, 16], antialias=True)),
                       [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.equal(item["query_img"], ref)  # the same PIL call and float ops as torchvision
    raw = torch.from_numpy(expected[(item["query_name"], item["class_id"])]).float()[None, None]
    assert torch.equal(item["query_mask"], F.interpolate(raw, size=(16, 16), mode="nearest")[0, 0].long())


def test_fold_class_assignment_and_train_pairs(coco_root):
    root, expected = coco_root
    folds = [coco_mod.fold_classes(f) for f in range(4)]
    assert folds[1] == [1 + 4 * k for k in range(20)]
    assert sorted(c for f in folds for c in f) == list(range(80))
    trn = build_dataset("coco", root, fold=0, split="trn", shot=1, img_size=8, use_original_imgsize=True)
    assert trn.class_ids == [c for c in range(80) if c % 4 != 0]
    # Only class 1 has >= 2 train images: its 3 (image, class) pairs are the epoch; class 2 is skipped.
    assert len(trn) == 3
    pairs = {(trn[i]["query_name"], trn[i]["class_id"]) for i in range(len(trn))}
    assert pairs == {k for k in expected if k[0].startswith("train2014") and k[1] == 1}
    for i in range(len(trn)):
        item = trn[i]
        assert torch.equal(item["query_mask"], torch.from_numpy(expected[(item["query_name"], 1)]).long())


def test_index_cache_is_json_reused_and_rebuilt_on_change(coco_root, monkeypatch):
    root, _ = coco_root
    ann_dir = root / "COCO2014" / "annotations"
    build_dataset("coco", root, fold=0, split="test", episodes=2)
    cache = ann_dir / "dcama_index_val2014.json"
    with open(cache) as f:
        index = json.load(f)
    assert index["categories"] == CAT_IDS
    assert [img for img, _ in index["classes"][0]] == [101, 102, 103]

    def no_build(_):
        raise AssertionError("index rebuilt although the annotation file did not change")

    monkeypatch.setattr(coco_mod, "build_index", no_build)
    build_dataset("coco", root, fold=0, split="test", episodes=2)
    monkeypatch.undo()

    # Drop image 103's annotation: the file's size changes, so the index must follow.
    ann_file = ann_dir / "instances_val2014.json"
    js = json.loads(ann_file.read_text())
    js["annotations"] = [a for a in js["annotations"] if a["image_id"] != 103]
    ann_file.write_text(json.dumps(js))
    ds = build_dataset("coco", root, fold=0, split="test", img_size=8, episodes=30)
    assert all(ds[i]["query_name"] != "val2014/COCO_val2014_000000000103.jpg" for i in range(30))
    assert [img for img, _ in json.loads(cache.read_text())["classes"][0]] == [101, 102]


def test_unwritable_cache_folder_falls_back(coco_root, monkeypatch):
    root, expected = coco_root

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(coco_mod, "atomic_open", refuse)  # the atomic writer behind the cache
    with pytest.warns(UserWarning, match="cannot write the COCO index cache"):
        ds = build_dataset("coco", root, fold=0, split="test", episodes=2, use_original_imgsize=True)
    item = ds[0]
    assert torch.equal(item["query_mask"], torch.from_numpy(expected[(item["query_name"], item["class_id"])]).long())
    assert not (root / "COCO2014" / "annotations" / "dcama_index_val2014.json").exists()


def test_png_mask_source_matches_json(coco_root):
    root, expected = coco_root
    png_dir = root / "COCO2014" / "annotations" / "val2014"
    with pytest.raises(FileNotFoundError, match="mask_source='png'"):
        build_dataset("coco", root, fold=0, split="test", mask_source="png")
    png_dir.mkdir()
    labels = {}
    for (name, cls), m in expected.items():
        if name.startswith("val2014/") and cls % 4 == 0:  # fold 0 test classes
            stem = os.path.splitext(os.path.basename(name))[0]
            lab = labels.setdefault(stem, np.zeros(m.shape, np.uint8))
            assert not (lab[m == 1]).any()  # the test data keeps classes apart, as one PNG holds one label
            lab[m == 1] = cls + 1
    for stem, lab in labels.items():
        Image.fromarray(lab).save(png_dir / f"{stem}.png")
    kw = dict(fold=0, split="test", shot=1, img_size=24, use_original_imgsize=True, episodes=12)
    a = build_dataset("coco", root, mask_source="json", **kw)
    b = build_dataset("coco", root, mask_source="png", **kw)
    for i in range(len(a)):
        ia, ib = a[i], b[i]
        assert ia["query_name"] == ib["query_name"]
        assert torch.equal(ia["query_mask"], ib["query_mask"])
        assert torch.equal(ia["support_masks"], ib["support_masks"])


def test_original_size_collate_and_worker_determinism(coco_root):
    root, _ = coco_root
    ds = build_dataset("coco", root, fold=0, split="test", shot=2, img_size=16, use_original_imgsize=True,
                       episodes=6)
    batches = [list(DataLoader(ds, batch_size=3, num_workers=w, collate_fn=collate_episodes)) for w in (0, 2)]
    for b0, b2 in zip(*batches):
        assert b0["query_img"].shape == (3, 3, 16, 16) and b0["support_masks"].shape == (3, 2, 16, 16)
        assert isinstance(b0["query_mask"], list) and len(b0["query_mask"]) == 3
        for m, size in zip(b0["query_mask"], b0["org_query_size"]):
            assert tuple(m.shape) == size
        assert b0["query_name"] == b2["query_name"] and b0["support_names"] == b2["support_names"]
        assert torch.equal(b0["query_img"], b2["query_img"])
        assert all(torch.equal(x, y) for x, y in zip(b0["query_mask"], b2["query_mask"]))


def test_errors_name_the_layout_and_the_file(tmp_path, coco_root):
    with pytest.raises(FileNotFoundError, match=r"(?s)cocodataset.*COCO2014/annotations/instances_train2014\.json"):
        build_dataset("coco", tmp_path / "missing", split="trn")
    (tmp_path / "empty" / "COCO2014" / "val2014").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"instances_val2014\.json"):
        build_dataset("coco", tmp_path / "empty", split="test")

    root, _ = coco_root
    ann = root / "COCO2014" / "annotations" / "instances_val2014.json"
    good = ann.read_text()
    ann.write_text(good[: len(good) // 2])
    with pytest.raises(DatasetFileError, match="instances_val2014.json"):
        build_dataset("coco", root, split="test")
    ann.write_text(good)

    for f in (root / "COCO2014" / "val2014").iterdir():
        f.write_bytes(b"not a jpeg")
    ds = build_dataset("coco", root, split="test", episodes=2)
    with pytest.raises(DatasetFileError, match=r"cannot read image .*COCO_val2014_0+10\d\.jpg"):
        ds[0]
    with pytest.raises(ValueError, match="unknown benchmark"):
        build_dataset("imagenet", root)
    with pytest.raises(ValueError, match="fold must be in 0..3"):
        build_dataset("coco", root, fold=4)
