"""Training engine and `train/run.py`: tiny schedules on the embedded shapes benchmark, on the CPU, including
kills (SIGKILL) and stop signals at steps inside an epoch, unreadable and unwritable checkpoints, the run folder's
lock and the one-line errors for bad flags."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dcama.checkpoint as checkpoint_module
import dcama.runtime as runtime
from dcama.checkpoint import load_checkpoint_file, save_checkpoint
from dcama.data import build_dataset
from dcama.data.shapes import export_folder
from dcama.evaluate import evaluate_checkpoint
from dcama.files import folder_lock
from dcama.flags import OutputError, writing
from dcama.model import DCAMA
from dcama.runtime import Interrupted, move_batch
from dcama.train import ConfigError, NonFiniteLossError, RunStopped, TrainConfig, WriteError, train, train_step
from helpers import exit_status

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
# A few episodes of 64x64 images with SDPA attention: the whole machinery in seconds on two cores. Three steps
# an epoch, so that a kill can fall between two steps inside an epoch.
TINY = dict(img_size=64, bsz=2, epochs=2, episodes_per_epoch=6, val_episodes=2, test_episodes=0,
            attn_impl="sdpa", threads=1, progress=False)
EVERY_STEP = 1e-6  # --save-every-min small enough that every step is followed by a checkpoint


def tiny_args(logdir: Path, *extra: str) -> list[str]:
    return ["--img-size", "64", "--bsz", "2", "--epochs", "2", "--episodes-per-epoch", "6", "--val-episodes", "2",
            "--test-episodes", "0", "--attn-impl", "sdpa", "--threads", "1", "--logdir", str(logdir), "--no-progress",
            *extra]


class Killed(Exception):
    """Stands for the process being killed (in-process tests)."""


def kill_at(epoch: int, step: int):
    def hook(e: int, s: int) -> None:
        if (e, s) == (epoch, step):
            raise Killed

    return hook


def assert_same_run(a_path: Path, b_path: Path) -> None:
    """Two checkpoints of the same run: bit-identical weights and optimiser state, the same history."""
    a, b = load_checkpoint_file(a_path), load_checkpoint_file(b_path)
    assert b["epochs_done"] == a["epochs_done"] and "in_epoch" not in a and "in_epoch" not in b
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    logdir = tmp_path_factory.mktemp("uninterrupted")
    return train(TrainConfig(logdir=str(logdir), **TINY))


def test_cli_default_machinery_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch, load_cli) -> None:
    monkeypatch.chdir(REPO)  # the commands it prints are relative to the working folder
    umask = os.umask(0o027)
    try:
        rc = load_cli("train").main(tiny_args(tmp_path, "--test-episodes", "2"))
    finally:
        os.umask(umask)
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"run folder: {tmp_path}"
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert "test (2 episodes, novel classes, seed 0): mIoU" in out
    assert f"best checkpoint: {tmp_path / 'best.pt'}" in out
    assert f"results in {tmp_path}: backbone.pt, best.pt, config.json, last.prev.pt, last.pt, metrics.jsonl, " \
           "tensorboard/, test.json" in out
    assert lines[-1] == f"next, evaluate it: python eval/run.py --checkpoint {tmp_path / 'best.pt'} " \
                        "--benchmark shapes --fold 0 --nshot 1 --bsz 2 --episodes 2 --attn-impl sdpa"
    for name in ("backbone.pt", "best.pt", "last.pt", "last.prev.pt", "config.json", "metrics.jsonl", "test.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # the umask's mode, not mkstemp's 0600
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # numbered as the printed lines are
    best = max(records, key=lambda r: r["val_miou"])["epoch"]
    assert f"at epoch {best}/2)" in next(line for line in lines if line.startswith("epoch 2/2"))
    assert f"best validation mIoU {records[-1]['best_val_miou']:.2f} at epoch {best}/2" in lines
    for r in records:
        assert {"train_loss", "train_miou", "val_miou", "val_fb_iou", "best_val_miou", "lr", "episodes_per_s"} <= set(r)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["img_size"] == 64 and config["train"]["optimizer"] == "adamw"
    assert config["model"]["backbone"] == "resnet18" and config["world_size"] == 1
    assert "torch" in config["versions"]
    last, previous = load_checkpoint_file(tmp_path / "last.pt"), load_checkpoint_file(tmp_path / "last.prev.pt")
    assert last["epochs_done"] == 2 and previous["epochs_done"] == 1 and last["config"]["backbone"] == "resnet18"
    test = json.loads((tmp_path / "test.json").read_text())
    assert test["settings"]["checkpoint"] == str(tmp_path / "best.pt") and test["episodes"] == 2


def test_cli_the_printed_eval_command_repeats_the_test(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch, load_cli) -> None:
    """`next, evaluate it` scores best.pt as the run's test did: the same scores, and the same episodes, batch
    size, workers, CPU threads, attention and precision, so at the same speed. Flags away from the defaults
    (3 threads, 1 worker) so that a command that leaves one out runs otherwise."""
    monkeypatch.chdir(REPO)
    assert load_cli("train").main(tiny_args(tmp_path, "--epochs", "1", "--test-episodes", "3", "--threads", "3",
                                            "--workers", "1")) == 0
    command = shlex.split(capsys.readouterr().out.splitlines()[-1].removeprefix("next, evaluate it: "))
    assert command[:2] == ["python", "eval/run.py"]
    assert load_cli("eval").main([*command[2:], "--json", str(tmp_path / "again.json"), "--no-progress"]) == 0
    test, again = (json.loads((tmp_path / name).read_text()) for name in ("test.json", "again.json"))
    assert again == test and test["settings"]["threads"] == 3 and test["settings"]["batch_size"] == 2


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    ds = build_dataset("shapes", None, split="trn", img_size=64, episodes=2, seed=0)
    batch = move_batch(torch.utils.data.default_collate([ds[0], ds[1]]), torch.device("cpu"))
    model = DCAMA("resnet18", attn_impl="sdpa").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [train_step(model, batch, optimizer, scaler)[1].item() for _ in range(20)]
    assert min(losses[-5:]) < 0.6 * losses[0], losses


def test_kill_after_an_epoch_and_resume_reaches_the_same_weights(tmp_path: Path, uninterrupted) -> None:
    def kill_after_first_epoch(epoch: int, record: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(logdir=str(tmp_path), **TINY), on_epoch_end=kill_after_first_epoch)
    assert load_checkpoint_file(tmp_path / "last.pt")["epochs_done"] == 1
    resumed = train(TrainConfig(logdir=str(tmp_path), resume="last", **TINY))
    assert_same_run(uninterrupted.last_checkpoint, resumed.last_checkpoint)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_sigkill_inside_an_epoch_then_resume_reaches_the_same_weights(tmp_path: Path, uninterrupted,
                                                                    capsys: pytest.CaptureFixture) -> None:
    # A checkpoint after every step; the kill comes after step 2 of epoch 2, before its checkpoint: the resume
    # starts from step 1 and computes step 2 again.
    cmd = [sys.executable, str(REPO / "tests" / "train_and_kill.py"), "2", "2",
           *tiny_args(tmp_path, "--save-every-min", str(EVERY_STEP))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    blob = load_checkpoint_file(tmp_path / "last.pt")
    assert blob["epochs_done"] == 1 and blob["in_epoch"]["epoch"] == 2 and blob["in_epoch"]["steps"] == 1
    assert (tmp_path / ".lock").read_text().startswith("pid ")  # the dead run's lock file does not block
    resumed = train(TrainConfig(logdir=str(tmp_path), resume="last", save_every_min=EVERY_STEP, **TINY))
    assert f"resuming {tmp_path / 'last.pt'} (epoch 2/2, step 1/3)" in capsys.readouterr().out
    assert_same_run(uninterrupted.last_checkpoint, resumed.last_checkpoint)


def test_two_process_gloo_sigkill_inside_an_epoch_then_resume(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    flags = ["--img-size", "64", "--bsz", "1", "--epochs", "2", "--episodes-per-epoch", "6", "--val-episodes", "3",
             "--test-episodes", "5", "--attn-impl", "sdpa", "--threads", "1", "--no-progress"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # 6 episodes over 2 ranks, 1 per step: 3 steps an epoch; a checkpoint after every step but the reference's;
    # killed after step 2 of epoch 2, on both ranks.
    first = subprocess.run([*torchrun, str(REPO / "tests" / "train_and_kill.py"), "2", "2", "--reference",
                            str(reference), *flags, "--save-every-min", str(EVERY_STEP), "--logdir", str(killed)],
                           env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert first.returncode != 0 and "the run ended before" not in first.stderr, first.stderr[-3000:]
    blob = load_checkpoint_file(killed / "last.pt")
    assert blob["in_epoch"]["epoch"] == 2 and blob["in_epoch"]["steps"] == 1
    assert len(blob["rng"]) == 2 and len(blob["in_epoch"]["metric"]) == 2  # every rank's streams and counts
    second = subprocess.run([*torchrun, str(REPO / "train" / "run.py"), *flags, "--logdir", str(killed), "--resume"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("best checkpoint:") == 1  # only rank 0 reports
    assert_same_run(reference / "last.pt", killed / "last.pt")
    assert json.loads((killed / "config.json").read_text())["world_size"] == 2
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 2
    # The test episodes were split over the two ranks and the counts summed: same as one process.
    ddp = json.loads((killed / "test.json").read_text())
    single = evaluate_checkpoint(killed / "best.pt", episodes=5, img_size=64, attn_impl="sdpa", progress=False)
    assert ddp["miou"] == pytest.approx(single["miou"], abs=1e-9)
    assert ddp["fb_iou"] == pytest.approx(single["fb_iou"], abs=1e-9)


def test_corrupt_last_checkpoint_resumes_from_the_previous_one(tmp_path: Path, uninterrupted,
                                                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(Killed):
        train(TrainConfig(logdir=str(tmp_path), save_every_min=EVERY_STEP, **TINY), on_step_end=kill_at(2, 2))
    last, previous = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    assert load_checkpoint_file(previous)["epochs_done"] == 1 and "in_epoch" not in load_checkpoint_file(previous)
    last.write_bytes(last.read_bytes()[:100_000])  # a copy that did not finish
    resumed = train(TrainConfig(logdir=str(tmp_path), resume="last", **TINY))
    out = capsys.readouterr().out
    assert f"note: checkpoint '{last}' is truncated or corrupt" in out
    assert f"resuming from the checkpoint before it, {previous}" in out
    assert f"resuming {previous} (the end of epoch 1/2)" in out
    assert_same_run(uninterrupted.last_checkpoint, resumed.last_checkpoint)
    assert load_checkpoint_file(previous)["epochs_done"] == 1  # the truncated file was not kept in its place


def test_a_kill_between_the_epoch_end_writes_keeps_best_pt_and_last_pt_agreeing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation scores 30, 50, 40: epoch 2 is the best. The kill comes between epoch 2's two checkpoint writes
    # (the 4th write; no save inside an epoch on shapes): the resumed run must end with a best.pt that is the
    # epoch its records call the best, although no epoch after the kill improves on it.
    import dcama.train as engine

    scores, real_save, writes = [30.0, 50.0, 40.0], engine.save_checkpoint, []
    monkeypatch.setattr(engine, "_validate", lambda run, epoch: {"miou": scores[epoch], "fb_iou": 0.0})

    def killed_at_the_fourth_write(path, *args, **kwargs):
        writes.append(Path(path).name)
        if len(writes) == 4:
            raise Killed
        real_save(path, *args, **kwargs)

    monkeypatch.setattr(engine, "save_checkpoint", killed_at_the_fourth_write)
    with pytest.raises(Killed):
        train(TrainConfig(logdir=str(tmp_path), **{**TINY, "epochs": 3}))
    resumed = train(TrainConfig(logdir=str(tmp_path), resume="last", **{**TINY, "epochs": 3}))
    assert resumed.best_epoch == 2 and resumed.best_val_miou == 50.0
    assert load_checkpoint_file(tmp_path / "best.pt")["epochs_done"] == 2
    assert load_checkpoint_file(tmp_path / "last.pt")["best_epoch"] == 2
    assert writes[2:4] == ["best.pt", "last.pt"]  # best.pt first: last.pt is the commit point


def test_resume_with_both_checkpoints_unreadable_says_so(tmp_path: Path, uninterrupted) -> None:
    for name in ("last.pt", "last.prev.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(checkpoint_module.CheckpointError, match=r"last.pt' is empty .*the checkpoint before it is "
                                                                r"unreadable too: .*last.prev.pt' is empty"):
        train(TrainConfig(logdir=str(tmp_path), resume="last", **TINY))


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture, load_cli) -> None:
    import dcama.train as engine

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(engine, "_validate", lambda run, epoch: {"miou": 50.0 - epoch, "fb_iou": 0.0})
    real_save, calls, kept = torch.save, [0], {}

    def disk_full_at_the_third_save(obj, f):  # epoch 1 writes best.pt and last.pt; epoch 2 (no better) last.pt
        calls[0] += "part" not in obj  # not backbone.pt, written once at the start
        if calls[0] == 3:
            kept["last"] = digest(tmp_path / "last.pt")
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full_at_the_third_save)
    rc = load_cli("train").main(tiny_args(tmp_path))
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines()[0] == (f"error: cannot write {tmp_path / 'last.pt'}: No space left on device; the run "
                                   f"stopped, the files written before are intact (last good checkpoint: "
                                   f"{tmp_path / 'last.pt'} (the end of epoch 1/2))")
    assert err.splitlines()[1].startswith("once it can be written, resume with: python train/run.py ")
    assert digest(tmp_path / "last.pt") == kept["last"] and not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint_file(tmp_path / "last.pt")["epochs_done"] == 1


def permissions_apply(folder: Path) -> bool:
    """Whether a read-only folder refuses this process a new file (root's, as a rule, does not)."""
    probe = folder / "read-only"
    probe.mkdir(mode=0o555)
    try:
        (probe / "file").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def unwritable_from_step_1(parent: Path, logdir: Path, read_only: bool):
    """A hook that makes `logdir` unwritable once the run is under way, past every check made at the start: a
    read-only folder (`read_only`: where permissions apply), else a file put where its parent folder was."""
    def hook(epoch: int, step: int) -> None:
        if (epoch, step) != (1, 1):
            return
        if read_only:
            logdir.chmod(0o555)
        else:
            parent.rename(parent.with_name("moved"))
            parent.write_text("")

    return hook


def test_cli_an_unwritable_run_folder_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture, load_cli) -> None:
    import dcama.train as engine

    cli, logdir, read_only = load_cli("train"), tmp_path / "parent" / "run", permissions_apply(tmp_path)
    real_train = engine.train
    monkeypatch.setattr(engine, "train", lambda cfg: real_train(cfg, on_step_end=unwritable_from_step_1(
        tmp_path / "parent", logdir, read_only)))
    try:
        rc = cli.main(tiny_args(logdir, "--save-every-min", str(EVERY_STEP)))
    finally:
        if logdir.is_dir():
            logdir.chmod(0o755)
    # The reason in the words every command uses for a failed write (flags.write_failure), not the system's.
    reason = f"no permission to write in {logdir}" if read_only else \
        f"{tmp_path / 'parent'} is a file, so nothing can be written under it"
    assert rc == 1
    assert capsys.readouterr().err == (f"error: cannot write {logdir / 'last.pt'}: {reason}; the run stopped, the "
                                       "files written before are intact (last good checkpoint: none was written "
                                       "yet)\n")


