"""Atomic writes (dcama/files.py): the old file or the new one, never a partial one, never a stray temp; the
mode the umask gives; the file before kept on request; the run folder's lock."""

import errno
import json
import os
import subprocess
import sys

import pytest

from dcama.files import FolderInUseError, atomic_open, folder_lock, write_json, write_jsonl


def test_atomic_open_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with atomic_open(tmp_path / "new" / "out.txt", "w") as f:  # parent folders made
        f.write("new")
    assert (tmp_path / "new" / "out.txt").read_text() == "new"


def test_json_and_jsonl(tmp_path):
    write_json(tmp_path / "a.json", {"path": tmp_path, "x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"path": str(tmp_path), "x": 1}
    write_jsonl(tmp_path / "m.jsonl", [{"epoch": 0}, {"epoch": 1}])
    assert [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [{"epoch": 0},
                                                                                             {"epoch": 1}]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_mode_of_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_open(tmp_path / "b.bin") as f:
            f.write(b"x")
    finally:
        os.umask(before)
    for name in ("a.json", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_previous_keeps_the_file_before(tmp_path):
    path, previous = tmp_path / "last.txt", tmp_path / "last.prev.txt"
    for text in ("one", "two"):
        with atomic_open(path, "w", previous=previous) as f:
            f.write(text)
    with pytest.raises(OSError), atomic_open(path, "w", previous=previous) as f:
        f.write("three, cut short")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "two" and previous.read_text() == "one"  # a failed write moves nothing
    assert sorted(os.listdir(tmp_path)) == ["last.prev.txt", "last.txt"]


HOLD_LOCK = ("import sys, time\nfrom dcama.files import folder_lock\nwith folder_lock(sys.argv[1]):\n"
             "    print('locked', flush=True)\n    time.sleep(60)\n")


def test_folder_lock_refuses_a_live_holder_and_not_a_killed_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderInUseError, match=rf"^{tmp_path} is in use by pid {holder.pid} on "):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays
        holder.wait()
    assert (tmp_path / ".lock").read_text().startswith(f"pid {holder.pid} ")
    with folder_lock(tmp_path):  # the kernel dropped the dead holder's lock
        assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(FolderInUseError):  # another open of the file conflicts, even in this process
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):  # released at the end of the block
        pass


def test_folder_lock_removes_the_folders_it_made_when_nothing_else_was_written(tmp_path):
    with folder_lock(tmp_path / "new" / "run"):  # refused before anything was written: no trace left
        assert (tmp_path / "new" / "run" / ".lock").is_file()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "new" / "run"):  # however the block ends
        raise RuntimeError("refused")
    assert os.listdir(tmp_path) == []
    with folder_lock(tmp_path / "new" / "run"):  # a run that wrote something keeps its folder and lock file
        (tmp_path / "new" / "run" / "config.json").write_text("{}")
    assert sorted(os.listdir(tmp_path / "new" / "run")) == [".lock", "config.json"]
    with folder_lock(tmp_path):  # a folder that was there before is left as it was, with the lock file
        pass
    assert sorted(os.listdir(tmp_path)) == [".lock", "new"]
