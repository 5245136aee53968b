"""Training engine: episodic DCAMA training in one process or under torchrun (DistributedDataParallel).

`train(TrainConfig(...))` is what `train/run.py` calls. A run is a few steps, one function each, in the order
`_train` calls them: build (data sets, model, optimiser), lock the run folder, resume, distribute, then every
epoch: train one epoch, validate, save, log; at the end, test the best checkpoint.

Checkpoints (docs/training.md, "Interruptions"): the end of every epoch writes `best.pt` when validation mIoU
improves, then `last.pt` (the commit point); inside an epoch `last.pt` is written between two steps every
`save_every_min` minutes and when SIGTERM, SIGINT or SIGUSR1 asks the run to stop. The file each write replaces
is kept as `last.prev.pt`. `last.pt` holds everything the rest of the run depends on: the settings, the trained
weights (the frozen backbone is the run folder's `backbone.pt`, written once), optimiser, gradient scaler, epochs
done and, inside an epoch, the steps done, the loss sum and every rank's metric counts; the best score; every
rank's RNG states. `best.pt` holds the whole model, for evaluation and publishing. The episodes of epoch e are a
pure function of (seed, e, i) and the sampler's order one of (seed, e), so a run killed at any step and resumed
reaches the same weights as one that never stopped. Epochs and steps are numbered from 1 in every line and file
a run writes.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .backbones import BACKBONES
from .checkpoint import (BACKBONE_FILE, CheckpointError, checkpoint_parts, load_checkpoint_file, load_fitting_state,
                         save_backbone, save_checkpoint, trained_img_size)
from .config import IGNORE_INDEX, TEST_SEED
from .data import FewShotDataset, build_dataset
from .evaluate import evaluate, evaluate_checkpoint, model_predictor
from .files import LOCK_NAME, FolderInUseError, folder_lock, write_json, write_jsonl
from .flags import ConfigError, flag, unused_episodes_note, write_failure
from .metrics import FewShotIoU
from .model import DCAMA
from .runtime import (EpochSampler, Interrupted, StopRequests, all_gather, any_rank, autocast_context, cpu_threads,
                      dist_info, from_rank0, gather_rng_states, ignore_stop_signals, move_batch, mute_stop_signals,
                      seed_everything, set_rng_state, setup_distributed, software_versions)
from .settings import TrainConfig, fill_defaults, in_use, previous_checkpoint, resolve_config, resumed_config, run_clash

__all__ = ["ConfigError", "InitModel", "NonFiniteLossError", "RunStopped", "TrainConfig", "TrainResult", "WriteError",
           "build_optimizer", "fill_defaults", "previous_checkpoint", "read_init", "resolve_config",
           "segmentation_loss", "train", "train_step", "trainable_parameters"]

TENSORBOARD_TAGS = {"train_loss": "train/loss", "train_miou": "train/miou", "train_fb_iou": "train/fb_iou",
                    "val_miou": "val/miou", "val_fb_iou": "val/fb_iou", "lr": "train/lr",
                    "episodes_per_s": "train/episodes_per_s"}
_STOP_NOTICE = ("{signal}: finishing the current step (or validation), then saving last.pt and stopping (a second "
                "signal before the save is done stops at once)")

# What only a resume reads, left out of best.pt (which is for evaluation and publishing, not for resuming).
_RESUME_ONLY = ("optimizer", "scaler", "rng")

EpochHook = Callable[[int, dict[str, Any]], None]
StepHook = Callable[[int, int], None]


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or inf; the last good checkpoint was left untouched."""


