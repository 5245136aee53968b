"""Test session set-up: pick how Triton runs before any kernel module is imported."""

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

# On a machine without CUDA the kernels can only run in the Triton interpreter, which must be chosen
# before `triton.jit` decorates them, that is before `kernels` is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# After the interpreter choice above. pytest puts tests/ on sys.path (no __init__.py), hence `helpers`.
from dcama import DCAMA  # noqa: E402
from helpers import DEVICE, randomise_  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason="no CUDA device: compiled-kernel tests need a GPU")
    elif INTERPRETED:
        skip_cuda = pytest.mark.skip(reason="TRITON_INTERPRET=1 is set: unset it to run the compiled CUDA tests")
    else:
        skip_cuda = None
    skip_interp = None if INTERPRETED else pytest.mark.skip(
        reason="interpreter tests need TRITON_INTERPRET=1 (set by default when no CUDA device is present)"
    )
    for item in items:
        if skip_cuda is not None and "cuda" in item.keywords:
            item.add_marker(skip_cuda)
        if skip_interp is not None and "interpreter" in item.keywords:
            item.add_marker(skip_interp)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def load_cli() -> Callable[[str], ModuleType]:
    """Loads `<name>/run.py` (train or eval), or the script at a path (eval/predict.py), as a module, so a
    test can call its main(argv)."""

    def load(name: str) -> ModuleType:
        path = REPO / name if name.endswith(".py") else REPO / name / "run.py"
        spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}_cli", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def swin32() -> torch.nn.Module:
    """A Swin-B DCAMA built for 32x32 inputs (the smallest side it builds for: one window per stage grid), with
    randomised normalisation weights; the published model uses 384, the key layout is the same. Built once:
    Swin-B takes seconds to initialise."""
    torch.manual_seed(0)
    return randomise_(DCAMA("swin_b", attn_impl="sdpa", img_size=32)).to(DEVICE).eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second thread only adds synchronisation, and much more on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