def test_cli_a_run_folder_that_cannot_be_made_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture, load_cli) -> None:
    # The folder's parent becomes a file after the checks at the start, before the run locks its folder.
    import dcama.train as engine

    real_setup, logdir = engine.setup_distributed, tmp_path / "parent" / "run"

    def setup_then_block():
        (tmp_path / "parent").write_text("")
        return real_setup()

    monkeypatch.setattr(engine, "setup_distributed", setup_then_block)
    rc = load_cli("train").main(tiny_args(logdir))
    assert rc == 1
    with pytest.raises(OutputError) as failed, writing(logdir / ".lock"):  # what eval/run.py would say
        open(logdir / ".lock", "a")
    assert capsys.readouterr().err == f"error: {failed.value}; the run did not start\n"
    assert str(failed.value) == f"cannot write {logdir / '.lock'}: {tmp_path / 'parent'} is a file, so nothing can " \
                                "be written under it"


def test_a_failed_tensorboard_write_stops_the_run_with_one_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    def disk_full(self) -> None:  # what the writer's thread met, raised in the training process
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SummaryWriter, "flush", disk_full)
    with pytest.raises(WriteError) as failed:
        train(TrainConfig(logdir=str(tmp_path), **TINY))
    assert str(failed.value) == (f"cannot write {tmp_path / 'tensorboard'}: No space left on device; the run stopped, "
                                 f"the files written before are intact (last good checkpoint: {tmp_path / 'last.pt'} "
                                 "(the end of epoch 1/2))")