class WriteError(RuntimeError):
    """A file of the run could not be written (a full disk, a lost mount); the run stopped on every rank and
    the files written before are intact. `checkpoint`: the last good one (None when none was written)."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class RunStopped(Exception):
    """A stop signal ended the run between two steps, after `checkpoint` was written: resume from it."""

    def __init__(self, signal_name: str, checkpoint: Path, where: str) -> None:
        super().__init__(f"stopped by {signal_name} at {where}: saved {checkpoint}")
        self.signal_name, self.checkpoint, self.where = signal_name, checkpoint, where


@dataclass
class TrainResult:
    config: TrainConfig  # the settings the run used (a resumed run's: those it was started with, and its changes)
    logdir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_miou: float
    best_epoch: int | None
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] | None = None


@dataclass
class RunState:
    """Where a run stands: what its checkpoints record and a resume restores (besides weights and RNGs)."""

    epochs_done: int = 0
    best_miou: float = -1.0
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpochProgress:
    """How far the current epoch has come, between two steps. With this rank's metric counts and RNG state it
    is what a checkpoint written inside an epoch holds, so that a resume continues at the next step; the loss
    sum and the counts are the same on every rank."""

    steps: int = 0
    loss_sum: float = 0.0
    episodes: int = 0
    train_time_s: float = 0.0


@dataclass
class _InEpoch:
    """This rank's part of a checkpoint written inside an epoch, until that epoch starts again."""

    progress: EpochProgress
    metric: dict[str, torch.Tensor]
    rng: dict[str, Any]


class _SaveClock:
    """Rank 0's clock of `save_every_min`; every rank follows rank 0's reading (any_rank)."""

    def __init__(self, minutes: float) -> None:
        self.every_s = 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self.last >= self.every_s


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
    stop: StopRequests
    clock: _SaveClock
    state: RunState = field(default_factory=RunState)
    in_epoch: _InEpoch | None = None
    saved_at: str = ""  # what the checkpoint in last.pt holds ("" when the run has none yet)
    last_is_good: bool = True  # whether last.pt may become last.prev.pt at the next save (not when unreadable)
    resumed: _Resumed | None = None  # the checkpoint this start resumed from
    backbone_file: dict[str, str] | None = None  # the run folder's backbone.pt, which last.pt names (rank 0)

    @property
    def logdir(self) -> Path:
        return Path(self.cfg.logdir)

    @property
    def last_path(self) -> Path:
        return self.logdir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.logdir / "best.pt"

    def last_good(self) -> str:
        """Where the last good checkpoint is, for the messages of a run that stops."""
        return f"{self.last_path} ({self.saved_at})" if self.saved_at else "none was written yet"


@dataclass
class InitModel:
    """What a run fine-tunes from (--init): the checkpoint's model and the image side it was trained at."""

    model: DCAMA
    backbone: str
    img_size: int


def read_init(cfg: TrainConfig) -> InitModel:
    """The model of the --init checkpoint (ours or the authors', read once through `DCAMA.from_loaded`) and
    its training size (`trained_img_size`; the benchmark's for a file of ours that records none). A --backbone
    or --img-size that contradicts the checkpoint is refused (ConfigError); the flags that contradict any
    checkpoint are refused before it is read (`resolve_config`)."""
    filled = fill_defaults(cfg)
    blob = load_checkpoint_file(cfg.init)
    img_size = trained_img_size(blob, filled.img_size)
    model = DCAMA.from_loaded(blob, cfg.init, attn_impl=filled.attn_impl)
    del blob  # its tensors are the model's now
    backbone = model.config["backbone"]
    for name, given, held in (("backbone", cfg.backbone, backbone), ("img_size", cfg.img_size, img_size)):
        if given is not None and given != held:
            raise ConfigError(f"{flag(name)} {given}: --init {cfg.init} holds a model trained with {flag(name)} "
                              f"{held}; leave {flag(name)} out (it is taken from the checkpoint)")
    return InitModel(model, backbone, img_size)


