"""Where and how a run executes: the process group and what its ranks agree on, the device, CPU threads, the
samplers, autocast, batches moved to the device, every RNG's state, the signals that stop a run, and the
software versions a run records.

The engines (`dcama.evaluate`, `dcama.train`) build on it; it knows nothing of the model or the data sets.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import platform
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler
from tqdm import tqdm

from .config import ArgumentError

Batch = dict[str, Any]
# The autocast dtype of each --amp mode (dcama.config.AMP_MODES) but "off".
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------- processes
def dist_info() -> tuple[int, int]:
    """(rank, world size) of the current torch.distributed group, (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> tuple[int, int, torch.device, bool]:
    """Join the torchrun group if launched by torchrun; returns (rank, world, device, we_initialised_it)."""
    owned = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        owned = True
    rank, world = dist_info()
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    elif world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    return rank, world, device, owned


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true on every rank when it is true on any rank: how the ranks agree to save or stop. A
    collective (every rank must call it); no communication in a single process."""
    if dist_info()[1] == 1:
        return tuple(bool(f) for f in flags)
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    packed = torch.tensor([int(bool(f)) for f in flags], device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in packed.tolist())


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (index = rank). A collective: every rank must call it."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (for what only rank 0 can know: a folder's lock, a failed write).
    A collective: every rank must call it."""
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_device(device: str | torch.device | None) -> torch.device:
    """The device `device` (--device) names (None: CUDA when there is one, else the CPU), if this machine has
    it; an ArgumentError otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    name = str(device)  # a torch.device is named as the string that gives it
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ArgumentError("device", name, "choose cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.is_available() else 0
    if dev.type == "cuda" and count == 0:
        raise ArgumentError("device", name, "this machine has no CUDA device (torch sees none)", instead="cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        raise ArgumentError("device", name, f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return dev


@contextmanager
def cpu_threads(threads: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """The project's CPU-thread policy, which train, eval and predict all follow (config.CPU_THREADS is the
    default of each, --threads the flag of each): on a CPU device, torch.set_num_threads(threads) inside the
    block (None or 0: unchanged, torch's default); on a GPU nothing changes. The previous count is restored
    after the block, so a library call leaves the process as it found it. ValueError for a negative count."""
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be >= 0 (0 or None: torch's default), got {threads}")
    before = torch.get_num_threads()
    if threads and torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... in order: every episode is scored once (no padding duplicates)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(DistributedSampler):
    """A DistributedSampler that can begin an epoch part way: the first `start` indices of this rank's share
    are skipped, so a run resumed between two steps continues with the batch that came next."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


# ----------------------------------------------------------------------------------------------- tensors
def autocast_context(device: torch.device, amp: str) -> AbstractContextManager:
    """Autocast for --amp {off,bf16,fp16} on the device's type."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """Tensors of a collated batch onto `device`, with collate_episodes' per-item query masks (original image
    size) stacked back into one tensor: such batches hold one episode, or episodes of one size."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            v = torch.stack(v)
        out[k] = v.to(device, non_blocking=True) if torch.is_tensor(v) else v
    return out


# ---------------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA states only where CUDA is available)."""
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (index = rank), so that a resumed DDP run continues each rank's streams.
    A collective: every rank must call it."""
    return all_gather(rng_state())


# ------------------------------------------------------------------------------------------------ signals
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# A launcher that passes signals on delivers one twice within milliseconds (SLURM's SIGTERM, or a terminal's
# Ctrl-C, reaches every process and torchrun forwards it once more): repeats this close are one request.
REPEAT_WINDOW_S = 1.0


class Interrupted(BaseException):
    """A signal that stops the process at once: a second one while a stop is pending, or one outside the
    part of a run that can stop cleanly. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` swallows it."""

    def __init__(self, signum: int, note: str = "") -> None:
        super().__init__(signal.Signals(signum).name + (f": {note}" if note else ""))
        self.signum, self.note = signum, note

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 128 + its number."""
        return 128 + self.signum


class StopRequests:
    """SIGTERM, SIGINT and SIGUSR1 while the context is active (installed from the main thread only; the
    previous handlers come back at the end).

    Inside `deferred()` the first signal only records a request (`requested`: the signal's number), which the
    caller honours at a point where it can stop cleanly, and `notice` (formatted with {signal}) is written to
    stderr on a line of its own (below a progress bar being drawn); a second signal raises Interrupted. Outside
    it every signal raises Interrupted at once. A signal within REPEAT_WINDOW_S of the last one is the same
    signal passed on by a launcher, and is ignored.
    """

    def __init__(self, notice: str | None = None) -> None:
        self.notice = notice
        self.requested: int | None = None
        self._last = -float("inf")  # when the last signal that counted came (time.monotonic)
        self._defer = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextmanager
    def deferred(self) -> Iterator["StopRequests"]:
        self._defer = True
        try:
            yield self
        finally:
            self._defer = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if now - self._last < REPEAT_WINDOW_S:
            return  # the same signal once more, from a launcher that passes it on
        self._last = now
        if not self._defer or self.requested is not None:
            raise Interrupted(signum)
        self.requested = signum
        if self.notice:  # os.write: print() could be interrupted inside another print and refuse re-entry
            line = self.notice.format(signal=signal.Signals(signum).name) + "\n"
            os.write(2, (("\n" if progress_bar_drawn() else "") + line).encode())


def progress_bar_drawn() -> bool:
    """Whether a tqdm progress bar is on the screen, which leaves the cursor at the end of its own line: a message
    written then begins with a newline, so that it starts a line of its own. (tqdm keeps its live bars in
    `tqdm._instances`; a disabled one is not kept there.)"""
    return bool(list(tqdm._instances))


def mute_stop_signals() -> None:
    """SIGTERM, SIGINT and SIGUSR1 ignored from now on (set from the main thread only, as signal handlers are).
    What a run does once its stop is saved, and train/run.py outside train(), which installs its own handlers
    while it runs and puts these back: the exit status a run decided cannot be changed by a late signal."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the workers ignore the stop signals, which the main process handles (a
    worker ended by SLURM's SIGTERM would otherwise fail the step the main process is finishing)."""
    mute_stop_signals()


# ----------------------------------------------------------------------------------------------- versions
def cpu_model() -> str:
    """The CPU's model name as Linux gives it (/proc/cpuinfo), else as the platform module does."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown"


def software_versions() -> dict[str, str]:
    """The software and device a run or a benchmark ran on (written into config.json and the GPU report)."""
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "timm", "dcama-triton"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["cuda (torch build)"] = str(torch.version.cuda)
    info["platform"] = platform.platform()
    # A CPU run's scores depend on the kernels torch picks for the CPU's instruction set (docs/training.md).
    info["cpu"] = f"{cpu_model()}, {os.cpu_count()} logical CPUs"
    info["cpu capability (torch)"] = torch.backends.cpu.get_cpu_capability()
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["compute capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    return info
