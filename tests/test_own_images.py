"""One's own images, tied to what is already trusted, with a small model trained briefly on shapes: the folder
benchmark scores it as the shapes benchmark does, eval/predict.py writes exactly the masks model.predict
gives, and train/run.py and eval/run.py run on a folder benchmark. (The folder benchmark giving exactly the
shapes tensors: tests/test_data_folder.py.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcama.data import build_dataset
from dcama.data.folder import write_image_and_mask, write_splits
from dcama.data.shapes import ShapesDataset, class_name, export_folder
from dcama.evaluate import evaluate, model_predictor
from dcama.metrics import episode_iou
from dcama.model import DCAMA
from dcama.predict import SupportSet, load_model, read_support, segment
from dcama.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
# 60 steps of 8 episodes at 64 px (~15 s on one core): test mIoU ~30 on the novel classes, trivial predictors ~9.
BRIEF = dict(img_size=SIZE, bsz=8, epochs=1, episodes_per_epoch=480, val_episodes=8, test_episodes=0,
             attn_impl="sdpa", threads=1, progress=False)


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(TrainConfig(logdir=str(tmp_path_factory.mktemp("shapes-run")), **BRIEF)).best_checkpoint


@pytest.fixture(scope="module")
def model(trained: Path) -> DCAMA:
    return DCAMA.from_checkpoint(trained, attn_impl="sdpa")


def scores(model: DCAMA, dataset) -> tuple[float, np.ndarray]:
    """mIoU and every episode's IoU."""
    ious: list[float] = []
    predict = model_predictor(model)

    def recording(batch):
        pred = predict(batch)
        ious.extend(episode_iou(p, t) for p, t in zip(pred, batch["query_mask"]))
        return pred

    return evaluate(recording, dataset, batch_size=16, progress=False)["miou"], np.array(ious)


def test_folder_benchmark_scores_like_the_shapes_benchmark(model: DCAMA, tmp_path: Path) -> None:
    # The novel classes of fold 0 written as a folder (16 images each: 192 episodes) against 192 shapes
    # episodes. The episodes differ (every folder image is a query once with supports from 15 others; shapes
    # draws classes and images from pools of 1000), so the scores differ by sampling noise only. Tolerance:
    # 3 standard errors of the difference of two means of independent per-episode IoUs (a two-sided 99.7%
    # band if they come from one distribution), estimated from the episodes themselves: ~5 points here.
    # What it sees: images, masks, resizing and scoring that differ between the two paths. What it cannot:
    # supports of the wrong class, since a model trained this briefly scores the same with them (measured:
    # 33.8 vs 33.7); tests/test_data_folder.py checks where the supports come from.
    export_folder(tmp_path, fold=0, images_per_class=16, img_size=SIZE, splits=("test",))
    folder = build_dataset("folder", tmp_path, split="test", img_size=SIZE)
    shapes = build_dataset("shapes", None, split="test", img_size=SIZE, episodes=len(folder), seed=0)
    (f_miou, f_ious), (s_miou, s_ious) = scores(model, folder), scores(model, shapes)
    tolerance = 3 * math.sqrt(f_ious.var(ddof=1) / len(f_ious) + s_ious.var(ddof=1) / len(s_ious))
    print(f"\nfolder mIoU {f_miou:.2f}, shapes mIoU {s_miou:.2f}, tolerance {tolerance:.2f} (192 episodes each)")
    assert s_miou > 20  # far above the trivial predictors (~9): the comparison can see a broken pipeline
    assert abs(f_miou - s_miou) < tolerance


