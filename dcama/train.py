"""Training engine: episodic DCAMA training in one process or under torchrun (DistributedDataParallel).

`train(TrainConfig(...))` is what `train/run.py` calls. A run is a few steps, one function each, in the order
`_train` calls them: build (data sets, model, optimiser), resume, distribute, then every epoch: train one
epoch, validate, save, log; at the end, test the best checkpoint.

Each epoch writes `last.pt` and, when validation mIoU improves, `best.pt` (atomic writes). A checkpoint holds
everything the next epoch depends on (weights, optimiser, gradient scaler, epoch, best score, every rank's RNG
states) and the episodes of epoch e are a pure function of (seed, e, i), so a run killed and resumed reaches
the same weights as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .backbones import BACKBONES
from .checkpoint import load_checkpoint_file, save_checkpoint
from .config import AMP_MODES, BENCHMARK_DEFAULTS, IGNORE_INDEX, OPTIMIZERS, TEST_SEED
from .data import FewShotDataset, build_dataset
from .evaluate import evaluate, evaluate_checkpoint, model_predictor
from .files import write_json, write_jsonl
from .metrics import FewShotIoU
from .model import DCAMA
from .runtime import (autocast_context, barrier, cpu_threads, dist_info, gather_rng_states, move_batch,
                      seed_everything, set_rng_state, setup_distributed, software_versions)

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "TrainResult", "build_optimizer", "resolve_config",
           "segmentation_loss", "train", "train_step", "trainable_parameters"]

TENSORBOARD_TAGS = {"train_loss": "train/loss", "train_miou": "train/miou", "train_fb_iou": "train/fb_iou",
                    "val_miou": "val/miou", "val_fb_iou": "val/fb_iou", "lr": "train/lr",
                    "episodes_per_s": "train/episodes_per_s"}
# Settings that change what the remaining epochs compute (the optimiser's own, e.g. lr, come from the file).
_RESUME_SENSITIVE = ("benchmark", "fold", "img_size", "bsz", "nshot", "seed", "episodes_per_epoch", "fg_weight",
                     "amp", "optimizer")

EpochHook = Callable[[int, dict[str, Any]], None]


class ConfigError(ValueError):
    """A training configuration that cannot run (bad flag value, logdir clash, mismatching resume file)."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or inf; the last good checkpoint was left untouched."""


@dataclass
class TrainConfig:
    """Every knob of a run; None means "the benchmark's default" (BENCHMARK_DEFAULTS)."""

    benchmark: str = "shapes"
    datapath: str | None = None
    fold: int = 0
    backbone: str | None = None
    backbone_weights: str | None = None
    img_size: int | None = None
    bsz: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    fg_weight: float | None = None  # cross-entropy weight of the foreground class (background: 1)
    epochs: int | None = None
    nshot: int = 1
    attn_impl: str = "auto"
    amp: str = "off"
    logdir: str | None = None
    resume: str | None = None  # a checkpoint path, or "last" for <logdir>/last.pt
    seed: int = 0
    workers: int | None = None
    episodes_per_epoch: int | None = None  # None: the training split's own length
    val_episodes: int | None = None
    test_episodes: int | None = None  # after training, the best checkpoint on the test split; 0 skips
    threads: int | None = None  # torch.set_num_threads on CPU
    progress: bool = True


@dataclass
class TrainResult:
    logdir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_miou: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] | None = None


