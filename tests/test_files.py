"""Atomic writes (dcama/files.py): the old file or the new one, never a partial one, never a stray temp."""

import json
import os

import pytest

from dcama.files import atomic_open, write_json, write_jsonl


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
