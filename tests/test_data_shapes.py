"""The embedded "shapes" benchmark: splits, seeding, episode structure, trivial-predictor scores."""

import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dcama.data import build_dataset
from dcama.data.common import episode_rng
from dcama.data import shapes
from dcama.data.shapes import N_CLASSES, class_style
from dcama.metrics import FewShotIoU


def test_class_splits_are_disjoint_and_folds_cover_all_classes():
    tests = []
    for fold in range(4):
        splits = {s: build_dataset("shapes", None, fold=fold, split=s).class_ids for s in ("trn", "val", "test")}
        assert len(splits["test"]) == 12 and len(splits["val"]) == 6 and len(splits["trn"]) == 30
        assert sorted(sum(splits.values(), [])) == list(range(N_CLASSES))
        tests += splits["test"]
    assert sorted(tests) == list(range(N_CLASSES))


def same_item(a, b):
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_episodes_are_pure_functions_of_seed_epoch_index():
    ds = build_dataset("shapes", None, split="trn", img_size=32, episodes=50, seed=3)
    first = [ds[i] for i in range(3)]
    again = build_dataset("shapes", None, split="trn", img_size=32, episodes=50, seed=3)  # a resumed run
    assert all(same_item(x, again[i]) for i, x in enumerate(first))
    assert first[0]["query_name"] != first[1]["query_name"]
    ds.set_epoch(1)
    assert not same_item(first[0], ds[0])
    again.set_epoch(1)
    assert same_item(ds[0], again[0])
    other_seed = build_dataset("shapes", None, split="trn", img_size=32, episodes=50, seed=4)
    assert not same_item(first[0], other_seed[0])
    assert episode_rng(3, 0, 7).integers(1 << 30) == episode_rng(3, 0, 7).integers(1 << 30)


def test_identical_items_for_any_worker_count():
    ds = build_dataset("shapes", None, split="test", shot=2, img_size=24, episodes=8)
    runs = [list(DataLoader(ds, batch_size=3, num_workers=w)) for w in (0, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a["query_img"], b["query_img"]) and torch.equal(a["support_masks"], b["support_masks"])
        assert a["query_name"] == b["query_name"] and a["support_names"] == b["support_names"]


def test_episode_structure():
    ds = build_dataset("shapes", None, split="test", shot=3, img_size=48, episodes=20)
    assert len(ds) == 20
    for i in range(len(ds)):
        item = ds[i]
        assert item["class_id"] in ds.class_ids
        assert item["query_img"].shape == (3, 48, 48) and item["support_imgs"].shape == (3, 3, 48, 48)
        assert item["query_mask"].dtype == torch.long and item["query_mask"].sum() > 0
        assert (item["support_masks"].flatten(1).sum(1) > 0).all()
        names = item["support_names"] + [item["query_name"]]
        assert len(set(names)) == 4 and all(f"/c{item['class_id']:02d}/" in n for n in names)


def test_supports_are_other_images_than_the_query(monkeypatch):
    """With 4 images per class and 3 shots a support equal to the query would be drawn in 3 episodes out of 4:
    every episode takes the query and its supports from the 4 distinct images of one class."""
    monkeypatch.setitem(shapes.POOL_SIZE, "test", 4)
    ds = build_dataset("shapes", None, split="test", shot=3, img_size=16, episodes=16)
    for i in range(len(ds)):
        item = ds[i]
        names = [item["query_name"], *item["support_names"]]
        assert sorted(names) == [f"shapes/test/c{item['class_id']:02d}/{n:06d}" for n in range(4)]


def test_foreground_pixels_show_the_class_colours():
    ds = build_dataset("shapes", None, split="val", img_size=64)
    for c in ds.class_ids:
        style = class_style(c)
        colours = np.stack([style["primary"], style["secondary"]])
        colours /= np.linalg.norm(colours, axis=1, keepdims=True)
        for number in range(3):
            rgb, mask = ds.render(c, number)
            px = rgb[mask == 1]
            px = px / np.linalg.norm(px, axis=1, keepdims=True)
            # Shading scales brightness only: the chromaticity of every foreground pixel is one of the two.
            assert np.median((px @ colours.T).max(1)) > 0.99


def test_trivial_predictors_score_far_below_60(capsys):
    ds = build_dataset("shapes", None, split="test", shot=1, img_size=64, episodes=100)
    all_fg, pasted = FewShotIoU(ds.class_ids), FewShotIoU(ds.class_ids)
    start = time.perf_counter()
    for i in range(len(ds)):
        item = ds[i]
        target, cls = item["query_mask"][None], [item["class_id"]]
        all_fg.update(torch.ones_like(target), target, cls)
        pasted.update(item["support_masks"][:1].long(), target, cls)
    elapsed = time.perf_counter() - start
    scores = {"all_foreground": all_fg.compute()["miou"], "support_mask_pasted": pasted.compute()["miou"]}
    with capsys.disabled():
        print(f"\nshapes test trivial mIoU (100 episodes, 64 px): {scores}; {elapsed / 100 * 1e3:.1f} ms/episode")
    assert max(scores.values()) < 25
    assert elapsed < 20  # a few ms per episode; generous for a loaded CI machine


def test_invalid_arguments():
    with pytest.raises(ValueError, match="shot must be >= 1"):
        build_dataset("shapes", None, shot=0)
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("shapes", None, split="train")
    with pytest.raises(IndexError):
        build_dataset("shapes", None, episodes=3)[3]