@dataclass
class RunState:
    """Where a run stands: what its checkpoints record and a resume restores (besides weights and RNGs)."""

    next_epoch: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Run:
    """What the steps of one run share."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    trn_ds: FewShotDataset
    val_ds: FewShotDataset
    model: DCAMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: RunState = field(default_factory=RunState)

    @property
    def logdir(self) -> Path:
        return Path(self.cfg.logdir)

    @property
    def last_path(self) -> Path:
        return self.logdir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.logdir / "best.pt"


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` with every None filled from the benchmark's defaults, the logdir chosen and checked."""
    if cfg.benchmark not in BENCHMARK_DEFAULTS:
        raise ConfigError(f"unknown benchmark {cfg.benchmark!r}; choose from {', '.join(BENCHMARK_DEFAULTS)}")
    defaults = BENCHMARK_DEFAULTS[cfg.benchmark]
    values = {k: (defaults[k] if v is None and k in defaults else v) for k, v in dataclasses.asdict(cfg).items()}
    out = TrainConfig(**values)
    if out.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {out.backbone!r}; choose from {', '.join(BACKBONES)}")
    if out.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {out.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if out.amp not in AMP_MODES:
        raise ConfigError(f"unknown --amp {out.amp!r}; choose from {', '.join(AMP_MODES)}")
    if out.nshot < 1 or out.epochs < 1 or out.bsz < 1:
        raise ConfigError("--nshot, --epochs and --bsz must be at least 1")
    if out.resume not in (None, "last") and out.logdir is None:
        out.logdir = str(Path(out.resume).parent)  # resuming a file continues the run in its own folder
    if out.logdir is None:
        if out.resume == "last":
            raise ConfigError("--resume without a path needs --logdir (the run folder holding last.pt)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out.logdir = f"logs/{out.benchmark}-fold{out.fold}-{out.backbone}-{out.nshot}shot-{stamp}"
    if out.resume == "last":
        out.resume = str(Path(out.logdir) / "last.pt")
    return out


def train(cfg: TrainConfig, on_epoch_end: EpochHook | None = None) -> TrainResult:
    """Run (or resume) a training run; returns where the checkpoints are and what they reached.

    `on_epoch_end(epoch, record)` is called on every rank after the epoch's checkpoints are written (an
    exception raised there stops the run as a kill would). Raises NonFiniteLossError on a NaN/inf loss.
    """
    cfg = resolve_config(cfg)
    rank, world, device, owned_group = setup_distributed()
    try:
        with cpu_threads(cfg.threads if device.type == "cpu" else None):
            return _train(cfg, rank, world, device, on_epoch_end)
    finally:
        if owned_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device,
           on_epoch_end: EpochHook | None) -> TrainResult:
    run = _build(cfg, rank, world, device)
    if cfg.resume is not None:
        _resume(run)
    net, sampler, loader = _distribute(run)
    writer = _start_logs(run)
    try:
        for epoch in range(run.state.next_epoch, cfg.epochs):
            record = _epoch(run, net, sampler, loader, epoch)
            _save(run, record)
            _log(run, writer, record)
            barrier()  # nobody starts the next epoch (or a resume) before the files exist
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    finally:
        if writer is not None:
            writer.close()
    test = _test(run) if cfg.test_episodes else None
    return TrainResult(logdir=run.logdir, best_checkpoint=run.best_path, last_checkpoint=run.last_path,
                       best_val_miou=run.state.best_miou, best_epoch=run.state.best_epoch,
                       history=run.state.history, test=test)


# ------------------------------------------------------------------------------------------------- build
def _build(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> _Run:
    """Data sets, model, optimiser and gradient scaler, and every RNG seeded."""
    last_path = Path(cfg.logdir) / "last.pt"
    if cfg.resume is None and last_path.exists():
        raise ConfigError(f"{cfg.logdir} already holds a run ({last_path.name}); pass --resume to continue it "
                          "or choose another --logdir")
    # Datasets first: a missing data set fails before any model is built.
    data_kw = dict(shot=cfg.nshot, img_size=cfg.img_size, use_original_imgsize=False, seed=cfg.seed)
    trn_kw = {} if cfg.episodes_per_epoch is None else {"episodes": cfg.episodes_per_epoch}
    trn_ds = build_dataset(cfg.benchmark, cfg.datapath, fold=cfg.fold, split="trn", **data_kw, **trn_kw)
    val_ds = build_dataset(cfg.benchmark, cfg.datapath, fold=cfg.fold, split="val", episodes=cfg.val_episodes,
                           **data_kw)
    if cfg.backbone_weights is None and cfg.benchmark != "shapes" and rank == 0:
        print(f"note: no --backbone-weights: the {cfg.backbone} backbone stays randomly initialised (the published "
              f"recipe uses ImageNet weights, e.g. {BACKBONES[cfg.backbone].weights_file})", flush=True)
    # Same seed on every rank for the weights; per-rank streams afterwards for dropout.
    torch.manual_seed(cfg.seed)
    # Swin is built for one input size; ResNets take any multiple of 32, so their checkpoints stay size-free.
    model = DCAMA(backbone=cfg.backbone, attn_impl=cfg.attn_impl, backbone_weights=cfg.backbone_weights,
                  img_size=cfg.img_size if BACKBONES[cfg.backbone].kind == "swin" else None).to(device)
    optimizer = build_optimizer(cfg, trainable_parameters(model))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    seed_everything(cfg.seed + rank)
    return _Run(cfg, rank, world, device, trn_ds, val_ds, model, optimizer, scaler)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (the head's: the backbone is frozen)."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser `cfg` names (a resolved config), SGD with Nesterov momentum as published, or AdamW."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------------------------------------ resume
def _resume(run: _Run) -> None:
    """Weights, optimiser, scaler, progress and this rank's RNG streams from the checkpoint cfg.resume."""
    path = run.cfg.resume
    blob = load_checkpoint_file(path)
    _check_resume_matches(blob, run, path)
    run.model.load_state_dict(blob["state_dict"])
    run.optimizer.load_state_dict(blob["optimizer"])
    if "scaler" in blob:
        run.scaler.load_state_dict(blob["scaler"])
    run.state = RunState(next_epoch=blob["epoch"] + 1, best_miou=blob["best_miou"], best_epoch=blob["best_epoch"],
                         history=list(blob.get("history", [])))
    rng = blob["rng"]
    if len(rng) != run.world and run.rank == 0:
        print(f"note: {path} was written by {len(rng)} process(es), this run has {run.world}: "
              "training continues but will not repeat the uninterrupted run bit for bit")
    set_rng_state(rng[run.rank] if len(rng) == run.world else rng[0])


def _check_resume_matches(blob: dict[str, Any], run: _Run, path: str) -> None:
    saved, wanted = blob.get("config", {}).get("backbone"), run.model.config["backbone"]
    if saved != wanted:
        raise ConfigError(f"cannot resume from {path}: it was trained with backbone={saved!r}, "
                          f"this run asks for backbone={wanted!r}")
    if "optimizer" not in blob or "epoch" not in blob:
        raise ConfigError(f"cannot resume from {path}: it holds weights only (no optimiser state or epoch); "
                          "to start from these weights evaluate them with eval/run.py instead")
    before = blob.get("train_config", {})
    changed = [k for k in _RESUME_SENSITIVE if k in before and before[k] != getattr(run.cfg, k)]
    if changed and run.rank == 0:
        print(f"note: resuming {path} with different {', '.join(changed)} than it was trained with; "
              "the run will not repeat an uninterrupted one", flush=True)


# -------------------------------------------------------------------------------------------- distribute
def _distribute(run: _Run) -> tuple[torch.nn.Module, DistributedSampler, DataLoader]:
    """The model wrapped for DistributedDataParallel when there are several processes, and the training
    loader, whose sampler splits the episodes over the ranks (one process: all of them, shuffled)."""
    cfg, device = run.cfg, run.device
    net: torch.nn.Module = run.model
    if run.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(run.trn_ds, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(run.trn_ds, batch_size=cfg.bsz, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", drop_last=len(sampler) >= cfg.bsz)
    return net, sampler, loader


# --------------------------------------------------------------------------------------------- one epoch
def _epoch(run: _Run, net: torch.nn.Module, sampler: DistributedSampler, loader: DataLoader,
           epoch: int) -> dict[str, Any]:
    """Train one epoch, validate, update the best score; returns the epoch's record (a metrics.jsonl line)."""
    run.trn_ds.set_epoch(epoch)
    sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    train_stats = _train_epoch(run, net, loader, epoch)
    if not all(torch.isfinite(p).all().item() for p in trainable_parameters(run.model)):
        raise NonFiniteLossError(f"the weights became NaN or inf during epoch {epoch}; "
                                 f"the last good checkpoint is {run.last_path}")
    train_time = time.perf_counter() - t0
    val = _validate(run, epoch)
    state = run.state
    if val["miou"] > state.best_miou:
        state.best_miou, state.best_epoch = val["miou"], epoch
    record = {"epoch": epoch, **train_stats, "val_miou": val["miou"], "val_fb_iou": val["fb_iou"],
              "best_val_miou": state.best_miou, "best_epoch": state.best_epoch,
              "lr": run.optimizer.param_groups[0]["lr"], "train_time_s": round(train_time, 3),
              "epoch_time_s": round(time.perf_counter() - t0, 3)}
    state.history.append(record)
    return record


def _train_epoch(run: _Run, net: torch.nn.Module, loader: DataLoader, epoch: int) -> dict[str, Any]:
    cfg = run.cfg
    net.train()
    metric = FewShotIoU(run.trn_ds.class_ids, device=run.device)
    loss_sum, steps, episodes = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or run.rank != 0,
               dynamic_ncols=True)
    for step, batch in enumerate(bar):
        batch = move_batch(batch, run.device)
        target = batch["query_mask"]
        try:
            logits, mean_loss = train_step(net, batch, run.optimizer, run.scaler, amp=cfg.amp,
                                           fg_weight=cfg.fg_weight)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err} at epoch {epoch}, step {step}; stopped without saving, the last "
                                     f"good checkpoint is {run.last_path} "
                                     f"({'present' if run.last_path.exists() else 'none written yet'})") from None
        metric.update(logits.detach().argmax(1), target, batch["class_id"])
        loss_sum += mean_loss.item()
        steps += 1
        episodes += target.shape[0] * run.world
        if not bar.disable:
            bar.set_postfix(loss=f"{loss_sum / steps:.4f}", miou=f"{_quiet_miou(metric):.1f}",
                            eps=f"{episodes / (time.perf_counter() - t0):.1f}/s")
    metric.all_reduce()
    scores = _quiet_scores(metric)
    elapsed = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(steps, 1), "train_miou": scores["miou"], "train_fb_iou": scores["fb_iou"],
            "steps": steps, "episodes_per_s": episodes / elapsed if elapsed > 0 else math.nan}


def _quiet_scores(metric: FewShotIoU) -> dict[str, Any]:
    # Training episodes need not visit every class (early in an epoch, or in a short one): expected, not warned.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.compute()


def _quiet_miou(metric: FewShotIoU) -> float:
    return _quiet_scores(metric)["miou"]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, fg_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy over the 2 logits per pixel (docs/model.md); IGNORE_INDEX (255) marks pixels to ignore.

    fg_weight != 1 weights the foreground class (a weighted mean over pixels): the published recipe uses 1.
    """
    weight = None if fg_weight == 1.0 else torch.tensor([1.0, fg_weight], device=logits.device)
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX)


def train_step(net: torch.nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp: str = "off", fg_weight: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the device; returns (logits, loss averaged over ranks).

    The loss is checked before the update: a NaN/inf (on any rank) raises NonFiniteLossError and leaves the
    weights and the optimiser untouched.
    """
    device = batch["query_img"].device
    with autocast_context(device, amp):
        logits = net(batch["query_img"], batch["support_imgs"], batch["support_masks"])
    loss = segmentation_loss(logits, batch["query_mask"], fg_weight)
    # Averaged over the ranks for the log, and so that every rank sees the same NaN and stops together.
    mean_loss = loss.detach().clone()
    _, world = dist_info()
    if world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= world
    if not torch.isfinite(mean_loss):
        raise NonFiniteLossError(f"loss became {mean_loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, mean_loss


def _validate(run: _Run, epoch: int) -> dict[str, Any]:
    """The model's scores on the fixed validation episodes."""
    cfg = run.cfg
    run.model.eval()
    return evaluate(model_predictor(run.model, amp=cfg.amp), run.val_ds, device=run.device, batch_size=cfg.bsz,
                    workers=cfg.workers, progress=cfg.progress, desc=f"val {epoch}")


# ------------------------------------------------------------------------------------------ save and log
def _save(run: _Run, record: dict[str, Any]) -> None:
    """`last.pt`, `best.pt` when this epoch is the best so far, and metrics.jsonl (rank 0 writes)."""
    rng = gather_rng_states()  # collective: every rank takes part
    if run.rank != 0:
        return
    cfg, state, epoch = run.cfg, run.state, record["epoch"]
    extra = {"epoch": epoch, "best_miou": state.best_miou, "best_epoch": state.best_epoch,
             "optimizer": run.optimizer.state_dict(), "rng": rng, "history": state.history,
             "train_config": dataclasses.asdict(cfg),
             "val": {"miou": record["val_miou"], "fb_iou": record["val_fb_iou"]}}
    if cfg.amp == "fp16":
        extra["scaler"] = run.scaler.state_dict()
    save_checkpoint(run.last_path, run.model, extra=extra)
    if state.best_epoch == epoch:
        save_checkpoint(run.best_path, run.model, extra=extra)
    # Rewritten whole from the checkpoint's history, so it always agrees with last.pt, even when a run was
    # killed between the two writes and resumed.
    write_jsonl(run.logdir / "metrics.jsonl", state.history)


def _start_logs(run: _Run) -> SummaryWriter | None:
    """On rank 0: the run folder, its config.json and the TensorBoard writer."""
    if run.rank != 0:
        return None
    run.logdir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run.logdir / "tensorboard"))
    trainable = sum(p.numel() for p in trainable_parameters(run.model))
    data = run.trn_ds.describe()  # what the data set says of itself: the folder benchmark's class split
    if data.get("summary"):
        print(data["summary"], flush=True)
    run_config = {"train": dataclasses.asdict(run.cfg), "model": dict(run.model.config), "world_size": run.world,
                  "device": str(run.device), "trainable_params": trainable,
                  "train_episodes_per_epoch": len(run.trn_ds), "data": data, "versions": software_versions()}
    write_json(run.logdir / "config.json", run_config)
    return writer


