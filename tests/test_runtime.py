"""Where a run executes (dcama/runtime.py): rank/world without a process group, CPU threads, autocast,
batches moved to the device, the RNG states a checkpoint stores, the evaluation sampler, the versions."""

import random

import numpy as np
import pytest
import torch

from dcama.runtime import (ShardSampler, autocast_context, cpu_threads, dist_info, gather_rng_states, move_batch,
                           rng_state, seed_everything, set_rng_state, setup_distributed, software_versions)


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
