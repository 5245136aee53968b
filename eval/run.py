"""Evaluate a DCAMA checkpoint (this project's or the authors' released file) on a benchmark's test split:
prints per-class IoU, mIoU and FB-IoU. Without --benchmark it evaluates on the embedded shapes benchmark."""

from __future__ import annotations

import argparse
import os
import sys

try:
    import dcama  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout that was not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Torch-free: the flags are parsed and checked before torch is imported (in `run`), so that a flag error or
# --help takes a fraction of a second instead of the seconds torch and the model take to import.
from dcama.config import AMP_MODES, ATTN_IMPLS, BASELINES, BENCHMARK_DEFAULTS, EVAL_EPISODES, TEST_SEED
from dcama.flags import (ConfigError, FlagParser, check_at_least, check_benchmark, check_checkpoint_model,
                         check_file, check_seeds, error_line, unused_episodes_note)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = FlagParser(description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a .pt/.pth file: ours (best.pt, last.pt) or the authors' release")
    what.add_argument("--baseline", choices=BASELINES, help="score a trivial predictor instead of a model")
    p.add_argument("--benchmark", default="shapes", choices=list(BENCHMARK_DEFAULTS))
    p.add_argument("--datapath", default=None,
                   help="benchmark root folder; for folder, the folder of class folders (not needed for shapes)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--nshot", type=int, default=1)
    p.add_argument("--episodes", type=int, default=None,
                   help=f"default: {EVAL_EPISODES}; fss and folder take none (every test image is a query once)")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, default=TEST_SEED, help="the episodes' seed")
    seed.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="evaluate on each of these episode seeds: mean +- standard deviation, every seed in --json")
    p.add_argument("--img-size", type=int, default=None,
                   help="default: the size the checkpoint was trained at (ours; 384 for the authors'), else the "
                        "benchmark's")
    p.add_argument("--use-original-imgsize", action="store_true",
                   help="score at each query's original size (logits resized before the argmax)")
    p.add_argument("--backbone", default=None,
                   help="backbone the checkpoint must have (needed for the authors' files if not inferable)")
    p.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS)
    p.add_argument("--amp", default="off", choices=AMP_MODES)
    p.add_argument("--bsz", type=int, default=1, help="episodes per forward pass (1 with --use-original-imgsize)")
    p.add_argument("--workers", type=int, default=0)
    p.add_threads()
    p.add_argument("--json", dest="json_path", default=None, help="write the results and settings to this file")
    p.add_argument("--visualize", dest="visualize_dir", default=None, help="write one PNG per episode here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Every flag checked before anything is loaded, torch included: ConfigError, one line naming the flag.
    --json and --visualize are checked by `evaluate_checkpoint`, before it reads anything."""
    check_benchmark(args.benchmark, args.datapath, args.fold, args.nshot)
    check_file("checkpoint", args.checkpoint)
    check_checkpoint_model(args.backbone, args.img_size)
    for name, minimum in (("episodes", 1), ("seed", 0), ("bsz", 1), ("workers", 0), ("threads", 0)):
        check_at_least(name, getattr(args, name), minimum)
    check_seeds(args.seeds)
    if args.use_original_imgsize and args.bsz != 1:
        raise ConfigError(f"--bsz {args.bsz}: --use-original-imgsize needs --bsz 1 (the queries differ in size)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_flags(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = unused_episodes_note(args.benchmark, "episodes", args.episodes)
    if note:
        print(note, file=sys.stderr)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Evaluate with checked flags and print the scores; returns the exit status. Imports torch and the
    engine here, once the flags are known to be good."""
    import torch

    if not torch.cuda.is_available():  # the Triton kernels can then only run in the interpreter, chosen before import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dcama.evaluate import evaluate_checkpoint, format_result

    try:
        episodes = EVAL_EPISODES if args.episodes is None else args.episodes
        result = evaluate_checkpoint(
            args.checkpoint, benchmark=args.benchmark, datapath=args.datapath, fold=args.fold, nshot=args.nshot,
            episodes=episodes, seed=args.seed, seeds=args.seeds, use_original_imgsize=args.use_original_imgsize,
            img_size=args.img_size, backbone=args.backbone, attn_impl=args.attn_impl, amp=args.amp,
            baseline=args.baseline, workers=args.workers, threads=args.threads, batch_size=args.bsz,
            json_path=args.json_path, visualize_dir=args.visualize_dir, progress=args.progress)
    except (OSError, ValueError) as err:  # bad flags, files that cannot be read or written, checkpoint errors
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped by SIGINT: no scores were written (--visualize keeps the pictures drawn so far)",
              file=sys.stderr)
        return 130
    s = result["settings"]
    seeds = f"seed {s['seed']}" if s["seeds"] is None else f"seeds {' '.join(map(str, s['seeds']))}"
    print(f"{s['checkpoint'] or s['baseline']}: {s['benchmark']} fold {s['fold']} {s['nshot']}-shot, {seeds}")
    if s["data"].get("summary"):  # the folder benchmark's class split
        print(s["data"]["summary"])
    print(format_result(result))
    if args.json_path:
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
