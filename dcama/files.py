"""Atomic file writes (checkpoints, caches, logs and results are never left half-written by a crash), the
lock that keeps two runs out of one run folder, and the torch files a folder holds (named when a folder is
given for a file)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any

__all__ = ["FolderInUseError", "atomic_open", "folder_holder", "folder_lock", "folder_not_file", "torch_files_in",
           "write_json", "write_jsonl"]

LOCK_NAME = ".lock"
TORCH_SUFFIXES = (".pt", ".pth")


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock; `holder` names it (pid and host)."""

    def __init__(self, folder: str, holder: str) -> None:
        super().__init__(f"{folder} is in use by {holder}")
        self.holder = holder


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", previous: str | os.PathLike | None = None
                ) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is flushed to disk and renamed over
    `path` (readers see the old or the new file, never a partial one); on any error it is removed and `path`
    is left as it was.

    The file gets the mode any new file of this process gets (0666 less the umask). With `previous`, an
    existing `path` is first renamed to `previous`, so the file before this one survives too.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    # os.open applies the umask; tempfile.mkstemp would create the file 0600 and the rename would keep that.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)  # the renames themselves survive a power cut


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some network file systems refuse fsync on a folder; the data itself is on disk
        pass


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """JSON written atomically; values JSON does not know (paths, dtypes) are written as strings."""
    with atomic_open(path, "w") as f:
        f.write(json.dumps(payload, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """One JSON object per line, the whole file written atomically."""
    with atomic_open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def torch_files_in(folder: str | os.PathLike) -> list[str]:
    """The names of the .pt/.pth files in a folder, sorted (what to suggest when a folder is passed as a file)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(TORCH_SUFFIXES))


def folder_not_file(folder: str | os.PathLike) -> str:
    """What is said of a folder given where a torch file is expected (the message's end, after its name):
    the .pt/.pth files in it, to pass one of them."""
    found = torch_files_in(folder)
    if found:
        return f"is a folder, not a file; it holds {', '.join(found)}: pass one of them"
    return "is a folder, not a file; it holds no .pt or .pth file"


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (made if missing) for the block; FolderInUseError if a live
    process holds it; the OSError of a folder that cannot be made or written (the caller names the path).

    The lock is an flock on `<folder>/.lock`, which the kernel drops when its holder exits, however it exits:
    a run killed with SIGKILL leaves the file but no lock, so the next run (a resume) takes it. The file holds
    the holder's pid and host for the message. On a file system without flock support the block runs unlocked.

    The folders it made (`folder` and any missing parents) are removed at the end when they hold nothing but
    the lock file: a run refused before it wrote anything leaves no half-made run folder behind.
    """
    folder = os.fspath(folder)
    made = _missing_folders(folder)
    path = os.path.join(folder, LOCK_NAME)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise FolderInUseError(folder, f.read().strip() or "another process") from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                warnings.warn(f"{folder}: this file system does not support locks, so a second run started in "
                              "this folder would not be refused", stacklevel=3)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            try:
                yield
            finally:
                with suppress(OSError):  # clearing the holder's line is cosmetic: the lock goes with the file
                    f.seek(0)
                    f.truncate()
                with suppress(OSError):  # a folder that is left is untidy, not wrong
                    if made and os.listdir(folder) == [LOCK_NAME]:
                        os.unlink(path)  # while locked: a run that opened the file already is refused, not let in
    finally:
        for made_folder in made:
            with suppress(OSError):  # not empty: something was written there (or another run came in)
                os.rmdir(made_folder)


def folder_holder(folder: str | os.PathLike) -> str | None:
    """Who holds `folder`'s lock (`folder_lock`: its pid and host), None when no live process does. It only
    looks: nothing is made or locked, so a command can refuse a folder in use before it does anything."""
    try:
        f = open(os.path.join(folder, LOCK_NAME))
    except OSError:  # no lock file, or one this process cannot read: the lock itself will tell
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        except OSError:  # a file system without locks
            return None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _missing_folders(folder: str) -> list[str]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing, current = [], os.path.abspath(folder)
    while not os.path.lexists(current):
        missing.append(current)
        current = os.path.dirname(current)
    return missing
