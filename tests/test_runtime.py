"""Where a run executes (dcama/runtime.py): rank/world without a process group, CPU threads, autocast,
batches moved to the device, the RNG states a checkpoint stores, the samplers, the stop signals, the versions.
What the ranks agree on is tested with two processes in test_train.py."""

import os
import random
import signal
import sys
import time

import numpy as np
import pytest
import torch
from tqdm import tqdm

import dcama.runtime as runtime
from dcama.runtime import (STOP_SIGNALS, EpochSampler, Interrupted, ShardSampler, StopRequests, all_gather, any_rank,
                           autocast_context, cpu_threads, dist_info, from_rank0, gather_rng_states,
                           ignore_stop_signals, move_batch, rng_state, seed_everything, set_rng_state,
                           setup_distributed, software_versions)


def test_single_process_without_a_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_info() == (0, 1)
    rank, world, device, owned = setup_distributed()
    assert (rank, world, owned) == (0, 1, False)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_threads_restores_the_count():
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"threads must be >= 0 \(0 or None: torch's default\), got -1"):
        with cpu_threads(-1):
            pass
    assert torch.get_num_threads() == before


def test_autocast_context():
    x = torch.randn(4, 4)
    with autocast_context(torch.device("cpu"), "off"):
        assert (x @ x).dtype == torch.float32
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16


def test_move_batch_stacks_per_item_masks():
    batch = {"query_img": torch.zeros(2, 3, 4, 4), "query_mask": [torch.ones(5, 6), torch.zeros(5, 6)],
             "class_id": torch.tensor([1, 2]), "query_name": ["a", "b"], "org_query_size": [(5, 6), (5, 6)]}
    out = move_batch(batch, torch.device("cpu"))
    assert out["query_mask"].shape == (2, 5, 6) and out["query_mask"][0].sum() == 30
    assert out["query_name"] == ["a", "b"] and out["org_query_size"] == [(5, 6), (5, 6)]
    assert torch.equal(out["class_id"], batch["class_id"])


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    seed_everything(3)
    state = rng_state()
    torch.save({"rng": gather_rng_states()}, tmp_path / "rng.pt")
    first = _draws()
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0])
    assert _draws() == first
    set_rng_state(state)
    assert _draws() == first
    seed_everything(3)
    assert _draws() == first  # seeding all three generators is what fixes them


def test_shard_sampler_scores_every_episode_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert [len(ShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]


def test_software_versions():
    info = software_versions()
    assert info["torch"] == torch.__version__
    assert {"python", "triton", "timm", "dcama-triton", "platform"} <= set(info)
    assert info["cpu"].startswith(runtime.cpu_model()) and info["cpu"].endswith(f", {os.cpu_count()} logical CPUs")
    assert info["cpu capability (torch)"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512


def test_epoch_sampler_starts_part_way():
    full = list(EpochSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=3))
    sampler = EpochSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=3)
    sampler.start = 2
    assert list(sampler) == full[2:] and len(sampler) == len(full) - 2
    sampler.set_epoch(1)
    assert list(sampler) != full[2:]  # another epoch, another order


def test_single_process_agreement_is_the_local_value():
    assert any_rank(True, False) == (True, False)
    assert all_gather({"a": 1}) == [{"a": 1}] and from_rank0("x") == "x"


@pytest.fixture
def short_repeat_window(monkeypatch):
    monkeypatch.setattr(runtime, "REPEAT_WINDOW_S", 0.05)


def _signal_self(sig=signal.SIGUSR1):
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs at the next bytecode; the sleep leaves no doubt


def test_stop_requests_defer_the_first_signal_and_not_a_second(short_repeat_window, capfd):
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequests(notice="{signal}: stopping after this step") as stop:
        with stop.deferred():
            _signal_self()
            _signal_self()  # within the window: the same signal passed on by a launcher
            assert stop.requested == signal.SIGUSR1
            time.sleep(0.1)
            with pytest.raises(Interrupted) as err:
                _signal_self(signal.SIGTERM)
        assert err.value.signum == signal.SIGTERM and err.value.exit_status == 143
    assert capfd.readouterr().err == "SIGUSR1: stopping after this step\n"
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("bar", ["drawn", "disabled"])
def test_the_stop_notice_starts_a_line_of_its_own(bar, short_repeat_window, capfd):
    """A progress bar leaves the cursor at the end of its line: the notice goes below it, not into it, and
    without a bar (--no-progress) it is not preceded by an empty line."""
    with tqdm(total=4, desc="epoch 1/8", file=sys.stderr, disable=bar == "disabled") as progress:
        progress.update(1)
        drawn = capfd.readouterr().err  # the bar's line, without a newline
        assert (drawn.rstrip().endswith("it/s]") and not drawn.endswith("\n")) if bar == "drawn" else drawn == ""
        with StopRequests(notice="{signal}: stopping after this step") as stop, stop.deferred():
            _signal_self()
    err = capfd.readouterr().err  # the notice, then what the bar drew when it closed
    assert err.startswith("\nSIGUSR1: stopping after this step\n" if bar == "drawn" else "SIGUSR1: stopping")


def test_stop_requests_outside_the_deferred_part_stop_at_once(short_repeat_window):
    with StopRequests() as stop:
        with pytest.raises(Interrupted, match="SIGINT"):
            _signal_self(signal.SIGINT)
        assert stop.requested is None


def test_data_loader_workers_ignore_the_stop_signals():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
        _signal_self(signal.SIGTERM)  # would end the process otherwise
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
