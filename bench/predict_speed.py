"""Queries per second of eval/predict.py's model work, supports encoded once versus per batch, in one run.

    python bench/predict_speed.py [--json FILE] [--queries 32] [--bsz 8] [--img-size 96] [--threads 1]

"per batch" is what predict did before the support features were cached: every batch of B queries went
through `DCAMA.predict` as B whole episodes, so the backbone ran on the B queries and on B x K support
images, and N classes took N such runs. "encoded once" is `dcama.predict` now: the K supports of each class
through the backbone once (timed with the queries), each batch of queries through it once for all N classes,
then the head per class. Both give the same masks (tests/test_nway.py). A random ResNet-18 (weights change
no time); image reading and writing are left out. CPU timings of the machine it runs on: compare the rows of
one run (a shared machine may be loaded by other work).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from bench.common import markdown_table
from dcama.data.common import preprocess_image
from dcama.files import write_json
from dcama.model import DCAMA
from dcama.predict import SupportSet, class_margins, encode_classes, label_map

CASES = ((1, 1), (5, 1), (1, 3), (5, 3))  # (K shots per class, N classes)


def pictures(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def per_batch(model: DCAMA, classes: list[list[tuple[Image.Image, np.ndarray]]], queries: list[Image.Image],
              img_size: int, bsz: int) -> None:
    """The former path: each class's supports expanded to whole episodes, batch by batch."""
    for pairs in classes:
        shots = SupportSet.build(pairs, img_size)
        for start in range(0, len(queries), bsz):
            batch = queries[start:start + bsz]
            query = torch.stack([preprocess_image(q, img_size) for q in batch])
            model.predict(query, shots.images.expand(len(batch), -1, -1, -1, -1),
                          shots.masks.expand(len(batch), -1, -1, -1), out_size=(batch[0].height, batch[0].width))


def encoded_once(model: DCAMA, classes: list[list[tuple[Image.Image, np.ndarray]]], queries: list[Image.Image],
                 img_size: int, bsz: int) -> None:
    encoded = encode_classes(model, [(str(k), pairs) for k, pairs in enumerate(classes)], img_size)
    for start in range(0, len(queries), bsz):
        label_map(class_margins(model, encoded, queries[start:start + bsz], img_size))


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = DCAMA("resnet18", attn_impl="sdpa").eval()
    queries = pictures(args.queries, args.img_size, 0)
    mask = np.zeros((args.img_size, args.img_size), np.uint8)
    mask[: args.img_size // 2] = 1
    records = []
    for shots, n_classes in CASES:
        classes = [[(img, mask) for img in pictures(shots, args.img_size, 1 + c)] for c in range(n_classes)]
        row: dict[str, Any] = {"shots": shots, "classes": n_classes, "queries": args.queries, "bsz": args.bsz,
                               "img_size": args.img_size, "threads": torch.get_num_threads()}
        for name, run in (("per_batch", per_batch), ("encoded_once", encoded_once)):
            run(model, classes, queries[: args.bsz], args.img_size, args.bsz)  # warm-up
            start = time.perf_counter()
            run(model, classes, queries, args.img_size, args.bsz)
            row[f"{name}_queries_per_s"] = args.queries / (time.perf_counter() - start)
        row["speedup"] = row["encoded_once_queries_per_s"] / row["per_batch_queries_per_s"]
        records.append(row)
        print(f"K={shots} N={n_classes}: {row['per_batch_queries_per_s']:.1f} -> "
              f"{row['encoded_once_queries_per_s']:.1f} queries/s", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--bsz", type=int, default=8)
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        records = measure(args)
    fmt = lambda v: f"{v:.1f}"  # noqa: E731
    print(markdown_table(records, [("shots", "K", str), ("classes", "N", str),
                                   ("per_batch_queries_per_s", "per batch (queries/s)", fmt),
                                   ("encoded_once_queries_per_s", "encoded once (queries/s)", fmt),
                                   ("speedup", "speed-up", lambda v: f"{v:.2f}x")]))
    if args.json:
        write_json(args.json, {"records": records, "machine": "CPU", "torch": torch.__version__})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