def train(cfg: TrainConfig, on_epoch_end: EpochHook | None = None,
          on_step_end: StepHook | None = None) -> TrainResult:
    """Run (or resume) a training run; returns where the checkpoints are and what they reached.

    `on_step_end(epoch, step)` is called on every rank after each optimisation step, before the checkpoint
    that may follow it; `on_epoch_end(epoch, record)` after the epoch's checkpoints are written (epochs and
    steps from 1). An exception raised in a hook stops the run as a kill would.

    SIGTERM, SIGINT and SIGUSR1 are handled from the first line to the return, and the caller's handlers put
    back then: while the run is set up, and during the final test, a signal stops it at once; while it trains,
    the first one stops it after the current step and a checkpoint, a second one before that checkpoint is
    written stops it at once, and any after it is ignored.

    Raises ConfigError (bad settings, a folder in use, a checkpoint that cannot be resumed) before anything
    but the folder's lock file is written; NonFiniteLossError on a NaN/inf loss; WriteError when a file cannot
    be written; RunStopped when a signal stopped the run after a checkpoint; runtime.Interrupted when a signal
    stopped it at once.
    """
    with StopRequests() as stop:
        cfg = resolve_config(cfg)
        init = read_init(cfg) if cfg.init is not None else None
        if init is not None:  # the model's settings (FROM_INIT) are the checkpoint's
            cfg = dataclasses.replace(cfg, backbone=init.backbone, img_size=init.img_size)
        rank, world, device, owned_group = setup_distributed()
        try:
            cfg = from_rank0(cfg)  # one run folder: the default name holds rank 0's clock
            stop.notice = _STOP_NOTICE if rank == 0 else None
            return _train(cfg, rank, world, device, stop, init, on_epoch_end, on_step_end)
        except Interrupted as err:
            last = Path(cfg.logdir) / "last.pt"
            note = f"{last} holds the last save" if last.exists() else "no checkpoint was written"
            raise Interrupted(err.signum, note) from None
        finally:
            if owned_group:
                dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, stop: StopRequests, init: InitModel | None,
           on_epoch_end: EpochHook | None, on_step_end: StepHook | None) -> TrainResult:
    with _locked(cfg, rank):
        resumed = None
        if cfg.resume is not None:  # under the lock: a folder in use is refused before its checkpoint is read
            resumed = _read_resume_file(cfg, rank)
            cfg = _resumed_settings(cfg, resumed, rank)
        with cpu_threads(cfg.threads, device):
            run = _build(cfg, rank, world, device, stop, init)
            if resumed is not None:
                _resume(run, resumed)
            return _run_epochs(run, on_epoch_end, on_step_end)


def _run_epochs(run: _Run, on_epoch_end: EpochHook | None, on_step_end: StepHook | None) -> TrainResult:
    """The epochs left, then the test of the best checkpoint."""
    cfg, stop = run.cfg, run.stop
    with stop.deferred():  # a signal from here on stops the run after the current step, with a checkpoint
        net, sampler, loader = _distribute(run)
        writer = _start_logs(run)
        try:
            for epoch in range(run.state.epochs_done, cfg.epochs):
                record = _epoch(run, net, sampler, loader, epoch, on_step_end)
                _save_epoch(run, record)
                _log(run, writer, record)
                if on_epoch_end is not None:
                    on_epoch_end(epoch + 1, record)
                if any_rank(stop.requested is not None)[0]:
                    raise _stopped(run)
        finally:
            if writer is not None:
                with suppress(OSError):  # _log flushed (and checked) every epoch: closing writes nothing new
                    writer.close()
    test = _test(run) if cfg.test_episodes else None  # training is saved: a signal stops the test at once
    return TrainResult(config=cfg, logdir=run.logdir, best_checkpoint=run.best_path, last_checkpoint=run.last_path,
                       best_val_miou=run.state.best_miou, best_epoch=run.state.best_epoch, epochs=cfg.epochs,
                       history=run.state.history, test=test)