def cut_class(root: Path, count: int, height: int = 48, width: int = 88) -> list[tuple[str, str]]:
    """`count` images of one novel shapes class cut to height x width (not square, not the model's size) and
    written as a folder benchmark class; returns their (image, mask) paths."""
    shapes = ShapesDataset(split="test", img_size=width)
    cid, files = shapes.class_ids[0], []
    for number in range(100):
        rgb, mask = shapes.render(cid, number)
        top = (width - height) // 2
        rgb, mask = rgb[top:top + height], mask[top:top + height]
        if 0.02 < mask.mean() < 0.5:  # some foreground left after the cut
            write_image_and_mask(root, class_name(cid), f"{number:03d}", rgb, mask)
            files.append(tuple(str(root / class_name(cid) / f"{number:03d}{s}") for s in (".png", ".mask.png")))
        if len(files) == count:
            write_splits(root, {"test": [class_name(cid)]})
            return files
    raise AssertionError("too few images with foreground")


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def test_predict_writes_exactly_what_model_predict_gives(model: DCAMA, trained: Path, tmp_path: Path) -> None:
    files = cut_class(tmp_path / "data", 5)
    episode = build_dataset("folder", tmp_path / "data", split="test", shot=2, img_size=SIZE,
                            use_original_imgsize=True)[0]
    expected = model.predict(episode["query_img"][None], episode["support_imgs"][None],
                             episode["support_masks"][None], out_size=episode["org_query_size"])[0].numpy()
    assert expected.shape == (48, 88) and 0 < expected.mean() < 1  # a mask a wrong resize would change
    base = tmp_path / "data"
    supports = [(str(base / name), str(base / name).replace(".png", ".mask.png")) for name in episode["support_names"]]
    prepared = SupportSet.build([read_support(*pair) for pair in supports], SIZE)  # what predict feeds the model
    assert torch.equal(prepared.images, episode["support_imgs"]) and torch.equal(prepared.masks,
                                                                                 episode["support_masks"])
    out = tmp_path / "out"
    args = ["--checkpoint", str(trained), "--query", str(base / episode["query_name"]), "--out", str(out),
            "--attn-impl", "sdpa", "--no-progress"]
    for image, mask in supports:
        args += ["--support", image, mask]
    assert load_script("eval/predict.py").main(args) == 0  # --img-size defaults to the training size, 64
    name = Path(episode["query_name"]).stem
    assert np.array_equal(read_mask(out / "masks" / f"{name}.png"), np.where(expected == 1, 255, 0))
    result = json.loads((out / "predictions.json").read_text())
    assert result["settings"]["img_size"] == SIZE and result["queries"][0]["mask"] == f"masks/{name}.png"
    assert result["queries"][0]["foreground"] == pytest.approx(expected.mean(), abs=1e-6)
    with Image.open(out / result["queries"][0]["overlay"]) as overlay:
        assert overlay.height > 288 and overlay.width > 3 * 288  # two supports and the prediction, upscaled
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # The whole class folder in batches of 3 (masks beside the images are not queries): the Python entry point
    # gives the same masks, and an existing --out is refused unless --overwrite.
    whole = ["--checkpoint", str(trained), "--support", *files[0], "--query", str(base / class_name(
        ShapesDataset(split="test").class_ids[0])), "--out", str(out), "--bsz", "3", "--attn-impl", "sdpa",
             "--no-progress", "--no-overlays"]
    assert load_script("eval/predict.py").main(whole) == 2
    assert load_script("eval/predict.py").main(whole + ["--overwrite"]) == 0
    loaded, side = load_model(trained, attn_impl="sdpa")
    masks = segment(loaded, [files[0]], [image for image, _ in files], img_size=side, batch_size=3)
    for (image, _), mask in zip(files, masks):
        assert np.array_equal(read_mask(out / "masks" / f"{Path(image).stem}.png"), np.where(mask, 255, 0))


def test_train_and_eval_commands_on_a_folder_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    export_folder(data, images_per_class=2, img_size=SIZE)
    os.remove(data / "splits.json")  # the seeded split: printed and saved in the run's config
    logdir = tmp_path / "run"
    rc = load_script("train/run.py").main([
        "--benchmark", "folder", "--datapath", str(data), "--backbone", "resnet18", "--img-size", str(SIZE),
        "--bsz", "8", "--epochs", "1", "--attn-impl", "sdpa", "--threads", "1", "--workers", "0",
        "--logdir", str(logdir), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    data_config = json.loads((logdir / "config.json").read_text())["data"]
    split = data_config["splits"]
    assert data_config["split_from"] == "seeded split (split_seed 0)" and len(split["test"]) == 10
    assert f"folder benchmark {data}: seeded split (split_seed 0)" in out and "test: 10 classes" in out
    assert "(2 more; all in the run's config.json)" in out  # where the whole split is
    assert json.loads((logdir / "config.json").read_text())["train_episodes_per_epoch"] == 2 * len(split["trn"])
    rc = load_script("eval/run.py").main(["--checkpoint", str(logdir / "best.pt"), "--benchmark", "folder",
                                          "--datapath", str(data), "--attn-impl", "sdpa", "--no-progress",
                                          "--json", str(tmp_path / "test.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "mIoU" in out and "test: 10 classes" in out
    assert f"(2 more; all in {tmp_path / 'test.json'})" in out and "config.json" not in out
    result = json.loads((tmp_path / "test.json").read_text())
    assert result["episodes"] == 20 and result["settings"]["data"]["splits"] == split
    assert sorted(result["per_class"]) == sorted(str(data_config["class_ids"][c]) for c in split["test"])
    assert torch.equal(torch.tensor(result["settings"]["img_size"]), torch.tensor(SIZE))
