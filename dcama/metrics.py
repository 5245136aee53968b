"""Few-shot segmentation metrics accumulated over all episodes of a run (docs/data.md, "Metrics").

Per class c: IoU_c = (sum of foreground intersections) / (sum of foreground unions) over the episodes of c;
mIoU = mean of IoU_c over the split's classes. FB-IoU = mean of the foreground IoU and the background IoU,
each summed over all episodes. Pixels whose target is 255 (PASCAL boundaries) count in neither.
Results are percentages (0..100).

Classes with no episode are left out of the mIoU mean and reported as NaN in per_class (eval says so in a line);
a class whose episodes all have an empty union (empty target and empty prediction) scores 100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .config import IGNORE_INDEX

_ACCUMULATORS = ("fg_inter", "fg_union", "bg_inter", "bg_union", "episodes")


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-episode pixel counts (4, B): foreground intersection, foreground union, background intersection,
    background union of pred (B,H,W) {0,1} against target (B,H,W) {0,1,255}; 255 pixels count in neither."""
    target = target.to(pred.device)
    valid = target != IGNORE_INDEX
    p_fg = (pred == 1) & valid
    t_fg = (target == 1) & valid
    p_bg = (pred != 1) & valid
    t_bg = (target == 0) & valid
    return torch.stack([
        (p_fg & t_fg).flatten(1).sum(1),
        (p_fg | t_fg).flatten(1).sum(1),
        (p_bg & t_bg).flatten(1).sum(1),
        (p_bg | t_bg).flatten(1).sum(1),
    ])


def episode_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Foreground IoU (%) of one episode, pixels marked 255 ignored; 100 when both are empty."""
    inter, union = intersection_union(pred[None], target[None])[:2, 0].tolist()
    return 100.0 if union == 0 else 100.0 * inter / union


class FewShotIoU:
    """Accumulates intersections and unions per class and for foreground/background over episodes."""

    def __init__(self, class_ids: Sequence[int], device: torch.device | str | None = None) -> None:
        self.class_ids = [int(c) for c in class_ids]
        if not self.class_ids or len(set(self.class_ids)) != len(self.class_ids) or min(self.class_ids) < 0:
            raise ValueError(f"class_ids must be distinct non-negative integers, got {list(class_ids)}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Benchmark class index -> accumulator row; -1 marks indices outside the split.
        self._slot = torch.full((max(self.class_ids) + 1,), -1, dtype=torch.long)
        self._slot[torch.tensor(self.class_ids)] = torch.arange(len(self.class_ids))
        self.reset()

    def reset(self) -> None:
        n = len(self.class_ids)
        # int64 counts: exact pixel totals whatever the number of episodes.
        self.fg_inter = torch.zeros(n, dtype=torch.long, device=self.device)
        self.fg_union = torch.zeros(n, dtype=torch.long, device=self.device)
        self.bg_inter = torch.zeros(n, dtype=torch.long, device=self.device)
        self.bg_union = torch.zeros(n, dtype=torch.long, device=self.device)
        self.episodes = torch.zeros(n, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, class_id: torch.Tensor | Sequence[int] | int) -> None:
        """Add a batch: pred (B,H,W) in {0,1}, target (B,H,W) in {0,1,255}, class_id (B,) benchmark classes."""
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"pred and target must both be (B,H,W), got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        cls = torch.as_tensor(class_id, dtype=torch.long).reshape(-1).cpu()
        if cls.numel() != pred.shape[0]:
            raise ValueError(f"{cls.numel()} class ids for a batch of {pred.shape[0]}")
        unknown = (cls < 0) | (cls >= len(self._slot))
        slots = torch.where(unknown, -1, self._slot[cls.clamp(0, len(self._slot) - 1)])
        if (slots < 0).any():
            raise ValueError(f"class ids {sorted(set(cls[slots < 0].tolist()))} are not among this metric's "
                             f"classes {self.class_ids}")
        stats = intersection_union(pred, target).to(self.device)
        slots = slots.to(self.device)
        for acc, row in zip((self.fg_inter, self.fg_union, self.bg_inter, self.bg_union), stats):
            acc.index_add_(0, slots, row)
        self.episodes.index_add_(0, slots, torch.ones_like(slots))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulators on the CPU (what a checkpoint saved inside an epoch stores)."""
        return {name: getattr(self, name).cpu().clone() for name in _ACCUMULATORS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from what `state_dict` returned (for the same classes)."""
        for name in _ACCUMULATORS:
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"{name} holds {state[name].numel()} classes, this metric {len(self.class_ids)}")
            setattr(self, name, state[name].to(self.device, dtype=torch.long))

    def all_reduce(self) -> None:
        """Sum the accumulators over the torch.distributed ranks (no-op when not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        packed = torch.stack([self.fg_inter, self.fg_union, self.bg_inter, self.bg_union, self.episodes])
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        comm_device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                       else torch.device("cpu"))
        packed = packed.to(comm_device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed = packed.to(self.device)
        self.fg_inter, self.fg_union, self.bg_inter, self.bg_union, self.episodes = packed.unbind(0)

    def compute(self) -> dict:
        """{"miou", "fb_iou", "per_class": {class id: IoU}} in percent (see the module doc for empty cases)."""
        fg_i, fg_u = self.fg_inter.double().cpu(), self.fg_union.double().cpu()
        seen = self.episodes.cpu() > 0
        per_class = {}
        for k, c in enumerate(self.class_ids):
            if not seen[k]:
                per_class[c] = math.nan
            else:
                per_class[c] = 100.0 * (fg_i[k] / fg_u[k]).item() if fg_u[k] > 0 else 100.0
        scored = [per_class[c] for k, c in enumerate(self.class_ids) if seen[k]]
        miou = sum(scored) / len(scored) if scored else math.nan

        def ratio(inter: torch.Tensor, union: torch.Tensor) -> float:
            u = union.sum().item()
            return 100.0 * inter.sum().item() / u if u > 0 else 100.0

        if seen.any():
            fb_iou = 0.5 * (ratio(self.fg_inter.cpu(), self.fg_union.cpu())
                            + ratio(self.bg_inter.cpu(), self.bg_union.cpu()))
        else:
            fb_iou = math.nan
        return {"miou": miou, "fb_iou": fb_iou, "per_class": per_class}