# ------------------------------------------------------------------------------------------------- build
def _build(cfg: TrainConfig, rank: int, world: int, device: torch.device, stop: StopRequests,
           init: InitModel | None) -> _Run:
    """Data sets, model (the `init` checkpoint's, else a new one), a new optimiser and gradient scaler, and
    every RNG seeded."""
    # Datasets first: a missing data set fails before any model is built.
    data_kw = dict(shot=cfg.nshot, img_size=cfg.img_size, use_original_imgsize=False, seed=cfg.seed)
    trn_kw = {} if cfg.episodes_per_epoch is None else {"episodes": cfg.episodes_per_epoch}
    try:
        trn_ds = build_dataset(cfg.benchmark, cfg.datapath, fold=cfg.fold, split="trn", **data_kw, **trn_kw)
        val_ds = build_dataset(cfg.benchmark, cfg.datapath, fold=cfg.fold, split="val", episodes=cfg.val_episodes,
                               **data_kw)
    except ValueError as err:  # what the data allows, e.g. a K that leaves no class with K + 1 images
        raise ConfigError(str(err)) from None
    note = unused_episodes_note(cfg.benchmark, "episodes_per_epoch", cfg.episodes_per_epoch)
    if note and rank == 0:
        print(note, flush=True)
    if cfg.backbone_weights is None and cfg.benchmark != "shapes" and cfg.resume is None and cfg.init is None \
            and rank == 0:
        print(f"note: no --backbone-weights: the {cfg.backbone} backbone stays randomly initialised (the published "
              f"recipe uses ImageNet weights, e.g. {BACKBONES[cfg.backbone].weights_file})", flush=True)
    # Same seed on every rank for the weights; per-rank streams afterwards for dropout.
    torch.manual_seed(cfg.seed)
    # Swin is built for one input size; ResNets take any multiple of 32, so their checkpoints stay size-free. A
    # resumed run's backbone comes from its checkpoint: the ImageNet file is not read again.
    if init is not None:
        model = init.model.to(device)
        if rank == 0:
            print(f"fine-tuning {cfg.init} ({cfg.backbone}, trained at {cfg.img_size} px) with a new optimiser and "
                  "schedule", flush=True)
    else:
        model = DCAMA(backbone=cfg.backbone, attn_impl=cfg.attn_impl,
                      backbone_weights=cfg.backbone_weights if cfg.resume is None else None,
                      img_size=cfg.img_size if BACKBONES[cfg.backbone].kind == "swin" else None).to(device)
    optimizer = build_optimizer(cfg, trainable_parameters(model))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    seed_everything(cfg.seed + rank)
    return _Run(cfg, rank, world, device, trn_ds, val_ds, model, optimizer, scaler, stop,
                _SaveClock(cfg.save_every_min))


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
@dataclass
class _Resumed:
    """The checkpoint a run resumes from: its entries, its path, whether the run's last.pt may be kept as
    last.prev.pt at the next save (not when it was unreadable), and the settings the resume changed."""

    blob: dict[str, Any]
    path: str
    last_is_good: bool = True
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _resume(run: _Run, resumed: _Resumed) -> None:
    """Weights, optimiser, scaler, progress and this rank's RNG streams (and, for a checkpoint written inside
    an epoch, its position there) from the checkpoint read to resume from."""
    blob, path = resumed.blob, resumed.path
    run.last_is_good, run.resumed = resumed.last_is_good, resumed
    _, state = checkpoint_parts(blob, path)  # last.pt: the trained part, and the run folder's frozen backbone
    load_fitting_state(run.model, state, f"checkpoint {path!r} does not fit this run's model")
    run.optimizer.load_state_dict(blob["optimizer"])
    if "scaler" in blob:
        run.scaler.load_state_dict(blob["scaler"])
    run.state = RunState(epochs_done=blob["epochs_done"], best_miou=blob["best_miou"],
                         best_epoch=blob["best_epoch"], history=list(blob.get("history", [])))
    run.saved_at = _where(run.cfg, blob)
    rng, in_epoch, same_world = blob["rng"], blob.get("in_epoch"), len(blob["rng"]) == run.world
    if not same_world and run.rank == 0:
        restart = f"; epoch {in_epoch['epoch']} starts again from its first step" if in_epoch else ""
        print(f"note: {path} was written by {len(rng)} process(es), this run has {run.world}: training continues "
              f"but will not repeat the uninterrupted run bit for bit{restart}", flush=True)
    mine = rng[run.rank] if same_world else rng[0]
    if in_epoch is not None and same_world:  # the RNGs are restored when that epoch starts again
        progress = EpochProgress(**{f.name: in_epoch[f.name] for f in dataclasses.fields(EpochProgress)})
        run.in_epoch = _InEpoch(progress, in_epoch["metric"][run.rank], mine)
    else:
        set_rng_state(mine)
    if run.rank == 0:
        left = "" if run.state.epochs_done < run.cfg.epochs else f"; all {run.cfg.epochs} epochs are done"
        print(f"resuming {path} ({run.saved_at}){left}", flush=True)


