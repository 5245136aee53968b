"""FewShotIoU and the per-episode IoU on hand-computed cases."""

import math
import multiprocessing as mp

import pytest
import torch

from dcama.metrics import FewShotIoU, episode_iou


def masks(*rows):
    return torch.tensor(rows, dtype=torch.long)[None]  # one (1, 1, W) episode per call


def test_perfect_and_empty_predictions():
    target = torch.tensor([[[1, 1, 0, 0], [0, 1, 0, 0]], [[0, 0, 0, 1], [0, 0, 0, 0]]])
    m = FewShotIoU([3, 7])
    m.update(target.clone(), target, torch.tensor([3, 7]))
    out = m.compute()
    assert out == {"miou": 100.0, "fb_iou": 100.0, "per_class": {3: 100.0, 7: 100.0}}

    m = FewShotIoU([3, 7])
    m.update(torch.zeros_like(target), target, torch.tensor([3, 7]))
    out = m.compute()
    assert out["miou"] == 0.0 and out["per_class"] == {3: 0.0, 7: 0.0}
    # Background: 12 target-background pixels, all 16 pixels predicted background.
    assert out["fb_iou"] == pytest.approx(0.5 * (0.0 + 100.0 * 12 / 16))


def test_iou_sums_over_episodes_not_mean_of_episodes():
    m = FewShotIoU([0, 1])
    # class 0: episode a has I=1, U=2; episode b has I=3, U=4 -> 4/6 (a per-episode mean would give 62.5).
    m.update(masks([1, 1, 0, 0, 0, 0]), masks([1, 0, 0, 0, 0, 0]), [0])
    m.update(masks([1, 1, 1, 1, 0, 0]), masks([1, 1, 1, 0, 0, 0]), [0])
    # class 1: I=1, U=3.
    m.update(masks([0, 1, 1, 0, 0, 0]), masks([1, 1, 0, 0, 0, 0]), torch.tensor([1]))
    out = m.compute()
    assert out["per_class"][0] == pytest.approx(100 * 4 / 6)
    assert out["per_class"][1] == pytest.approx(100 * 1 / 3)
    assert out["miou"] == pytest.approx(100 * (4 / 6 + 1 / 3) / 2)
    fg = (1 + 3 + 1) / (2 + 4 + 3)
    bg = (4 + 2 + 3) / (5 + 3 + 5)  # per episode: background intersection / union
    assert out["fb_iou"] == pytest.approx(100 * (fg + bg) / 2)


def test_ignore_pixels_are_excluded():
    m = FewShotIoU([5])
    pred = masks([1, 1, 0, 1, 0])
    target = masks([1, 255, 255, 0, 0])
    m.update(pred, target, [5])
    out = m.compute()
    assert out["per_class"][5] == pytest.approx(100 * 1 / 2)  # pixels 0 and 3 count, 1 and 2 do not
    assert out["fb_iou"] == pytest.approx(100 * (1 / 2 + 1 / 2) / 2)


def test_class_without_episodes_is_reported_and_left_out():
    m = FewShotIoU([0, 1, 2])
    m.update(masks([1, 0]), masks([1, 1]), [2])
    out = m.compute()
    assert math.isnan(out["per_class"][0]) and math.isnan(out["per_class"][1])
    assert out["miou"] == pytest.approx(50.0)


def test_episode_iou_ignores_boundary_pixels():
    target = torch.tensor([[1, 1], [0, 255]])
    assert episode_iou(torch.tensor([[1, 0], [0, 1]]), target) == pytest.approx(50.0)
    assert episode_iou(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)) == 100.0


def test_bad_inputs_raise():
    m = FewShotIoU([1, 2])
    with pytest.raises(ValueError, match=r"class ids \[9\] are not among"):
        m.update(masks([1]), masks([1]), [9])
    with pytest.raises(ValueError, match="must both be"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), [1])
    with pytest.raises(ValueError, match="2 class ids for a batch of 1"):
        m.update(masks([1]), masks([1]), [1, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 2, (4, 9, 9), generator=g)
    target = torch.randint(0, 2, (4, 9, 9), generator=g)
    target[:, 0] = 255
    cls = torch.tensor([0, 1, 0, 1])
    a, b = FewShotIoU([0, 1]), FewShotIoU([0, 1], device="cuda")
    a.update(pred, target, cls)
    b.update(pred.cuda(), target.cuda(), cls.cuda())
    assert a.compute() == b.compute()


def _rank(rank, path, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    m = FewShotIoU([0, 1])
    if rank == 0:
        m.update(masks([1, 1, 0, 0]), masks([1, 0, 0, 0]), [0])
    else:
        m.update(masks([1, 1, 1, 0]), masks([1, 1, 1, 1]), [1])
    m.all_reduce()
    queue.put((rank, m.compute()))
    dist.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, tmp_path / "store", queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results[0] == results[1]
    assert results[0]["per_class"] == {0: pytest.approx(50.0), 1: pytest.approx(75.0)}
    # Without a process group all_reduce leaves the local sums alone.
    m = FewShotIoU([0])
    m.update(masks([1, 0]), masks([1, 0]), [0])
    m.all_reduce()
    assert m.compute()["miou"] == 100.0


def test_state_dict_continues_the_counts():
    pred = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [0, 1]]])
    target = torch.tensor([[[1, 1], [0, 1]], [[0, 0], [1, 1]]])
    whole, first, resumed = FewShotIoU([3, 5]), FewShotIoU([3, 5]), FewShotIoU([3, 5])
    whole.update(pred, target, [3, 5])
    first.update(pred[:1], target[:1], [3])
    resumed.load_state_dict(first.state_dict())
    resumed.update(pred[1:], target[1:], [5])
    assert resumed.compute() == whole.compute()
    with pytest.raises(ValueError, match="holds 2 classes, this metric 3"):
        FewShotIoU([1, 2, 3]).load_state_dict(whole.state_dict())
