"""Atomic file writes: checkpoints, caches, logs and results are never left half-written by a crash."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is flushed to disk and renamed over
    `path` (readers see the old or the new file, never a partial one); on any error it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """JSON written atomically; values JSON does not know (paths, dtypes) are written as strings."""
    with atomic_open(path, "w") as f:
        f.write(json.dumps(payload, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """One JSON object per line, the whole file written atomically."""
    with atomic_open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
