"""The checks dcama/flags.py shares between the command lines: output paths (train/run.py --logdir, eval/run.py
--json and --visualize, eval/predict.py --out), the device and --threads, each a one-line error with status 2
before anything is loaded or written."""

import errno
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcama.config import CPU_THREADS
from dcama.evaluate import evaluate_checkpoint
from dcama.flags import ConfigError, check_output, error_line, write_failure
from dcama.predict import predict_files
from dcama.runtime import check_device
from dcama.settings import TrainConfig, fill_defaults
from helpers import exit_status

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a regular file\n")
    return path


@pytest.mark.parametrize("case, expected", [
    ("file", "--logdir {file}: is a file, not a folder"),
    ("under-file", "--logdir {file}/run: {file} is a file, so nothing can be written under it"),
    ("deep-under-file", "--logdir {file}/a/b/run: {file} is a file, so nothing can be written under it"),
])
def test_train_logdir_is_checked_before_anything_is_built(case, expected, a_file, capsys, load_cli):
    logdir = {"file": a_file, "under-file": a_file / "run", "deep-under-file": a_file / "a" / "b" / "run"}[case]
    assert exit_status(load_cli("train").main, ["--logdir", str(logdir), "--no-progress"]) == 2
    assert capsys.readouterr().err == "error: " + expected.replace("{file}", str(a_file)) + "\n"


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty file system mounted read-only (a tmpfs; skipped where this process may not mount one)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True, text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip() if mounted else 'no mount'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_file_system_is_named_as_such(read_only_folder, capsys, load_cli):
    """Not "no permission": no permission would help (as root, too, where access() refuses it all the same)."""
    reason = f"{read_only_folder} is on a read-only file system"
    assert exit_status(load_cli("train").main, ["--logdir", str(read_only_folder / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: --logdir {read_only_folder}/run: {reason}\n"
    failure = OSError(errno.EROFS, os.strerror(errno.EROFS))  # what a write raises there, e.g. at a run's save
    assert write_failure(read_only_folder / "last.pt", failure) == f"cannot write {read_only_folder}/last.pt: {reason}"


def test_an_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a folder's mode does not stop this process writing in it")
        for name, folder in (("logdir", True), ("json", False)):
            with pytest.raises(ConfigError, match=f"^--{name} {locked}/x: no permission to write in {locked}$"):
                check_output(name, str(locked / "x"), folder=folder)
    finally:
        locked.chmod(0o700)


def test_outputs_that_can_be_written_pass(tmp_path, a_file):
    check_output("json", str(a_file), folder=False)  # an existing file is replaced
    check_output("json", str(tmp_path / "new" / "deeper" / "r.json"), folder=False)  # folders are made
    check_output("visualize", str(tmp_path), folder=True)
    check_output("out", None, folder=True)
    with pytest.raises(ConfigError, match="is a folder; give a file name"):
        check_output("json", str(tmp_path), folder=False)


def test_devices():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("bogus", "mps", "cuda:x"):
        with pytest.raises(ConfigError, match=f"^device='{bad}': choose cpu, cuda or cuda:N$") as err:
            check_device(bad)
        assert error_line(err.value) == f"--device {bad}: choose cpu, cuda or cuda:N"  # what a command prints
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        with pytest.raises(ConfigError, match=f"^device='cuda:{count}': this machine has {count} CUDA device"):
            check_device(torch.device("cuda", count))
    else:
        with pytest.raises(ConfigError, match="^device='cuda:1': this machine has no CUDA device") as err:
            check_device(torch.device("cuda", 1))
        assert str(err.value).endswith("(torch sees none); use device='cpu'")
        assert error_line(err.value).endswith("(torch sees none); use --device cpu")


def test_threads_is_one_flag_for_every_command(load_cli):
    for script in ("train/run.py", "eval/run.py", "eval/predict.py"):
        text = (REPO / script).read_text()
        assert "add_threads(" in text and '"--threads"' not in text, script  # FlagParser.add_threads defines it
    assert load_cli("eval").parse_args(["--checkpoint", "c", "--threads", "3"]).threads == 3


# What the command-line tests run in a fresh interpreter: the script as `python SCRIPT ARGV` would, then whether
# torch was imported.
NO_TORCH_PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit_:
    print("exit", exit_.code, "torch" in sys.modules)
"""


@pytest.mark.parametrize("script, argv, status, message", [
    ("train/run.py", ["--help"], 0, ""),
    ("train/run.py", ["--fold", "9"], 2, "error: --fold 9: shapes has folds 0..3"),
    ("train/run.py", ["--resume", "--logdir", "{tmp}"], 2, "error: --resume {tmp}/last.pt: no such file"),
    ("eval/run.py", ["--help"], 0, ""),
    ("eval/run.py", ["--checkpoint", "{tmp}/best.pt"], 2, "error: --checkpoint {tmp}/best.pt: no such file"),
    ("eval/predict.py", ["--help"], 0, ""),
    ("eval/predict.py", ["--checkpoint", "c.pt", "--support", "a", "b", "--query", "q", "--out", "o", "--bsz", "0"], 2,
     "error: --checkpoint c.pt: no such file"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_help_and_flag_errors_come_before_torch_is_imported(script, argv, status, message, tmp_path):
    # What makes them take a fraction of a second rather than the seconds torch and timm take to import.
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, str(REPO / script), *argv], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.stdout.splitlines()[-1] == f"exit {status} False", proc.stdout + proc.stderr
    assert proc.stderr.startswith(message.replace("{tmp}", str(tmp_path))), proc.stderr


def test_every_command_and_engine_defaults_to_the_one_thread_count(load_cli):
    """One CPU-thread policy: train, eval and predict, as commands and from Python, default to CPU_THREADS, so
    a command another prints runs at the first one's thread count (and gives its numbers)."""
    predict_argv = ["--checkpoint", "c", "--support", "i", "m", "--query", "q", "--out", "o"]
    commands = {"train": fill_defaults(load_cli("train").parse_args([])).threads,  # a new run's
                "eval": load_cli("eval").parse_args(["--checkpoint", "c"]).threads,
                "predict": load_cli("eval/predict.py").parse_args(predict_argv).threads}
    engines = {"train": fill_defaults(TrainConfig()).threads,
               "eval": inspect.signature(evaluate_checkpoint).parameters["threads"].default,
               "predict": inspect.signature(predict_files).parameters["threads"].default}
    assert commands == engines == dict.fromkeys(commands, CPU_THREADS)
    # train leaves it unset like its other flags, so a resume without --threads keeps the run's own count
    assert load_cli("train").parse_args(["--resume", "--logdir", "x"]).threads is None
