"""Training engine and `train/run.py`: tiny schedules on the embedded shapes benchmark, on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcama.checkpoint import load_checkpoint_file
from dcama.data import build_dataset
from dcama.evaluate import evaluate_checkpoint
from dcama.model import DCAMA
from dcama.runtime import move_batch
from dcama.train import ConfigError, NonFiniteLossError, TrainConfig, train, train_step

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
# A few episodes of 64x64 images with SDPA attention: the whole machinery in seconds on two cores.
TINY = dict(img_size=64, bsz=2, epochs=2, episodes_per_epoch=4, val_episodes=2, test_episodes=0,
            attn_impl="sdpa", threads=1, progress=False)


def tiny_args(logdir: Path, *extra: str) -> list[str]:
    return ["--img-size", "64", "--bsz", "2", "--epochs", "2", "--episodes-per-epoch", "4", "--val-episodes", "2",
            "--attn-impl", "sdpa", "--threads", "1", "--logdir", str(logdir), "--no-progress", *extra]


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    logdir = tmp_path_factory.mktemp("uninterrupted")
    return train(TrainConfig(logdir=str(logdir), **TINY))


def test_cli_default_machinery_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    rc = load_cli("train").main(tiny_args(tmp_path, "--test-episodes", "2"))
    out = capsys.readouterr().out
    assert rc == 0
    assert "test (2 episodes, novel classes, seed 0): mIoU" in out
    assert f"best checkpoint: {tmp_path / 'best.pt'}" in out
    for name in ("best.pt", "last.pt", "config.json", "metrics.jsonl", "test.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert {"train_loss", "train_miou", "val_miou", "val_fb_iou", "best_val_miou", "lr", "episodes_per_s"} <= set(r)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["img_size"] == 64 and config["train"]["optimizer"] == "adamw"
    assert config["model"]["backbone"] == "resnet18" and config["world_size"] == 1
    assert "torch" in config["versions"]
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["epoch"] == 1 and last["config"]["backbone"] == "resnet18"
    test = json.loads((tmp_path / "test.json").read_text())
    assert test["settings"]["checkpoint"] == str(tmp_path / "best.pt") and test["episodes"] == 2


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    ds = build_dataset("shapes", None, split="trn", img_size=64, episodes=2, seed=0)
    batch = move_batch(torch.utils.data.default_collate([ds[0], ds[1]]), torch.device("cpu"))
    model = DCAMA("resnet18", attn_impl="sdpa").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [train_step(model, batch, optimizer, scaler)[1].item() for _ in range(20)]
    assert min(losses[-5:]) < 0.6 * losses[0], losses


def test_kill_and_resume_reaches_the_same_weights(tmp_path: Path, uninterrupted) -> None:
    cfg = TrainConfig(logdir=str(tmp_path), **TINY)

    def kill_after_first_epoch(epoch: int, record: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        train(cfg, on_epoch_end=kill_after_first_epoch)
    assert load_checkpoint_file(tmp_path / "last.pt")["epoch"] == 0
    resumed = train(TrainConfig(logdir=str(tmp_path), resume="last", **TINY))
    a = load_checkpoint_file(uninterrupted.last_checkpoint)
    b = load_checkpoint_file(resumed.last_checkpoint)
    assert b["epoch"] == a["epoch"] == 1
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_dropout_is_active_so_resume_test_covers_rng(uninterrupted) -> None:
    # Without dropout in training the RNG states would not matter and the resume test would prove less.
    model = DCAMA.from_checkpoint(uninterrupted.last_checkpoint, attn_impl="sdpa").train()
    ds = build_dataset("shapes", None, split="trn", img_size=64, episodes=1, seed=0)
    batch = torch.utils.data.default_collate([ds[0]])
    args = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    assert not torch.equal(model(*args), model(*args))


def test_evaluation_defaults_to_the_training_image_size(uninterrupted) -> None:
    result = evaluate_checkpoint(uninterrupted.best_checkpoint, episodes=2, attn_impl="sdpa", progress=False)
    assert result["settings"]["img_size"] == 64


def test_resume_checks_backbone_and_logdir_clash(tmp_path: Path, uninterrupted) -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        train(TrainConfig(resume=str(uninterrupted.last_checkpoint), logdir=str(tmp_path), backbone="resnet34",
                          **TINY))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig(logdir=str(uninterrupted.logdir), **TINY))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dcama.train as engine

    real_loss, calls, digest = engine.segmentation_loss, [0], {}

    def loss_nan_in_second_epoch(logits: torch.Tensor, target: torch.Tensor, fg_weight: float) -> torch.Tensor:
        calls[0] += 1
        loss = real_loss(logits, target, fg_weight)
        return loss * float("nan") if calls[0] > 2 else loss  # 2 steps per epoch: epoch 1, step 0

    def remember(epoch: int, record: dict) -> None:
        digest["last"] = hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest()

    monkeypatch.setattr(engine, "segmentation_loss", loss_nan_in_second_epoch)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1, step 0.*last good checkpoint"):
        train(TrainConfig(logdir=str(tmp_path), **TINY), on_epoch_end=remember)
    assert hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest() == digest["last"]
    assert load_checkpoint_file(tmp_path / "last.pt")["epoch"] == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_diverging_lr_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    rc = load_cli("train").main(tiny_args(tmp_path, "--optimizer", "sgd", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "error:" in err and "at epoch 0" in err and "Traceback" not in err


def test_cli_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    rc = load_cli("train").main(["--benchmark", "fss", "--datapath", str(tmp_path / "nowhere"),
                                 "--logdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_two_process_gloo_run_matches_single_process_evaluation(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train" / "run.py"), "--img-size", "64", "--bsz", "1", "--epochs", "1",
           "--episodes-per-epoch", "4", "--val-episodes", "3", "--test-episodes", "5", "--attn-impl", "sdpa",
           "--logdir", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("best checkpoint:") == 1  # only rank 0 reports
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["world_size"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    blob = load_checkpoint_file(tmp_path / "last.pt")
    assert len(blob["rng"]) == 2  # every rank's RNG streams, for an exact resume
    # The test episodes were split over the two ranks and the counts summed: same as one process.
    ddp = json.loads((tmp_path / "test.json").read_text())
    single = evaluate_checkpoint(tmp_path / "best.pt", episodes=5, img_size=64, attn_impl="sdpa", progress=False)
    assert ddp["miou"] == pytest.approx(single["miou"], abs=1e-9)
    assert ddp["fb_iou"] == pytest.approx(single["fb_iou"], abs=1e-9)


def test_one_training_step_through_the_fused_triton_op() -> None:
    # On a CPU this runs the Triton kernels in the interpreter (conftest sets TRITON_INTERPRET=1): one episode.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ds = build_dataset("shapes", None, split="trn", img_size=64, episodes=1, seed=0)
    batch = move_batch(torch.utils.data.default_collate([ds[0]]), device)
    model = DCAMA("resnet18", attn_impl="triton").to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.head.DCAMA_blocks[0].linears[0].weight.detach().clone()
    logits, loss = train_step(model, batch, optimizer, torch.amp.GradScaler(device.type, enabled=False))
    assert logits.shape == (1, 2, 64, 64) and torch.isfinite(loss)
    assert not torch.equal(before, model.head.DCAMA_blocks[0].linears[0].weight)  # gradients reached the op
