"""Where and how a run executes: the process group, the device, CPU threads, autocast, batches moved to the
device, every RNG's state, and the software versions a run records.

The engines (`dcama.evaluate`, `dcama.train`) build on it; it knows nothing of the model or the data sets.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .config import AMP_DTYPES

Batch = dict[str, Any]


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


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist_info()[1] > 1:
        dist.barrier()


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads(threads) inside the block (None or 0: unchanged); the previous count restored
    after it, so a library call leaves the process as it found it."""
    before = torch.get_num_threads()
    if threads:
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
    _, world = dist_info()
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


# ----------------------------------------------------------------------------------------------- versions
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
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["compute capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    return info
