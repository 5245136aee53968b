"""eval/run.py --seeds: one model on the episodes of several seeds, mean +- standard deviation of every score
and every seed's numbers in the JSON; per-class lines name the class (each benchmark's own list)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from dcama.data.coco import CLASS_NAMES as COCO_NAMES
from dcama.data.pascal import CLASS_NAMES as VOC_NAMES
from dcama.data.shapes import export_folder
from dcama.evaluate import evaluate_checkpoint
from helpers import exit_status

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = [0, 1, 2]


def test_spread_is_the_mean_and_sample_deviation_of_the_single_seed_runs() -> None:
    kw = dict(baseline="support-mask", episodes=24, progress=False)
    several = evaluate_checkpoint(None, seeds=SEEDS, **kw)
    singles = [evaluate_checkpoint(None, seed=s, **kw) for s in SEEDS]
    assert [r["seed"] for r in several["runs"]] == SEEDS and several["settings"]["seeds"] == SEEDS
    for key in ("miou", "fb_iou"):
        values = [r[key] for r in singles]
        assert [r[key] for r in several["runs"]] == values
        assert several[key]["mean"] == pytest.approx(statistics.mean(values))
        assert several[key]["std"] == pytest.approx(statistics.stdev(values))  # n - 1: a sample of seeds
    assert len({r["miou"] for r in singles}) == len(SEEDS)  # the seeds draw other episodes
    for c, stats in several["per_class"].items():
        seen = [r["per_class"][c] for r in singles if r["per_class"][c] == r["per_class"][c]]  # NaN: no episode
        assert stats["mean"] == pytest.approx(statistics.mean(seen)) if seen else stats["mean"] != stats["mean"]


def test_cli_prints_the_spread_with_class_names_and_writes_every_seed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     load_cli) -> None:
    args = ["--baseline", "all-foreground", "--episodes", "24", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert load_cli("eval").main([*args, "--seeds", *map(str, SEEDS)]) == 0
    out = capsys.readouterr().out
    assert "shapes fold 0 1-shot, seeds 0 1 2" in out
    assert "mean +- standard deviation over seeds 0 1 2, 24 episodes each" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["seed"] for r in result["runs"]] == SEEDS and all("per_class" in r for r in result["runs"])
    assert f"mIoU {result['miou']['mean']:6.2f} +- {result['miou']['std']:5.2f}" in out
    assert "class    4 c04: IoU" in out  # shapes class 4 is named c04, as its exported folder


@pytest.mark.parametrize("seeds, message", [(["3"], "--seeds 3: give at least 2 distinct seeds (one seed: --seed)"),
                                            (["1", "1"], "--seeds 1 1: give at least 2 distinct seeds (one seed: "
                                                         "--seed)"),
                                            (["0", "-1"], "--seeds -1: must be an integer >= 0")])
def test_cli_bad_seeds_are_one_line(seeds: list[str], message: str, capsys: pytest.CaptureFixture, load_cli) -> None:
    assert exit_status(load_cli("eval").main, ["--baseline", "all-foreground", "--seeds", *seeds]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_folder_classes_are_named_by_their_folders(tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    export_folder(str(tmp_path / "data"), images_per_class=2, img_size=32, splits=("test",))
    args = ["--baseline", "support-mask", "--benchmark", "folder", "--datapath", str(tmp_path / "data"),
            "--no-progress", "--img-size", "32"]
    assert load_cli("eval").main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("class")]
    names = sorted(p.name for p in (tmp_path / "data").iterdir() if p.is_dir())
    assert len(lines) == 12 and sorted(line.split(":")[0].split()[-1] for line in lines) == names


def test_coco_and_voc_name_lists() -> None:
    assert len(set(COCO_NAMES)) == 80 and (COCO_NAMES[0], COCO_NAMES[15], COCO_NAMES[79]) == ("person", "cat",
                                                                                              "toothbrush")
    assert len(set(VOC_NAMES)) == 20 and (VOC_NAMES[0], VOC_NAMES[14], VOC_NAMES[19]) == ("aeroplane", "person",
                                                                                         "tvmonitor")
