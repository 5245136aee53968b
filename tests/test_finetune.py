"""train/run.py --init: a run starts from a DCAMA checkpoint's weights (ours or the authors' layout), takes its
backbone and image size, refuses the flags that contradict it and --resume, and starts a new optimiser and
schedule. (That fine-tuning beats training from scratch is a benchmark, bench/finetune.py, not a test.)"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from dcama.checkpoint import load_checkpoint_file
from dcama.data.folder import write_splits
from dcama.data.shapes import ShapesDataset, class_name, export_folder
from dcama.model import DCAMA
from dcama.config import BENCHMARK_DEFAULTS
from dcama.train import TrainConfig, read_init, resolve_config, train
from helpers import authors_state, exit_status, randomise_

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(bsz=2, epochs=1, val_episodes=2, test_episodes=0, attn_impl="sdpa", threads=1, progress=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of ours trained at 64 px for 2 steps, seed 7 (a seed-0 run's random backbone differs)."""
    logdir = tmp_path_factory.mktemp("source")
    return train(TrainConfig(logdir=str(logdir), img_size=64, seed=7, episodes_per_epoch=4, **TINY)).best_checkpoint


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def test_fine_tuning_starts_from_our_checkpoint_with_a_new_optimiser(source: Path, tmp_path: Path, load_cli) -> None:
    cfg = TrainConfig(logdir=str(tmp_path / "run"), init=str(source), episodes_per_epoch=6, **TINY)
    start = read_init(cfg)
    saved = load_checkpoint_file(source)
    assert start.backbone == "resnet18" and start.img_size == 64  # its training size, not the shapes default 96
    for key, value in start.model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][key]), key
    result = train(cfg)
    tuned = load_checkpoint_file(result.best_checkpoint)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["img_size"] == 64
    # The frozen backbone is the checkpoint's (a new model of this run's seed 0 would have another one)...
    for key, value in backbone_state(saved["state_dict"]).items():
        assert torch.equal(tuned["state_dict"][key], value), key
    assert not torch.equal(DCAMA("resnet18").state_dict()["backbone.net.conv1.weight"],
                           saved["state_dict"]["backbone.net.conv1.weight"])
    # ...and the optimiser and the schedule are new: 3 AdamW steps (6 episodes, 2 a step), not 2 + 3; epoch 1.
    last = load_checkpoint_file(result.last_checkpoint)  # best.pt holds the model only
    assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {3.0}
    assert [r["epoch"] for r in last["history"]] == [1] and last["epochs_done"] == 1
    # A stopped fine-tuning run resumes from last.pt with the settings it was started with (its checkpoint's):
    # the command names the run folder, not --init, which is not read again.
    cli = load_cli("train")
    given = ["--init", str(source), "--logdir", str(tmp_path / "run"), "--bsz", "2", "--epochs", "1",
             "--episodes-per-epoch", "6", "--val-episodes", "2", "--test-episodes", "0", "--attn-impl", "sdpa",
             "--threads", "1", "--no-progress"]
    argv = shlex.split(cli.resume_hint(cli.parse_args(given), tmp_path / "run").split(": ", 1)[1])[2:]
    assert "--init" not in argv and "--resume" in argv
    resumed = train(cli.parse_args(argv))  # its backbone and size fit last.pt
    assert resumed.epochs == 1 and (resumed.config.backbone, resumed.config.img_size) == ("resnet18", 64)
    assert resumed.config.init == str(source)  # recorded: what the run was fine-tuned from


def test_a_fine_tuning_run_takes_its_model_settings_from_the_checkpoint() -> None:
    """Not the benchmark's defaults: they stay unset until the --init file is read (then contradictions are
    refused), and the default run folder says the run fine-tunes."""
    cfg = resolve_config(TrainConfig(init=__file__, benchmark="folder", datapath=str(Path(__file__).parent)))
    assert (cfg.backbone, cfg.img_size, cfg.bsz) == (None, None, BENCHMARK_DEFAULTS["folder"]["bsz"])
    assert cfg.logdir.startswith("logs/folder-fold0-finetuned-1shot-")

def test_fine_tuning_from_an_authors_file_on_a_folder_benchmark(tmp_path: Path) -> None:
    torch.manual_seed(3)
    released = randomise_(DCAMA("resnet18", attn_impl="sdpa"))
    torch.save(authors_state(released), tmp_path / "authors.pth")
    data = tmp_path / "data"
    export_folder(str(data), images_per_class=2, img_size=64, splits=("test",))
    names = [class_name(c) for c in ShapesDataset(split="test").class_ids]
    write_splits(str(data), {"trn": names[:1], "val": names[1:2], "test": names[2:3]})
    # The folder benchmark's defaults are Swin-B at 384: the backbone comes from the file, the size too (the
    # authors trained at 384).
    result = train(TrainConfig(benchmark="folder", datapath=str(data), init=str(tmp_path / "authors.pth"),
                               logdir=str(tmp_path / "run"), workers=0, **TINY))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["backbone"] == "resnet18" and config["train"]["img_size"] == 384
    tuned = load_checkpoint_file(result.best_checkpoint)["state_dict"]
    for key, value in backbone_state(released.state_dict()).items():
        assert torch.equal(tuned[key], value), key


REFUSED = [
    (["--resume", "{tmp}/x.pt"], "--init {src} with --resume {tmp}/x.pt: --init starts a new run from a "
                                 "checkpoint's weights, --resume continues a run; give one of them"),
    (["--backbone", "resnet50"], "--backbone resnet50: --init {src} holds a model trained with --backbone resnet18; "
                                 "leave --backbone out (it is taken from the checkpoint)"),
    (["--img-size", "96"], "--img-size 96: --init {src} holds a model trained with --img-size 64; leave --img-size "
                           "out (it is taken from the checkpoint)"),
    (["--backbone-weights", "{src}"], "--backbone-weights {src}: --init {src} holds the backbone's weights; leave it "
                                      "out"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[a[0] for a, _ in REFUSED])
def test_cli_flags_that_contradict_the_checkpoint_are_one_line(argv: list[str], message: str, source: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               load_cli) -> None:
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{src}", str(source))

    args = ["--init", str(source), *map(fill, argv), "--logdir", str(tmp_path / "run")]
    assert exit_status(load_cli("train").main, args) == 2
    assert capsys.readouterr().err == f"error: {fill(message)}\n"
    assert not (tmp_path / "run").exists()


def test_cli_a_missing_init_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    args = ["--init", str(tmp_path / "no.pt"), "--logdir", str(tmp_path / "r")]
    assert exit_status(load_cli("train").main, args) == 2
    assert capsys.readouterr().err == f"error: --init {tmp_path / 'no.pt'}: no such file\n"
