"""Training engine: episodic DCAMA training in one process or under torchrun (DistributedDataParallel).

`train(TrainConfig(...))` is what `train/run.py` calls. Each epoch trains on the benchmark's training classes,
validates on a fixed set of episodes (fixed seed), and writes `last.pt` and, when validation mIoU improves,
`best.pt` (atomic writes). A checkpoint holds everything the next epoch depends on (weights, optimiser,
gradient scaler, epoch, best score, every rank's RNG states) and the episodes of epoch e are a pure function
of (seed, e, i), so a run killed and resumed reaches the same weights as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dcama.backbones import BACKBONES
from dcama.checkpoint import load_checkpoint_file, save_checkpoint
from dcama.data import build_dataset
from dcama.evaluate import autocast_context, dist_info, evaluate, evaluate_checkpoint, model_predictor, move_batch
from dcama.files import atomic_open, write_json
from dcama.metrics import FewShotIoU
from dcama.model import DCAMA

# Real benchmarks follow the published recipe (spec section 3). "shapes" is the embedded synthetic benchmark,
# tuned so that `python train/run.py` learns on 2 CPU cores in a few minutes with a random frozen ResNet-18.
BENCHMARK_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(backbone="swin_b", img_size=384, bsz=12, optimizer="sgd", lr=1e-3, weight_decay=1e-4, fg_weight=1.0,
               epochs=50, episodes_per_epoch=None, val_episodes=1000, test_episodes=0, workers=8, threads=None)
    for name in ("coco", "pascal", "fss")
}
# Tuned on the shared 2-core CPU VM (README: test mIoU 62.3 in 8 min 20 s): 96 px, because at 64 px the run
# plateaus near 37; one thread, because two were several times slower whenever anything else ran; foreground
# weight 4, because with plain cross-entropy (~8% foreground pixels) the model predicted background everywhere
# for the few hundred steps this budget allows.
BENCHMARK_DEFAULTS["shapes"] = dict(backbone="resnet18", img_size=96, bsz=8, optimizer="adamw", lr=1e-3,
                                    weight_decay=1e-4, fg_weight=4.0, epochs=8, episodes_per_epoch=400,
                                    val_episodes=100, test_episodes=1000, workers=0, threads=1)
OPTIMIZERS = ("sgd", "adamw")
TENSORBOARD_TAGS = {"train_loss": "train/loss", "train_miou": "train/miou", "train_fb_iou": "train/fb_iou",
                    "val_miou": "val/miou", "val_fb_iou": "val/fb_iou", "lr": "train/lr",
                    "episodes_per_s": "train/episodes_per_s"}
AMP_MODES = ("off", "bf16", "fp16")


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


# ----------------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (index = rank), so that a resumed DDP run continues each rank's streams."""
    rank, world = dist_info()
    if world == 1:
        return [_rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


# ----------------------------------------------------------------------------------------------- set-up
def _setup_distributed() -> tuple[int, int, torch.device, bool]:
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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "timm", "dcama-triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_resume_matches(blob: dict[str, Any], cfg: TrainConfig, model_config: dict[str, Any], path: str,
                          rank: int) -> None:
    saved = blob.get("config", {}).get("backbone")
    if saved != model_config["backbone"]:
        raise ConfigError(f"cannot resume from {path}: it was trained with backbone={saved!r}, "
                          f"this run asks for backbone={model_config['backbone']!r}")
    if "optimizer" not in blob or "epoch" not in blob:
        raise ConfigError(f"cannot resume from {path}: it holds weights only (no optimiser state or epoch); "
                          "to start from these weights evaluate them with eval/run.py instead")
    # Settings that change what the remaining epochs compute (the optimiser's own, e.g. lr, come from the file).
    before = blob.get("train_config", {})
    changed = [k for k in ("benchmark", "fold", "img_size", "bsz", "nshot", "seed", "episodes_per_epoch",
                           "fg_weight", "amp", "optimizer") if k in before and before[k] != getattr(cfg, k)]
    if changed and rank == 0:
        print(f"note: resuming {path} with different {', '.join(changed)} than it was trained with; "
              "the run will not repeat an uninterrupted one", flush=True)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    # Rewritten whole from the checkpoint's history (atomically), so it always agrees with last.pt, even when
    # a run was killed between the two writes and resumed.
    with atomic_open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all().item() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run (or resume) a training run; returns where the checkpoints are and what they reached.

    `on_epoch_end(epoch, record)` is called on every rank after the epoch's checkpoints are written (an
    exception raised there stops the run as a kill would). Raises NonFiniteLossError on a NaN/inf loss.
    """
    cfg = resolve_config(cfg)
    rank, world, device, owned_group = _setup_distributed()
    threads = torch.get_num_threads()
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, rank, world, device, on_epoch_end)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        if owned_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    logdir = Path(cfg.logdir)
    last_path, best_path = logdir / "last.pt", logdir / "best.pt"
    if cfg.resume is None and last_path.exists():
        raise ConfigError(f"{logdir} already holds a run ({last_path.name}); pass --resume to continue it "
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(cfg, params)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    start_epoch, best_miou, best_epoch, history = 0, -1.0, -1, []
    if cfg.resume is not None:
        blob = load_checkpoint_file(cfg.resume)
        _check_resume_matches(blob, cfg, model.config, cfg.resume, rank)
        model.load_state_dict(blob["state_dict"])
        optimizer.load_state_dict(blob["optimizer"])
        if "scaler" in blob:
            scaler.load_state_dict(blob["scaler"])
        start_epoch, best_miou, best_epoch = blob["epoch"] + 1, blob["best_miou"], blob["best_epoch"]
        history = list(blob.get("history", []))
        rng = blob["rng"]
        if len(rng) != world and rank == 0:
            print(f"note: {cfg.resume} was written by {len(rng)} process(es), this run has {world}: "
                  "training continues but will not repeat the uninterrupted run bit for bit")
        _set_rng_state(rng[rank] if len(rng) == world else rng[0])

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(trn_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(trn_ds, batch_size=cfg.bsz, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", drop_last=len(sampler) >= cfg.bsz)

    writer = None
    if rank == 0:
        logdir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(logdir / "tensorboard"))
        run_config = {"train": dataclasses.asdict(cfg), "model": dict(model.config), "world_size": world,
                      "device": str(device), "trainable_params": sum(p.numel() for p in params),
                      "train_episodes_per_epoch": len(trn_ds), "versions": _versions()}
        write_json(logdir / "config.json", run_config)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            trn_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            train_stats = _train_epoch(cfg, net, loader, optimizer, scaler, trn_ds.class_ids, device, epoch,
                                       world, rank, last_path)
            if not _all_finite(model):
                raise NonFiniteLossError(f"the weights became NaN or inf during epoch {epoch}; "
                                         f"the last good checkpoint is {last_path}")
            train_time = time.perf_counter() - t0
            model.eval()
            val = evaluate(model_predictor(model, amp=cfg.amp), val_ds, device=device, batch_size=cfg.bsz,
                           workers=cfg.workers, progress=cfg.progress, desc=f"val {epoch}")
            is_best = val["miou"] > best_miou
            if is_best:
                best_miou, best_epoch = val["miou"], epoch
            record = {"epoch": epoch, **train_stats, "val_miou": val["miou"], "val_fb_iou": val["fb_iou"],
                      "best_val_miou": best_miou, "best_epoch": best_epoch, "lr": optimizer.param_groups[0]["lr"],
                      "train_time_s": round(train_time, 3), "epoch_time_s": round(time.perf_counter() - t0, 3)}
            history.append(record)
            rng = _gather_rng_states()  # collective: every rank takes part, rank 0 writes
            if rank == 0:
                extra = {"epoch": epoch, "best_miou": best_miou, "best_epoch": best_epoch,
                         "optimizer": optimizer.state_dict(), "rng": rng, "history": history,
                         "train_config": dataclasses.asdict(cfg), "val": {k: val[k] for k in ("miou", "fb_iou")}}
                if cfg.amp == "fp16":
                    extra["scaler"] = scaler.state_dict()
                save_checkpoint(str(last_path), model, extra=extra)
                if is_best:
                    save_checkpoint(str(best_path), model, extra=extra)
                _write_jsonl(logdir / "metrics.jsonl", history)
                for key, tag in TENSORBOARD_TAGS.items():
                    writer.add_scalar(tag, record[key], epoch)
                writer.flush()
                print(f"epoch {epoch}: loss {record['train_loss']:.4f}  train mIoU {record['train_miou']:.2f}  "
                      f"val mIoU {val['miou']:.2f}  val FB-IoU {val['fb_iou']:.2f}  (best {best_miou:.2f} at "
                      f"epoch {best_epoch})  {record['episodes_per_s']:.1f} episodes/s", flush=True)
            if world > 1:
                dist.barrier()  # nobody starts the next epoch (or a resume) before the files exist
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    finally:
        if writer is not None:
            writer.close()

    test = None
    if cfg.test_episodes:
        # The protocol's fixed test seed (0), so `eval/run.py --checkpoint best.pt` repeats these episodes.
        test = evaluate_checkpoint(best_path, benchmark=cfg.benchmark, datapath=cfg.datapath, fold=cfg.fold,
                                   nshot=cfg.nshot, episodes=cfg.test_episodes, seed=0, img_size=cfg.img_size,
                                   backbone=cfg.backbone, attn_impl=cfg.attn_impl, amp=cfg.amp, workers=cfg.workers,
                                   device=str(device), batch_size=cfg.bsz, json_path=logdir / "test.json",
                                   progress=cfg.progress)
    return TrainResult(logdir=logdir, best_checkpoint=best_path, last_checkpoint=last_path,
                       best_val_miou=best_miou, best_epoch=best_epoch, history=history, test=test)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, fg_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy over the 2 logits per pixel (spec section 3); 255 marks pixels to ignore (PASCAL).

    fg_weight != 1 weights the foreground class (a weighted mean over pixels): the published recipe uses 1.
    """
    weight = None if fg_weight == 1.0 else torch.tensor([1.0, fg_weight], device=logits.device)
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=255)


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