def test_a_closed_stdout_is_not_taken_for_a_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class ClosedPipe:  # stdout piped into a command that has exited (`train/run.py | head -1`)
        def write(self, text: str) -> int:
            if text.startswith("epoch 1/2:"):
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    with pytest.raises(BrokenPipeError):  # not WriteError("cannot write .../tensorboard: Broken pipe")
        train(TrainConfig(logdir=str(tmp_path), **TINY))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_finishes_the_step_and_saves(tmp_path: Path, sig: signal.Signals,
                                                   capfd: pytest.CaptureFixture) -> None:
    def signal_twice_at_step_1(epoch: int, step: int) -> None:  # the second one as torchrun passes it on
        if (epoch, step) == (1, 1):
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    with pytest.raises(RunStopped) as stop:
        train(TrainConfig(logdir=str(tmp_path), **TINY), on_step_end=signal_twice_at_step_1)
    assert str(stop.value) == f"stopped by {sig.name} at epoch 1/2, step 1/3: saved {tmp_path / 'last.pt'}"
    notice = f"{sig.name}: finishing the current step (or validation), then saving last.pt and stopping"
    assert notice in capfd.readouterr().err
    blob = load_checkpoint_file(tmp_path / "last.pt")
    assert blob["in_epoch"]["epoch"] == 1 and blob["in_epoch"]["steps"] == 1
    assert signal.getsignal(sig) is before  # the handlers were restored


