"""The checks dcama/flags.py shares between the command lines: output paths (train/run.py --logdir, eval/run.py
--json and --visualize, eval/predict.py --out), the device and --threads, each a one-line error with status 2
before anything is loaded or written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcama.flags import ConfigError, check_output
from dcama.runtime import check_device
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
        with pytest.raises(ConfigError, match=f"^--device {bad}: choose cpu, cuda or cuda:N$"):
            check_device(bad)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        with pytest.raises(ConfigError, match=f"^--device cuda:{count}: this machine has {count} CUDA device"):
            check_device(f"cuda:{count}")
    else:
        with pytest.raises(ConfigError, match="^--device cuda:1: this machine has no CUDA device"):
            check_device("cuda:1")


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