def _train_epoch(cfg: TrainConfig, net: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, class_ids: list[int], device: torch.device, epoch: int, world: int,
                 rank: int, last_path: Path) -> dict[str, Any]:
    net.train()
    metric = FewShotIoU(class_ids, device=device)
    loss_sum, steps, episodes = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True)
    for step, batch in enumerate(bar):
        batch = move_batch(batch, device)
        target = batch["query_mask"]
        try:
            logits, mean_loss = train_step(net, batch, optimizer, scaler, amp=cfg.amp, fg_weight=cfg.fg_weight)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err} at epoch {epoch}, step {step}; stopped without saving, the last "
                                     f"good checkpoint is {last_path} "
                                     f"({'present' if last_path.exists() else 'none written yet'})") from None
        metric.update(logits.detach().argmax(1), target, batch["class_id"])
        loss_sum += mean_loss.item()
        steps += 1
        episodes += target.shape[0] * world
        if bar.disable:
            continue
        with warnings.catch_warnings():  # early in an epoch most classes have no episode yet: expected
            warnings.simplefilter("ignore")
            running_miou = metric.compute()["miou"]
        bar.set_postfix(loss=f"{loss_sum / steps:.4f}", miou=f"{running_miou:.1f}",
                        eps=f"{episodes / (time.perf_counter() - t0):.1f}/s")
    metric.all_reduce()
    with warnings.catch_warnings():  # a short epoch may not visit every training class
        warnings.simplefilter("ignore")
        scores = metric.compute()
    elapsed = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(steps, 1), "train_miou": scores["miou"], "train_fb_iou": scores["fb_iou"],
            "steps": steps, "episodes_per_s": episodes / elapsed if elapsed > 0 else math.nan}