def test_a_second_signal_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "REPEAT_WINDOW_S", 0.1)

    def signal_twice(epoch: int, step: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as stop:
        train(TrainConfig(logdir=str(tmp_path), **TINY), on_step_end=signal_twice)
    assert stop.value.exit_status == 143 and stop.value.note == "no checkpoint was written"
    assert not (tmp_path / "last.pt").exists()


def test_cli_sigterm_to_a_subprocess_saves_and_prints_the_resume_command(tmp_path: Path, load_cli) -> None:
    # With a DataLoader worker, and the signal sent to the whole process group, as SLURM and a terminal do.
    cmd = [sys.executable, str(REPO / "train" / "run.py"),
           *tiny_args(tmp_path, "--epochs", "1", "--bsz", "1", "--episodes-per-epoch", "30", "--workers", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    first = proc.stdout.readline()
    assert first == f"run folder: {tmp_path}\n", first + proc.stderr.read()
    time.sleep(0.5)  # the worker has started
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out + err
    steps = load_checkpoint_file(tmp_path / "last.pt")["in_epoch"]["steps"]
    assert 1 <= steps < 30
    stopped, resume = out.splitlines()
    assert stopped == f"stopped by SIGTERM at epoch 1/1, step {steps}/30: saved {tmp_path / 'last.pt'}"
    assert err.startswith("SIGTERM: finishing the current step (or validation), then saving last.pt and stopping")
    argv = shlex.split(resume.removeprefix("resume with: "))
    assert argv[:2] == ["python", "train/run.py"] and argv.count("--resume") == argv.count("--logdir") == 1
    assert argv[argv.index("--logdir") + 1] == str(tmp_path) and argv[argv.index("--resume") + 1].startswith("--")
    assert load_cli("train").main(argv[2:]) == 0
    blob = load_checkpoint_file(tmp_path / "last.pt")
    assert blob["epochs_done"] == 1 and "in_epoch" not in blob and blob["history"][0]["steps"] == 30


def run_with_pauses(logdir: Path, pauses: list[tuple[str, signal.Signals]], *flags: str
                    ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """train/run.py in its own process (tests/train_with_pauses.py) with a SIGTERM once it has started, then
    each signal of `pauses` sent while the run is paused at its point: real signals, more than REPEAT_WINDOW_S
    apart (so none counts as a launcher's repeat). Returns the finished process and its stdout lines."""
    names = ",".join(name for name, _ in pauses)
    cmd = [sys.executable, str(REPO / "tests" / "train_with_pauses.py"), names, *tiny_args(logdir, *flags)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = proc.stdout.readline()
    assert first == f"run folder: {logdir}\n", first + proc.stderr.read()
    stderr, sent = [], None
    for pause, sig in pauses:
        if sent is None and pause != "validation":
            time.sleep(0.5)  # inside the first epoch
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
        stderr.append(proc.stderr.readline())
        while stderr[-1] and not stderr[-1].startswith("paused: "):
            stderr.append(proc.stderr.readline())
        assert stderr[-1] == f"paused: {pause}\n", "".join(stderr) + proc.stderr.read()
        time.sleep(max(0.0, (sent or 0.0) + runtime.REPEAT_WINDOW_S + 0.2 - time.monotonic()))
        proc.send_signal(sig)
        sent = time.monotonic()
    out, err = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(stderr) + err)
    return done, [first.rstrip("\n"), *out.splitlines()]


def test_cli_a_signal_after_the_stop_is_saved_keeps_exit_status_75(tmp_path: Path) -> None:
    # One signal while train() ends after the save, one after it returned, while train/run.py reports the stop.
    done, out = run_with_pauses(tmp_path, [("train() is ending", signal.SIGTERM),
                                           ("train/run.py reports the stop", signal.SIGUSR1)],
                                "--epochs", "1", "--bsz", "1", "--episodes-per-epoch", "30")
    assert done.returncode == 75, done.stderr
    _, stopped, resume = out
    assert stopped.startswith("stopped by SIGTERM at epoch 1/1, step ") and resume.startswith("resume with: ")
    assert "in_epoch" in load_checkpoint_file(tmp_path / "last.pt")


def test_cli_a_signal_after_the_epoch_end_save_keeps_exit_status_75(tmp_path: Path) -> None:
    # The stop asked for during validation is saved by the epoch's last.pt; a second signal while the epoch's
    # bookkeeping is still going on (metrics.jsonl not written yet) changes nothing: 75, and every file written.
    done, out = run_with_pauses(tmp_path, [("validation", signal.SIGTERM), ("metrics.jsonl", signal.SIGINT)],
                                "--epochs", "1")
    assert done.returncode == 75, done.stderr
    _, summary, stopped, resume = out
    assert summary.startswith("epoch 1/1: loss ") and resume.startswith("resume with: ")
    assert stopped == f"stopped by SIGTERM at the end of epoch 1/1: saved {tmp_path / 'last.pt'}"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1] and records[0]["best_epoch"] == 1
    assert load_checkpoint_file(tmp_path / "best.pt")["epochs_done"] == 1
    assert load_checkpoint_file(tmp_path / "last.pt")["epochs_done"] == 1


def test_cli_resume_command_names_the_folder_and_this_starts_options(monkeypatch: pytest.MonkeyPatch,
                                                                      load_cli) -> None:
    # The settings are in the checkpoint: the command gives the run folder and the options of a start only.
    cli = load_cli("train")
    cfg = cli.parse_args(["--episodes-per-epoch", "30", "--img-size", "64", "--fg-weight", "2", "--no-progress",
                          "--resume", "my runs/a/last.pt"])
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # two nodes
    lead, command = cli.resume_hint(cfg, Path("my runs/a")).split(": ", 1)
    assert lead == "resume with (on each node, with its torchrun options as in this run)"
    argv = shlex.split(command)
    assert argv[:4] == ["torchrun", "--nproc_per_node", "4", os.path.relpath(REPO / "train" / "run.py")]
    assert cli.parse_args(argv[4:]) == TrainConfig(logdir="my runs/a", resume="last", progress=False)


def test_cli_maps_a_second_signal_to_its_exit_status(monkeypatch: pytest.MonkeyPatch, capsys, load_cli) -> None:
    cli = load_cli("train")

    def interrupted(cfg: TrainConfig) -> None:
        raise Interrupted(signal.SIGINT, "runs/x/last.pt holds the last save")

    import dcama.train as engine

    monkeypatch.setattr(engine, "train", interrupted)
    assert cli.main([]) == 130
    assert capsys.readouterr().err == "stopped at once by SIGINT: runs/x/last.pt holds the last save\n"


def test_a_second_run_in_a_folder_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    load_cli) -> None:
    with folder_lock(tmp_path):  # as a live run holds it
        rc = load_cli("train").main(tiny_args(tmp_path))
    assert rc == 2
    assert capsys.readouterr().err == (f"error: --logdir {tmp_path} is in use by another run (pid {os.getpid()} on "
                                       f"{os.uname().nodename}): wait for it to end or choose another --logdir\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_resume_into_a_folder_in_use_is_refused_before_its_checkpoint_is_read(
        tmp_path: Path, uninterrupted, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        load_cli) -> None:
    import dcama.train as engine

    (tmp_path / "last.pt").write_bytes(uninterrupted.last_checkpoint.read_bytes())
    real_load, read = engine.load_checkpoint_file, []
    monkeypatch.setattr(engine, "load_checkpoint_file", lambda path: read.append(path) or real_load(path))
    with folder_lock(tmp_path):  # as a live run holds it
        rc = load_cli("train").main(tiny_args(tmp_path, "--resume"))
    assert rc == 2 and read == []
    assert capsys.readouterr().err == (f"error: --logdir {tmp_path} is in use by another run (pid {os.getpid()} on "
                                       f"{os.uname().nodename}): wait for it to end or choose another --logdir\n")


def test_cli_a_refused_resume_leaves_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   load_cli) -> None:
    # Refused once the run folder is locked (the checkpoint is read under the lock): the folders the run made
    # for it, holding nothing but the lock file, are removed.
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    rc = load_cli("train").main(tiny_args(tmp_path / "new" / "run", "--resume", str(empty)))
    assert rc == 2
    assert capsys.readouterr().err == f"error: checkpoint '{empty}' is empty (a write or a copy that did not finish)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt"]