def _read_resume_file(cfg: TrainConfig, rank: int) -> _Resumed:
    """cfg.resume read, or the file kept before it when that one is unreadable."""
    path, previous = cfg.resume, previous_checkpoint(cfg.resume)
    try:
        return _Resumed(load_checkpoint_file(path), path)
    except (FileNotFoundError, CheckpointError) as err:
        if not previous.is_file():
            raise
        if rank == 0:
            print(f"note: {err}; resuming from the checkpoint before it, {previous}", flush=True)
        last_is_good = Path(path).resolve() != (Path(cfg.logdir) / "last.pt").resolve()  # never kept as last.prev.pt
        try:
            return _Resumed(load_checkpoint_file(previous), str(previous), last_is_good)
        except CheckpointError as prev_err:
            raise CheckpointError(f"{err}; the checkpoint before it is unreadable too: {prev_err}") from None


def _resumed_settings(cfg: TrainConfig, resumed: _Resumed, rank: int) -> TrainConfig:
    """The settings the run was started with (its checkpoint's), with the changes `cfg` may make (printed)."""
    blob, path = resumed.blob, resumed.path
    if "optimizer" not in blob:
        raise ConfigError(f"--resume {path}: it holds weights only (no optimiser state or progress); evaluate it "
                          "with eval/run.py --checkpoint instead")
    if "epochs_done" not in blob:
        raise ConfigError(f"--resume {path}: it was written by an earlier version of this code, whose progress "
                          "entries this one does not read; evaluate it with eval/run.py --checkpoint instead")
    out, resumed.changed = resumed_config(cfg, blob.get("train_config", {}), path, blob["epochs_done"])
    if resumed.changed and rank == 0:
        changes = "; ".join(f"{flag(name)}: {before} -> {after}" for name, (before, after) in resumed.changed.items())
        print(f"resuming with changed settings: {changes}", flush=True)
    return out


def _where(cfg: TrainConfig, blob: dict[str, Any]) -> str:
    """What a checkpoint holds, in words: 'epoch 3/8, step 57/200' or 'the end of epoch 2/8'."""
    in_epoch = blob.get("in_epoch")
    if in_epoch is not None:
        return f"epoch {in_epoch['epoch']}/{cfg.epochs}, step {in_epoch['steps']}/{in_epoch['epoch_steps']}"
    return f"the end of epoch {blob['epochs_done']}/{cfg.epochs}"


# ----------------------------------------------------------------------------------------- lock and data
@contextmanager
def _locked(cfg: TrainConfig, rank: int) -> Iterator[None]:
    """The run folder locked by rank 0 until the block ends, and the folder checked again under the lock: a
    second run there is refused on every rank (ConfigError) while this one is alive. A folder that cannot be
    written is a WriteError, on every rank."""
    logdir = Path(cfg.logdir)
    with ExitStack() as stack:
        def lock() -> str:
            try:
                stack.enter_context(folder_lock(logdir))
            except FolderInUseError as err:
                return in_use(logdir, err.holder)
            return run_clash(cfg)

        problem = from_rank0(_write_on_rank0(rank, logdir / LOCK_NAME, lock, "the run did not start", None))
        if problem:
            raise ConfigError(problem)
        yield


