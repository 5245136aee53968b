"""Evaluation engine and `eval/run.py` on the embedded shapes benchmark, on the CPU."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from dcama.checkpoint import CheckpointError, save_checkpoint
from dcama.data import BENCHMARKS, build_dataset
from dcama.data.shapes import export_folder
from dcama.evaluate import baseline_predictor, evaluate, evaluate_checkpoint
from dcama.flags import ConfigError, OutputError, unused_episodes_note
from dcama.model import DCAMA
from dcama.visualize import GAP, MARGIN, PANEL_HEIGHT
from helpers import exit_status

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, DCAMA("resnet18", attn_impl="sdpa"))
    return path


def shapes(episodes: int = 6, **kw) -> torch.utils.data.Dataset:
    return build_dataset("shapes", None, fold=0, split="test", img_size=64, episodes=episodes, seed=0, **kw)


def test_oracle_scores_100_and_trivial_predictors_do_not() -> None:
    ds = shapes(12)
    oracle = evaluate(lambda batch: (batch["query_mask"] == 1).long(), ds, batch_size=4, progress=False)
    assert oracle["miou"] == pytest.approx(100.0) and oracle["fb_iou"] == pytest.approx(100.0)
    assert oracle["episodes"] == 12
    for name in ("all-foreground", "support-mask"):
        result = evaluate(baseline_predictor(name), ds, batch_size=4, progress=False)
        assert 0.0 < result["miou"] < 60.0, (name, result)
    empty = evaluate(lambda batch: torch.zeros_like(batch["query_mask"]), ds, batch_size=4, progress=False)
    assert empty["miou"] == 0.0


def test_same_seed_same_json_and_original_size(checkpoint: Path, tmp_path: Path) -> None:
    kw = dict(episodes=4, img_size=64, attn_impl="sdpa", progress=False)
    first = evaluate_checkpoint(checkpoint, json_path=tmp_path / "a.json", **kw)
    evaluate_checkpoint(checkpoint, json_path=tmp_path / "b.json", **kw)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    saved = json.loads((tmp_path / "a.json").read_text())
    assert {"miou", "fb_iou", "per_class", "settings"} <= set(saved)
    assert saved["settings"]["seed"] == 0 and saved["settings"]["episodes"] == 4
    assert saved["settings"]["model_config"]["backbone"] == "resnet18"
    assert saved["miou"] == pytest.approx(first["miou"])
    # Shapes renders at img_size, so its "original size" path must give the same numbers.
    original = evaluate_checkpoint(checkpoint, use_original_imgsize=True, **kw)
    assert original["miou"] == pytest.approx(first["miou"]) and original["fb_iou"] == pytest.approx(first["fb_iou"])


def test_cli_prints_writes_json_and_one_png_per_episode(checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture, load_cli) -> None:
    from PIL import Image

    rc = load_cli("eval").main(["--checkpoint", str(checkpoint), "--episodes", "3", "--img-size", "64",
                                "--attn-impl", "sdpa", "--json", str(tmp_path / "r.json"),
                                "--visualize", str(tmp_path / "vis"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mIoU" in out and "FB-IoU" in out and "class " in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["settings"]["benchmark"] == "shapes" and result["settings"]["checkpoint"] == str(checkpoint)
    pngs = sorted((tmp_path / "vis").glob("*.png"))
    assert len(pngs) == 3 and all("_iou" in p.name for p in pngs)
    with Image.open(pngs[0]) as img:  # support, ground truth, prediction: three panels upscaled side by side
        assert img.size[0] == 2 * MARGIN + 3 * PANEL_HEIGHT + 2 * GAP


def test_cli_baseline(capsys: pytest.CaptureFixture, load_cli) -> None:
    rc = load_cli("eval").main(["--baseline", "all-foreground", "--episodes", "4", "--img-size", "64", "--no-progress"])
    assert rc == 0 and "mIoU" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "corrupt", "backbone", "dataset"])
def test_cli_clear_errors(case: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    args = ["--checkpoint", str(checkpoint), "--episodes", "2", "--img-size", "64", "--no-progress"]
    expect = {"missing": "no such file", "corrupt": "corrupt", "backbone": "resnet18", "dataset": "nowhere"}[case]
    if case == "missing":
        args[1] = str(tmp_path / "absent.pt")
    elif case == "corrupt":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(checkpoint.read_bytes()[:5000])
        args[1] = str(bad)
    elif case == "backbone":
        args += ["--backbone", "resnet34"]
    else:
        args += ["--benchmark", "pascal", "--datapath", str(tmp_path / "nowhere")]
    rc = load_cli("eval").main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and expect in err and "Traceback" not in err


BAD_FLAGS = [
    (["--fold", "4"], "--fold 4: shapes has folds 0..3"),
    (["--benchmark", "fss", "--datapath", "{tmp}", "--fold", "2"], "--fold 2: fss has no folds (only --fold 0)"),
    (["--benchmark", "fss", "--datapath", "{tmp}", "--nshot", "12"],
     "--nshot 12: fss allows 1..9 (each class has 10 images and one is the query)"),
    (["--nshot", "0"], "--nshot 0: must be an integer >= 1"),
    (["--benchmark", "pascal"], "--datapath is needed for --benchmark pascal (the folder that holds its data)"),
    (["--benchmark", "folder", "--datapath", "{tmp}", "--fold", "1"], "--fold 1: folder has no folds (only --fold 0)"),
    (["--episodes", "0"], "--episodes 0: must be an integer >= 1"),
    (["--seed", "-3"], "--seed -3: must be an integer >= 0"),
    (["--bsz", "0"], "--bsz 0: must be an integer >= 1"),
    (["--workers", "-1"], "--workers -1: must be an integer >= 0"),
    (["--backbone", "swin_b", "--img-size", "64"], "--img-size 64: swin_b takes a side that is a multiple of 32 "
     "whose stage grids (side/4 to side/32) are multiples of its 12-token window or at most 12: 32, 96, 192, 384, "
     "768, ..."),
    (["--img-size", "0"], "--img-size 0: must be an integer >= 1"),
    (["--use-original-imgsize", "--bsz", "4"], "--bsz 4: --use-original-imgsize needs --bsz 1 (the queries differ in "
                                               "size)"),
    (["--fold", "one"], "argument --fold: invalid int value: 'one' (--help lists the flags)"),
    (["--threads", "-1"], "--threads -1: must be an integer >= 0"),
    # Outputs, checked before anything is loaded (a path under a regular file fails even for root).
    (["--json", "{ckpt}/r.json"], "--json {ckpt}/r.json: {ckpt} is a file, so nothing can be written under it"),
    (["--json", "{tmp}"], "--json {tmp}: is a folder; give a file name"),
    (["--visualize", "{ckpt}"], "--visualize {ckpt}: is a file, not a folder"),
    (["--visualize", "{ckpt}/a/b"], "--visualize {ckpt}/a/b: {ckpt} is a file, so nothing can be written under it"),
    # Checked against the checkpoint's backbone (resnet18) when --backbone is not given, before any episode.
    (["--img-size", "50"], "--img-size 50: resnet18 takes a side that is a positive multiple of 32 (its total "
                           "stride): 32, 64, 96, ..."),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_cli_bad_flag_is_one_line_naming_it(argv: list[str], message: str, checkpoint: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture, load_cli) -> None:
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(checkpoint))

    argv = ["--checkpoint", str(checkpoint), "--json", str(tmp_path / "out.json"), *map(fill, argv)]
    assert exit_status(load_cli("eval").main, argv) == 2
    assert capsys.readouterr().err == f"error: {fill(message)}\n"
    assert not (tmp_path / "out.json").exists()


def test_cli_names_the_checkpoints_in_a_folder_passed_as_the_checkpoint(checkpoint: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture,
                                                                        load_cli) -> None:
    for name in ("last.pt", "best.pt", "notes.txt"):
        (tmp_path / name).write_bytes(checkpoint.read_bytes() if name.endswith(".pt") else b"x")
    assert load_cli("eval").main(["--checkpoint", str(tmp_path), "--episodes", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: --checkpoint {tmp_path}: is a folder, not a file; it holds best.pt, "
                                       "last.pt: pass one of them\n")
    with pytest.raises(CheckpointError, match="is a folder, not a file; it holds best.pt, last.pt"):
        evaluate_checkpoint(tmp_path, episodes=2, progress=False)


def test_outputs_are_checked_before_anything_is_read(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Python entry point checks json_path and visualize_dir as eval/run.py's --json and --visualize, before
    # it reads the checkpoint or builds the data set (a path under a regular file fails even for root).
    def not_now(*args, **kwargs):
        raise AssertionError("read before the outputs were checked")

    monkeypatch.setattr("dcama.evaluate.load_checkpoint_file", not_now)
    monkeypatch.setattr("dcama.evaluate.build_dataset", not_now)
    kw = dict(episodes=2, attn_impl="sdpa", progress=False)
    for name, key in (("json", "json_path"), ("visualize", "visualize_dir")):
        for img_size in (None, 64):
            with pytest.raises(ConfigError) as info:
                evaluate_checkpoint(checkpoint, img_size=img_size, **{key: checkpoint / "r"}, **kw)
            assert str(info.value) == f"--{name} {checkpoint / 'r'}: {checkpoint} is a file, so nothing can be " \
                                      "written under it"
    with pytest.raises(ConfigError, match="is a file, so nothing can be written under it"):
        evaluate_checkpoint(None, baseline="all-foreground", json_path=checkpoint / "r", **kw)


def test_a_bad_benchmark_folder_is_reported_before_the_checkpoint_is_read(checkpoint: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture,
                                                                          load_cli) -> None:
    reads = []
    monkeypatch.setattr("dcama.evaluate.load_checkpoint_file", lambda path: reads.append(path) or {})
    for name in ("a", "b", "c"):  # a folder benchmark whose images have no masks
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "1.jpg")
    argv = ["--checkpoint", str(checkpoint), "--benchmark", "folder", "--datapath", str(tmp_path),
            "--img-size", "64", "--no-progress"]
    assert load_cli("eval").main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: folder benchmark {tmp_path}: 6 problem(s) found while "
                                              "indexing; fix them and run again:\n  a/1.jpg: image without mask")
    with pytest.raises(FileNotFoundError, match="folder benchmark not found"):
        evaluate_checkpoint(checkpoint, benchmark="folder", datapath=str(tmp_path / "absent"), img_size=64,
                            progress=False)
    assert reads == []
    # Without img_size the checkpoint decides the size, so it is read first (once).
    with pytest.raises(FileNotFoundError, match="folder benchmark not found"):
        evaluate_checkpoint(checkpoint, benchmark="folder", datapath=str(tmp_path / "absent"), progress=False)
    assert reads == [checkpoint]


def test_classes_without_an_episode_are_a_printed_note(checkpoint: Path, capfd: pytest.CaptureFixture,
                                                       load_cli) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning (with its source line) fails the test
        rc = load_cli("eval").main(["--checkpoint", str(checkpoint), "--episodes", "2", "--img-size", "64",
                                    "--attn-impl", "sdpa", "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 0
    classes = len(shapes().class_ids)
    assert err.startswith(f"note: {classes - 2} of {classes} classes had no episode (") or \
        err.startswith(f"note: {classes - 1} of {classes} classes had no episode (")
    assert err.endswith("): left out of the mIoU mean\n") and err.count("\n") == 1


def test_the_checkpoint_file_is_read_once(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append(a[0]) or load(*a, **kw))
    result = evaluate_checkpoint(checkpoint, episodes=2, attn_impl="sdpa", progress=False)
    assert reads == [str(checkpoint)]
    # A checkpoint saved from Python records no training size: the benchmark's (shapes: 96).
    assert result["settings"]["img_size"] == 96


def test_a_full_disk_at_the_end_is_one_line_naming_the_file(checkpoint: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path, payload):
        raise OSError(28, "No space left on device", str(path) + ".tmp")

    monkeypatch.setattr("dcama.evaluate.write_json", full_disk)
    with pytest.raises(OutputError) as info:
        evaluate_checkpoint(checkpoint, episodes=2, img_size=64, attn_impl="sdpa", progress=False,
                            json_path=tmp_path / "r.json")
    assert str(info.value) == f"cannot write {tmp_path / 'r.json'}: No space left on device"


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_an_episode_count_a_benchmark_ignores_is_a_note(benchmark: str, tmp_path: Path) -> None:
    """The note is said exactly when the benchmark's length does not follow `episodes` (FSS-1000, folder)."""
    root = None
    if benchmark == "folder":
        root = str(tmp_path / "folder")
        export_folder(root, images_per_class=3, img_size=32)
    elif BENCHMARKS[benchmark].rules.needs_root:
        pytest.skip(f"{benchmark} needs its data set on disk")
    lengths = {len(build_dataset(benchmark, root, split="test", img_size=32, episodes=n)) for n in (5, 7)}
    note = unused_episodes_note(benchmark, "episodes", 5)
    assert (note is not None) == (lengths != {5, 7}), (benchmark, lengths)
    assert unused_episodes_note(benchmark, "episodes", None) is None


def test_cli_notes_that_folder_takes_no_episode_count(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     load_cli) -> None:
    export_folder(str(tmp_path / "folder"), images_per_class=3, img_size=32)
    argv = ["--baseline", "all-foreground", "--benchmark", "folder", "--datapath", str(tmp_path / "folder"),
            "--img-size", "32", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert load_cli("eval").main([*argv, "--episodes", "5"]) == 0
    err = capsys.readouterr().err
    assert "note: --episodes 5 is not used: folder episodes are every image of the split once" in err
    assert json.loads((tmp_path / "r.json").read_text())["episodes"] == 12 * 3  # the 12 test classes, 3 images
    assert load_cli("eval").main(argv) == 0
    assert "--episodes" not in capsys.readouterr().err