def test_cli_resume_of_a_folder_names_its_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      load_cli) -> None:
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "best.pt").write_bytes(b"")
    assert exit_status(load_cli("train").main, tiny_args(tmp_path / "run", "--resume", str(tmp_path))) == 2
    assert capsys.readouterr().err == f"error: --resume {tmp_path}: is a folder, not a file; it holds best.pt, " \
                                      "last.pt: pass one of them\n"


def test_an_unwritable_default_run_folder_is_refused_before_anything_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, load_cli) -> None:
    import dcama.train as engine

    def no_build(*args):
        raise AssertionError("built before the run folder was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine, "_build", no_build)
    (tmp_path / "logs").write_text("")  # where the default run folder would go
    tiny = {k: v for k, v in TINY.items() if k != "logdir"}
    with pytest.raises(ConfigError, match=rf"^--logdir logs/shapes-fold0-resnet18-1shot-\d{{8}}-\d{{6}}: "
                                          rf"{tmp_path / 'logs'} is a file, so nothing can be written under it$"):
        train(TrainConfig(**tiny))
    argv = tiny_args(tmp_path)
    del argv[argv.index("--logdir"):argv.index("--logdir") + 2]
    assert exit_status(load_cli("train").main, argv) == 2
    assert capsys.readouterr().err.endswith(f"{tmp_path / 'logs'} is a file, so nothing can be written under it\n")


def test_resume_refuses_other_settings_naming_them_as_flags(tmp_path: Path, uninterrupted) -> None:
    (tmp_path / "last.pt").write_bytes(uninterrupted.last_checkpoint.read_bytes())
    with pytest.raises(ConfigError) as refused:
        train(TrainConfig(logdir=str(tmp_path), resume="last", **{**TINY, "episodes_per_epoch": 4, "fg_weight": 2.0}))
    assert str(refused.value) == (f"--fg-weight 2.0, --episodes-per-epoch 4: {tmp_path / 'last.pt'} was started with "
                                  "--fg-weight 4.0, --episodes-per-epoch 6, which a resumed run keeps (to change them, "
                                  "start a new run in another --logdir)")


def test_cli_a_resume_keeps_the_runs_settings_and_applies_the_changes_it_may_make(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, load_cli) -> None:
    monkeypatch.chdir(REPO)
    cli = load_cli("train")
    assert cli.main(tiny_args(tmp_path, "--epochs", "1", "--test-episodes", "2")) == 0
    first_config, backbone_file = digest(tmp_path / "config.json"), (tmp_path / "backbone.pt").stat().st_ino
    capsys.readouterr()
    # Only the folder and the changes: the shapes defaults (96 px, batch 8, ...) must not replace the run's own.
    assert cli.main(["--logdir", str(tmp_path), "--resume", "--epochs", "2", "--test-episodes", "0"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "resuming with changed settings: --epochs: 1 -> 2; --test-episodes: 2 -> 0"
    assert "epoch 2/2: loss" in out
    assert f"results in {tmp_path}: backbone.pt, best.pt, config.2.json, config.json, last.prev.pt, last.pt, " \
           "metrics.jsonl, tensorboard/, test.json (an earlier start's test)" in out
    assert "--benchmark shapes --fold 0 --nshot 1" in out.splitlines()[-1]
    assert digest(tmp_path / "config.json") == first_config  # every start's settings kept
    second = json.loads((tmp_path / "config.2.json").read_text())
    assert {k: second["train"][k] for k in ("img_size", "bsz", "epochs", "test_episodes", "attn_impl")} == \
        {"img_size": 64, "bsz": 2, "epochs": 2, "test_episodes": 0, "attn_impl": "sdpa"}
    assert second["start"] == {"resumed_from": str(tmp_path / "last.pt"),
                               "changed": {"epochs": [1, 2], "test_episodes": [2, 0]}}
    assert (tmp_path / "backbone.pt").stat().st_ino == backbone_file  # the frozen backbone written once
    # Refused in one line: what the steps compute, and fewer epochs than done.
    assert cli.main(["--logdir", str(tmp_path), "--resume", "--img-size", "96", "--lr", "0.01"]) == 2
    assert capsys.readouterr().err == (f"error: --img-size 96, --lr 0.01: {tmp_path / 'last.pt'} was started with "
                                       "--img-size 64, --lr 0.001, which a resumed run keeps (to change them, start "
                                       "a new run in another --logdir)\n")
    assert cli.main(["--logdir", str(tmp_path), "--resume", "--epochs", "1"]) == 2
    assert capsys.readouterr().err == f"error: --epochs 1: {tmp_path / 'last.pt'} has done 2 epochs already\n"


def test_checkpoints_hold_the_frozen_backbone_once_per_run(tmp_path: Path, uninterrupted) -> None:
    run = uninterrupted.logdir
    last, previous, best = (load_checkpoint_file(run / name) for name in ("last.pt", "last.prev.pt", "best.pt"))
    frozen = lambda blob: [k for k in blob["state_dict"] if k.startswith("backbone.")]  # noqa: E731
    assert frozen(last) == frozen(previous) == [] and last["backbone_file"]["name"] == "backbone.pt"
    assert frozen(best) and "backbone_file" not in best  # best.pt holds the whole model, to evaluate or publish
    assert not {"optimizer", "rng"} & set(best) and {"optimizer", "rng"} <= set(last)
    assert not [k for blob in (last, best) for k in blob["state_dict"] if ".pe." in k]  # computed, never stored
    # Evaluation reads last.pt with the run folder's backbone.pt, which must be the one it was saved with.
    model = DCAMA.from_checkpoint(run / "last.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, (best if key.startswith("backbone.") else last)["state_dict"][key]), key
    (tmp_path / "last.pt").write_bytes((run / "last.pt").read_bytes())
    with pytest.raises(checkpoint_module.CheckpointError, match=r"last.pt' holds the trained head only; the frozen "
                                                                r"backbone it was saved with, .*backbone.pt', is not "
                                                                r"there \(copy a run folder whole"):
        DCAMA.from_checkpoint(tmp_path / "last.pt")


def test_resume_into_a_folder_whose_run_has_not_saved_yet_says_it_is_in_use(tmp_path: Path, capsys, load_cli) -> None:
    # Not "no such file (to start a new run leave out --resume)", which would then be refused as in use.
    with folder_lock(tmp_path):  # as a live run holds it, before its first save
        rc = load_cli("train").main(tiny_args(tmp_path, "--resume"))
    assert rc == 2
    assert capsys.readouterr().err == (f"error: --logdir {tmp_path} is in use by another run (pid {os.getpid()} on "
                                       f"{os.uname().nodename}): wait for it to end or choose another --logdir\n")


def test_resume_checks_backbone_and_logdir_clash(tmp_path: Path, uninterrupted) -> None:
    with pytest.raises(ConfigError, match=r"^--backbone resnet34: .*last.pt was started with --backbone resnet18, "
                                          r"which a resumed run keeps"):
        train(TrainConfig(resume=str(uninterrupted.last_checkpoint), logdir=str(tmp_path), backbone="resnet34",
                          **TINY))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig(logdir=str(uninterrupted.logdir), **TINY))
    weights_only, old = tmp_path / "weights" / "w.pt", tmp_path / "old" / "last.pt"
    blob = load_checkpoint_file(uninterrupted.last_checkpoint)
    save_checkpoint(weights_only, DCAMA("resnet18", attn_impl="sdpa"))
    save_checkpoint(old, DCAMA("resnet18", attn_impl="sdpa"), extra={"epoch": 0, "optimizer": blob["optimizer"]})
    with pytest.raises(ConfigError, match=r"w.pt: it holds weights only \(no optimiser state or progress\)"):
        train(TrainConfig(resume=str(weights_only), **TINY))
    with pytest.raises(ConfigError, match=r"old/last.pt: it was written by an earlier version of this code"):
        train(TrainConfig(resume=str(old), **TINY))
    (tmp_path / "elsewhere.pt").write_bytes(b"")  # not read: the clash is found first
    with pytest.raises(ConfigError, match="already holds a run .*would continue into it"):
        train(TrainConfig(logdir=str(uninterrupted.logdir), resume=str(tmp_path / "elsewhere.pt"), **TINY))


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dcama.train as engine

    real_loss, calls, kept = engine.segmentation_loss, [0], {}

    def loss_nan_in_second_epoch(logits: torch.Tensor, target: torch.Tensor, fg_weight: float) -> torch.Tensor:
        calls[0] += 1
        loss = real_loss(logits, target, fg_weight)
        return loss * float("nan") if calls[0] > 3 else loss  # 3 steps per epoch: epoch 2, step 1

    def remember(epoch: int, record: dict) -> None:
        kept["last"] = digest(tmp_path / "last.pt")

    monkeypatch.setattr(engine, "segmentation_loss", loss_nan_in_second_epoch)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 1; .*last good checkpoint is "
                                                 r".*last.pt \(the end of epoch 1/2\)"):
        train(TrainConfig(logdir=str(tmp_path), **TINY), on_epoch_end=remember)
    assert digest(tmp_path / "last.pt") == kept["last"]
    assert load_checkpoint_file(tmp_path / "last.pt")["epochs_done"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_diverging_lr_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    rc = load_cli("train").main(tiny_args(tmp_path, "--optimizer", "sgd", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "error:" in err and "at epoch 1" in err and "Traceback" not in err


def test_cli_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture, load_cli) -> None:
    rc = load_cli("train").main(["--benchmark", "fss", "--datapath", str(tmp_path), "--logdir",
                                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: FSS-1000 folder not found") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


BAD_FLAGS = [
    (["--fold", "7"], "--fold 7: shapes has folds 0..3"),
    (["--fold", "-1"], "--fold -1: must be an integer >= 0"),
    (["--benchmark", "fss", "--datapath", "{tmp}", "--fold", "1"], "--fold 1: fss has no folds (only --fold 0)"),
    (["--benchmark", "folder", "--datapath", "{tmp}", "--fold", "3"], "--fold 3: folder has no folds (only --fold 0)"),
    (["--nshot", "0"], "--nshot 0: must be an integer >= 1"),
    (["--benchmark", "fss", "--datapath", "{tmp}", "--nshot", "10"],
     "--nshot 10: fss allows 1..9 (each class has 10 images and one is the query)"),
    (["--nshot", "1000"], "--nshot 1000: shapes allows 1..999 (each class has 1000 images and one is the query)"),
    (["--benchmark", "coco"], "--datapath is needed for --benchmark coco (the folder that holds its data)"),
    (["--benchmark", "pascal", "--datapath", "{tmp}/nowhere"], "--datapath {tmp}/nowhere: no such folder"),
    (["--img-size", "50"], "--img-size 50: resnet18 takes a side that is a positive multiple of 32 (its total "
                           "stride): 32, 64, 96, ..."),
    (["--backbone", "swin_b", "--img-size", "128"], "--img-size 128: swin_b takes a side that is a multiple of 32 "
     "whose stage grids (side/4 to side/32) are multiples of its 12-token window or at most 12: 32, 96, 192, 384, "
     "768, ..."),
    (["--backbone", "vgg16"], "--backbone vgg16: choose from swin_b, resnet50, resnet101, resnet18, resnet34"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "-0.001"], "--lr -0.001: must be a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--fg-weight", "inf"], "--fg-weight inf: must be a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be a finite number >= 0"),
    (["--momentum", "1"], "--momentum 1.0: must be a number in [0, 1)"),
    (["--save-every-min", "nan"], "--save-every-min nan: must be a finite number >= 0"),
    (["--epochs", "0"], "--epochs 0: must be an integer >= 1"),
    (["--bsz", "0"], "--bsz 0: must be an integer >= 1"),
    (["--episodes-per-epoch", "0"], "--episodes-per-epoch 0: must be an integer >= 1"),
    (["--val-episodes", "0"], "--val-episodes 0: must be an integer >= 1"),
    (["--test-episodes", "-1"], "--test-episodes -1: must be an integer >= 0"),
    (["--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["--workers", "-2"], "--workers -2: must be an integer >= 0"),
    (["--backbone-weights", "{tmp}/r18.pth"], "--backbone-weights {tmp}/r18.pth: no such file"),
    (["--resume"], "--resume {tmp}/run/last.pt: no such file (to start a new run leave out --resume)"),
    (["--fold", "x"], "argument --fold: invalid int value: 'x' (--help lists the flags)"),
    (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8' (choose from 'off', 'bf16', 'fp16') (--help lists "
                       "the flags)"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_cli_bad_flag_is_one_line_naming_it(tmp_path: Path, argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture, load_cli) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert exit_status(load_cli("train").main, [*argv, "--logdir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: {message.replace('{tmp}', str(tmp_path))}\n"
    assert not (tmp_path / "run").exists()  # nothing written


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


class Built(Exception):
    """Raised in place of the model: the data sets are built, nothing more is needed."""


@pytest.mark.parametrize("benchmark, noted", [("folder", True), ("shapes", False)])
def test_an_episodes_per_epoch_the_benchmark_ignores_is_a_note(benchmark: str, noted: bool, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    import dcama.train as engine

    def no_model(*args, **kwargs):
        raise Built

    root = None
    if benchmark == "folder":
        root = str(tmp_path / "folder")
        export_folder(root, images_per_class=3, img_size=32)
    monkeypatch.setattr(engine, "DCAMA", no_model)
    with pytest.raises(Built):
        train(TrainConfig(**{**TINY, "benchmark": benchmark, "datapath": root, "backbone": "resnet18",
                             "logdir": str(tmp_path / "run")}))
    note = "note: --episodes-per-epoch 6 is not used: folder episodes are every image of the split once"
    assert (note in capsys.readouterr().out) == noted