def _distribute(run: _Run) -> tuple[torch.nn.Module, EpochSampler, DataLoader]:
    """The model wrapped for DistributedDataParallel when there are several processes, and the training
    loader, whose sampler splits the episodes over the ranks (one process: all of them, shuffled)."""
    cfg, device = run.cfg, run.device
    net: torch.nn.Module = run.model
    if run.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = EpochSampler(run.trn_ds, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(run.trn_ds, batch_size=cfg.bsz, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", drop_last=len(sampler) >= cfg.bsz,
                        worker_init_fn=ignore_stop_signals)
    return net, sampler, loader


# --------------------------------------------------------------------------------------------- one epoch
def _epoch(run: _Run, net: torch.nn.Module, sampler: EpochSampler, loader: DataLoader, epoch: int,
           on_step_end: StepHook | None) -> dict[str, Any]:
    """Train one epoch (from where a checkpoint inside it left off), validate, update the best score; returns
    the epoch's record (a metrics.jsonl line)."""
    run.trn_ds.set_epoch(epoch)
    sampler.set_epoch(epoch)
    train_stats = _train_epoch(run, net, sampler, loader, epoch, on_step_end)
    if not all(torch.isfinite(p).all().item() for p in trainable_parameters(run.model)):
        raise NonFiniteLossError(f"the weights became NaN or inf during epoch {epoch + 1}; "
                                 f"the last good checkpoint is {run.last_good()}")
    t0 = time.perf_counter()
    val = _validate(run, epoch)
    state = run.state
    state.epochs_done = epoch + 1
    if val["miou"] > state.best_miou:
        state.best_miou, state.best_epoch = val["miou"], epoch + 1
    record = {"epoch": epoch + 1, **train_stats, "val_miou": val["miou"], "val_fb_iou": val["fb_iou"],
              "best_val_miou": state.best_miou, "best_epoch": state.best_epoch,
              "lr": run.optimizer.param_groups[0]["lr"],
              "epoch_time_s": round(train_stats["train_time_s"] + time.perf_counter() - t0, 3)}
    state.history.append(record)
    return record


def _train_epoch(run: _Run, net: torch.nn.Module, sampler: EpochSampler, loader: DataLoader, epoch: int,
                 on_step_end: StepHook | None) -> dict[str, Any]:
    cfg = run.cfg
    net.train()
    metric = FewShotIoU(run.trn_ds.class_ids, device=run.device)
    progress, resumed, run.in_epoch = EpochProgress(), run.in_epoch, None
    if resumed is not None:
        progress = resumed.progress
        metric.load_state_dict(resumed.metric)
    sampler.start = progress.steps * cfg.bsz
    batches = iter(loader)  # draws the loader's seed from torch's RNG, as at the start of every epoch...
    if resumed is not None:
        set_rng_state(resumed.rng)  # ...so the streams saved between two steps are restored after that draw
    epoch_steps = progress.steps + len(loader)
    bar = tqdm(batches, total=epoch_steps, initial=progress.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not cfg.progress or run.rank != 0, dynamic_ncols=True)
    tick = time.perf_counter()
    for batch in bar:
        _step(run, net, batch, metric, progress, epoch)
        progress.train_time_s += time.perf_counter() - tick
        if on_step_end is not None:
            on_step_end(epoch + 1, progress.steps)
        _between_steps(run, epoch, epoch_steps, progress, metric)
        if not bar.disable:
            bar.set_postfix(loss=f"{progress.loss_sum / progress.steps:.4f}", miou=f"{metric.compute()['miou']:.1f}",
                            eps=f"{progress.episodes / max(progress.train_time_s, 1e-9):.1f}/s")
        tick = time.perf_counter()
    metric.all_reduce()
    scores = metric.compute()
    return {"train_loss": progress.loss_sum / max(progress.steps, 1), "train_miou": scores["miou"],
            "train_fb_iou": scores["fb_iou"], "steps": progress.steps,
            "episodes_per_s": progress.episodes / progress.train_time_s if progress.train_time_s > 0 else math.nan,
            "train_time_s": round(progress.train_time_s, 3)}


def _step(run: _Run, net: torch.nn.Module, batch: dict[str, Any], metric: FewShotIoU, progress: EpochProgress,
          epoch: int) -> None:
    """One optimisation step, counted in `progress` and `metric`."""
    cfg = run.cfg
    batch = move_batch(batch, run.device)
    target = batch["query_mask"]
    try:
        logits, mean_loss = train_step(net, batch, run.optimizer, run.scaler, amp=cfg.amp, fg_weight=cfg.fg_weight)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err} at epoch {epoch + 1}, step {progress.steps + 1}; stopped without saving, "
                                 f"the last good checkpoint is {run.last_good()}") from None
    metric.update(logits.detach().argmax(1), target, batch["class_id"])
    progress.loss_sum += mean_loss.item()
    progress.steps += 1
    progress.episodes += target.shape[0] * run.world


def _between_steps(run: _Run, epoch: int, epoch_steps: int, progress: EpochProgress, metric: FewShotIoU) -> None:
    """`last.pt` written when rank 0's clock says so or a signal asked to stop (every rank takes rank 0's
    clock and any rank's signal), then RunStopped when asked to stop."""
    save, stop = any_rank(run.rank == 0 and run.clock.due(), run.stop.requested is not None)
    if not (save or stop):
        return
    where = f"epoch {epoch + 1}/{run.cfg.epochs}, step {progress.steps}/{epoch_steps}"
    in_epoch = {"epoch": epoch + 1, "epoch_steps": epoch_steps, **dataclasses.asdict(progress),
                "metric": all_gather(metric.state_dict())}
    extra = {**_progress_entries(run), "rng": gather_rng_states(), "in_epoch": in_epoch}
    _write_checkpoint(run, run.last_path, extra, where)
    if stop:
        raise _stopped(run)


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
                    workers=cfg.workers, progress=cfg.progress, desc=f"val {epoch + 1}/{cfg.epochs}")