def _log(run: _Run, writer: SummaryWriter | None, record: dict[str, Any]) -> None:
    """The epoch's scalars to TensorBoard and its summary line to stdout (rank 0 only)."""
    if writer is None:
        return
    for key, tag in TENSORBOARD_TAGS.items():
        writer.add_scalar(tag, record[key], record["epoch"])
    writer.flush()
    print(f"epoch {record['epoch']}: loss {record['train_loss']:.4f}  train mIoU {record['train_miou']:.2f}  "
          f"val mIoU {record['val_miou']:.2f}  val FB-IoU {record['val_fb_iou']:.2f}  (best "
          f"{record['best_val_miou']:.2f} at epoch {record['best_epoch']})  {record['episodes_per_s']:.1f} "
          "episodes/s", flush=True)


# ------------------------------------------------------------------------------------------------- test
def _test(run: _Run) -> dict[str, Any]:
    """The best checkpoint on the test split, written to test.json."""
    cfg = run.cfg
    # The protocol's fixed test seed, so `eval/run.py --checkpoint best.pt` repeats these episodes.
    return evaluate_checkpoint(run.best_path, benchmark=cfg.benchmark, datapath=cfg.datapath, fold=cfg.fold,
                               nshot=cfg.nshot, episodes=cfg.test_episodes, seed=TEST_SEED, img_size=cfg.img_size,
                               backbone=cfg.backbone, attn_impl=cfg.attn_impl, amp=cfg.amp, workers=cfg.workers,
                               device=str(run.device), batch_size=cfg.bsz, json_path=run.logdir / "test.json",
                               progress=cfg.progress)
