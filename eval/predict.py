"""Segment your own images: K support images with their masks show what to find, every query image gets a
mask (PNG, 0/255, at the query's size) and an overlay picture. Masks are read as in the folder benchmark:
grey value >= 128 is foreground. docs/predict.md describes the outputs.

  python eval/predict.py --checkpoint best.pt --support part1.jpg part1.png --support part2.jpg part2.png \\
      --query photos/ --out predictions/

With a class name before each support (--support cat cat1.jpg cat1.png --support dog dog1.jpg dog1.png), every
query gets a label map (0 background, 1..N the classes in the order first given) with its legend instead.
"""

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
from dcama.config import AMP_MODES, ATTN_IMPLS
from dcama.flags import (ConfigError, FlagParser, check_at_least, check_checkpoint_model, check_file, check_supports,
                         error_line, one_line_warnings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a .pt/.pth file: ours (best.pt) or the authors' release")
    p.add_argument("--support", nargs="+", action="append", required=True, metavar="[CLASS] IMAGE MASK",
                   help="a support image and its mask; repeat for K shots. With a class name first, once per "
                        "support of each class: N classes in one label map")
    p.add_argument("--query", nargs="+", action="extend", required=True, metavar="FILE_OR_DIR_OR_GLOB",
                   help="query images: files, folders (their images, masks beside them left out) or glob patterns")
    p.add_argument("--out", required=True, help="output folder, new or empty unless --overwrite")
    p.add_argument("--img-size", type=int, default=None,
                   help="side the model runs at (default: the checkpoint's training size, else 384)")
    p.add_argument("--bsz", type=int, default=8, help="queries per forward pass (queries of one size batch together)")
    p.add_argument("--backbone", default=None, help="backbone the checkpoint must have (the authors' files)")
    p.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS)
    p.add_argument("--amp", default="off", choices=AMP_MODES)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_threads()
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds files: same-named results are replaced, others kept")
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="write the masks only")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Every flag checked before any file is read, torch included: ConfigError, one line naming the flag. An
    --img-size given without --backbone is checked against the checkpoint's backbone once the model is loaded,
    before any query runs; --device and --out by `predict_files`, before it reads anything."""
    check_file("checkpoint", args.checkpoint)
    check_checkpoint_model(args.backbone, args.img_size)
    check_at_least("bsz", args.bsz, 1)
    check_at_least("threads", args.threads, 0)
    check_supports(args.support)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_flags(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Segment the queries with checked flags; returns the exit status. Imports torch and the model here, once
    the flags are known to be good."""
    import torch

    if not torch.cuda.is_available():  # the Triton kernels can then only run in the interpreter, chosen before import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dcama.predict import RESULTS_FILE, SupportWarning, predict_files

    try:
        with one_line_warnings(SupportWarning):
            result = predict_files(args.checkpoint, args.support, args.query, args.out, img_size=args.img_size,
                                   batch_size=args.bsz, backbone=args.backbone, attn_impl=args.attn_impl,
                                   amp=args.amp, device=args.device, threads=args.threads, overwrite=args.overwrite,
                                   overlays=args.overlays, progress=args.progress)
    except (OSError, ValueError) as err:  # bad flags or input files, checkpoint errors, outputs not written
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped by SIGINT; the masks written so far are complete, {RESULTS_FILE} was not written",
              file=sys.stderr)
        return 130
    n, s = len(result["queries"]), result["settings"]
    kind, folder = ("label map", "labels") if "classes" in s else ("mask", "masks")
    shots = (f"{len(s['classes'])} classes, {len(s['supports'])} supports" if "classes" in s
             else f"{len(s['supports'])}-shot")
    print(f"{n} {kind}{'s' * (n != 1)} in {os.path.join(args.out, folder)}"
          + (f", overlays in {os.path.join(args.out, 'overlays')}" if args.overlays else "")
          + f", {RESULTS_FILE} ({shots} at {s['img_size']} px on {s['device']}, "
          f"{n / max(s['seconds'], 1e-9):.1f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