# ------------------------------------------------------------------------------------------ save and log
def _progress_entries(run: _Run) -> dict[str, Any]:
    """What every checkpoint of the run holds besides the model and the RNGs."""
    state = run.state
    entries = {"epochs_done": state.epochs_done, "best_miou": state.best_miou, "best_epoch": state.best_epoch,
               "optimizer": run.optimizer.state_dict(), "history": state.history,
               "train_config": dataclasses.asdict(run.cfg)}
    if run.cfg.amp == "fp16":
        entries["scaler"] = run.scaler.state_dict()
    return entries


def _save_epoch(run: _Run, record: dict[str, Any]) -> None:
    """At the end of an epoch: `best.pt` when this epoch is the best so far, then `last.pt`, then metrics.jsonl.

    `last.pt` is the commit point: a kill between the two writes leaves the previous `last.pt`, so the resumed
    run redoes this epoch and writes `best.pt` again. A stop asked for earlier (during validation) is saved
    with `last.pt` (`_write_checkpoint`), and the epoch's bookkeeping still finishes."""
    extra = {**_progress_entries(run), "rng": gather_rng_states(),
             "val": {"miou": record["val_miou"], "fb_iou": record["val_fb_iou"]}}
    if run.state.best_epoch == record["epoch"]:  # the whole model, without what only a resume needs
        _write_checkpoint(run, run.best_path, {k: v for k, v in extra.items() if k not in _RESUME_ONLY})
    _write_checkpoint(run, run.last_path, extra, f"the end of epoch {record['epoch']}/{run.cfg.epochs}")
    # Rewritten whole from the checkpoint's history, so it always agrees with last.pt, even when a run was
    # killed between the two writes and resumed.
    metrics = run.logdir / "metrics.jsonl"
    _on_rank0(run, metrics, lambda: write_jsonl(metrics, run.state.history))


def _write_checkpoint(run: _Run, path: Path, extra: dict[str, Any], where: str | None = None) -> None:
    """A checkpoint written by rank 0; `where` (what it holds) marks `last.pt`, whose predecessor is kept and
    which holds the trained part of the model only (the frozen backbone is the run folder's backbone.pt);
    best.pt holds the whole model. A `last.pt` written while a stop is asked for is the stop's save: from then
    on the stop signals are ignored, so no later signal changes how the run ends (exit status 75)."""
    previous = previous_checkpoint(path) if where is not None and run.last_is_good else None
    shared = run.backbone_file if where is not None else None
    _on_rank0(run, path, lambda: save_checkpoint(path, run.model, extra=extra, previous=previous,
                                                 backbone_file=shared))
    if where is not None:
        run.saved_at, run.last_is_good = where, True
        run.clock.reset()
        if run.stop.requested is not None:
            mute_stop_signals()


def _on_rank0(run: _Run, path: Path, write: Callable[[], Any], folder: bool = False) -> Any:
    """`write()` of a file (or folder) of the run on rank 0 (`_write_on_rank0`); a failure says that the run
    stopped and where its last good checkpoint is. A collective."""
    after = f"the run stopped, the files written before are intact (last good checkpoint: {run.last_good()})"
    return _write_on_rank0(run.rank, path, write, after, run.last_path if run.saved_at else None, folder)


def _write_on_rank0(rank: int, path: Path, write: Callable[[], Any], after: str, checkpoint: Path | None,
                    folder: bool = False) -> Any:
    """`write()` of the file (or folder) `path` on rank 0 only (its result there, None elsewhere), and every
    rank told whether it worked: an OSError (a full disk, no permission, a lost mount) becomes WriteError on
    every rank, the line every command gives for a failed write (flags.write_failure), then `after`, and
    `checkpoint`, the last good one; so that none waits for the others forever. A collective. `write()` writes
    files only: what it printed would be taken for the file's failure."""
    result, failure = None, ""
    if rank == 0:
        try:
            result = write()
        except OSError as err:
            failure = write_failure(path, err, folder)
    failure = from_rank0(failure)
    if failure:
        raise WriteError(f"{failure}; {after}", checkpoint)
    return result


def _stopped(run: _Run) -> RunStopped:
    """How the run ends once a stop's checkpoint is written. From here until train() returns (and restores the
    caller's handlers) the stop signals are ignored: the save is done, so no later signal changes the outcome."""
    mute_stop_signals()
    requested = run.stop.requested
    name = signal.Signals(requested).name if requested is not None else "a signal to another process"
    return RunStopped(name, run.last_path, run.saved_at)


def _start_logs(run: _Run) -> SummaryWriter | None:
    """On rank 0: the run folder named, this start's settings (config.json, then config.2.json, ... for each
    later start: none is overwritten), the frozen backbone (backbone.pt, once) and the TensorBoard writer."""
    trainable = sum(p.numel() for p in trainable_parameters(run.model))
    data = run.trn_ds.describe()  # what the data set says of itself: the folder benchmark's class split
    resumed = run.resumed
    start = {"resumed_from": resumed and resumed.path, "changed": resumed.changed if resumed else {}}
    run_config = {"train": dataclasses.asdict(run.cfg), "start": start, "model": dict(run.model.config),
                  "world_size": run.world, "device": str(run.device), "trainable_params": trainable,
                  "train_episodes_per_epoch": len(run.trn_ds), "data": data, "versions": software_versions()}

    if run.rank == 0:
        print(f"run folder: {run.logdir}", flush=True)
        if data.get("summary"):
            print(data["summary"], flush=True)
    config_path, tensorboard, backbone = _start_config_path(run.logdir), run.logdir / "tensorboard", \
        run.logdir / BACKBONE_FILE
    _on_rank0(run, config_path, lambda: write_json(config_path, run_config))
    run.backbone_file = _on_rank0(run, backbone, lambda: save_backbone(backbone, run.model))
    return _on_rank0(run, tensorboard, lambda: SummaryWriter(str(tensorboard)), folder=True)


def _start_config_path(logdir: Path) -> Path:
    """Where this start's settings go: config.json for the first start of the run folder, config.<n>.json for
    the n-th."""
    path, n = logdir / "config.json", 1
    while path.exists():
        n += 1
        path = logdir / f"config.{n}.json"
    return path


def _log(run: _Run, writer: SummaryWriter | None, record: dict[str, Any]) -> None:
    """The epoch's scalars to TensorBoard and its summary line to stdout (rank 0 only). A collective."""
    def write() -> None:
        for key, tag in TENSORBOARD_TAGS.items():
            writer.add_scalar(tag, record[key], record["epoch"])
        writer.flush()  # raises what the writer's thread met (a full disk)

    _on_rank0(run, run.logdir / "tensorboard", write, folder=True)
    if run.rank == 0:  # outside _on_rank0: a closed stdout is not a failed write of the run folder
        epochs = run.cfg.epochs
        print(f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}  train mIoU "
              f"{record['train_miou']:.2f}  val mIoU {record['val_miou']:.2f}  val FB-IoU {record['val_fb_iou']:.2f}  "
              f"(best {record['best_val_miou']:.2f} at epoch {record['best_epoch']}/{epochs})  "
              f"{record['episodes_per_s']:.1f} episodes/s", flush=True)


# ------------------------------------------------------------------------------------------------- test
def _test(run: _Run) -> dict[str, Any]:
    """The best checkpoint on the test split, written to test.json."""
    cfg = run.cfg
    # The protocol's fixed test seed, so `eval/run.py --checkpoint best.pt` repeats these episodes.
    result = evaluate_checkpoint(run.best_path, benchmark=cfg.benchmark, datapath=cfg.datapath, fold=cfg.fold,
                                 nshot=cfg.nshot, episodes=cfg.test_episodes, seed=TEST_SEED, img_size=cfg.img_size,
                                 backbone=cfg.backbone, attn_impl=cfg.attn_impl, amp=cfg.amp, workers=cfg.workers,
                                 threads=cfg.threads, device=str(run.device), batch_size=cfg.bsz,
                                 progress=cfg.progress)
    path = run.logdir / "test.json"
    _on_rank0(run, path, lambda: write_json(path, result))
    return result
