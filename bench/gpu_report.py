"""The one command to run on a GPU machine: fills in every figure this project claims.

    python bench/gpu_report.py [--out gpu_report.md] [--quick] [--allow-cpu]

Runs, each in a subprocess with TRITON_INTERPRET removed from the environment:
  1. the CUDA parity tests (`python -m pytest -m cuda tests`, bf16 included),
  2. bench/attention.py (every shape, implementation, dtype and pass),
  3. bench/train_step.py (step time, peak memory, largest batch in 80 GiB),
  4. bench/kernel_report.py (every kernel configuration for sm_80 and sm_90),
and writes one markdown report with every table, the device, the software versions, and the design targets
checked against the measured rows. Without a GPU it refuses, unless --allow-cpu, which writes the subset a
CPU can measure (saved bytes, cost model, compile report), labelled as such; it never prints a time it did
not measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import REPO_ROOT, describe_peaks
from dcama.runtime import software_versions

# Design targets (docs/performance.md), at the Swin-B 1/8 training shape, fwd+bwd, K = 1.
TARGET_SHAPE = {"backbone": "swin_b", "stage": "1/8", "shots": 1, "pass": "fwd+bwd"}
TARGET_VS_NAIVE_FP32 = 15.0
TARGET_VS_BEST_PEER = 1.5
TARGET_OF_EXP_FLOOR = 1.5


def run_step(title: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    return {"title": title, "cmd": " ".join(["python", *args]), "rc": proc.returncode,
            "seconds": time.perf_counter() - start, "stdout": proc.stdout, "stderr": proc.stderr}


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """Each design target as MET / NOT MET / NOT MEASURED, from measured rows only."""
    shape = [r for r in rows if all(r[k] == v for k, v in TARGET_SHAPE.items())]

    def timed(impl: str, dtype: str) -> dict[str, Any] | None:
        hit = [r for r in shape if r["impl"] == impl and r["dtype"] == dtype and r["time_ms"] is not None]
        return hit[0] if hit else None

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    lines = []
    tri, naive = timed("triton", "fp32"), timed("naive", "fp32")
    if tri and naive:
        ratio = naive["time_ms"] / tri["time_ms"]
        lines.append(f"- fp32 fused vs naive: {ratio:.1f}x faster (target >= {TARGET_VS_NAIVE_FP32:g}x): "
                     f"{verdict(ratio >= TARGET_VS_NAIVE_FP32)}")
    else:
        lines.append("- fp32 fused vs naive: NOT MEASURED")
    for dtype in ("fp32", "bf16"):
        tri = timed("triton", dtype)
        peers = [r for r in shape
                 if r["dtype"] == dtype and r["time_ms"] is not None and r["impl"] not in ("triton", "naive")]
        if tri and peers:
            best = min(peers, key=lambda r: r["time_ms"])
            ratio = best["time_ms"] / tri["time_ms"]
            lines.append(f"- {dtype} fused vs best peer ({best['impl']}): {ratio:.2f}x faster "
                         f"(target >= {TARGET_VS_BEST_PEER:g}x): {verdict(ratio >= TARGET_VS_BEST_PEER)}")
        else:
            lines.append(f"- {dtype} fused vs best peer: NOT MEASURED")
        if tri:
            ratio = tri["time_ms"] / tri["floor_exp_ms"]
            lines.append(f"- {dtype} fused time / exponential floor: {ratio:.2f} (target <= {TARGET_OF_EXP_FLOOR:g}): "
                         f"{verdict(ratio <= TARGET_OF_EXP_FLOOR)}")
        else:
            lines.append(f"- {dtype} fused time / exponential floor: NOT MEASURED")
    return lines


def section(step: dict[str, Any]) -> str:
    status = "ok" if step["rc"] == 0 else f"FAILED (exit {step['rc']})"
    body = [f"## {step['title']}", "", f"`{step['cmd']}`: {status}, {step['seconds']:.0f} s", "",
            step["stdout"].strip()]
    if step["rc"] != 0 and step["stderr"].strip():
        body += ["", "```", step["stderr"].strip()[-4000:], "```"]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_report.md", help="markdown report to write")
    parser.add_argument("--quick", action="store_true",
                        help="the benches' --quick subsets and the sampled compile report")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, write the CPU-measurable subset")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    gpu = torch.cuda.is_available()  # the children run without TRITON_INTERPRET, compiled
    if not gpu and not args.allow_cpu:
        print("REFUSED: no CUDA device on this machine. This report needs a GPU to time anything. "
              "Run it on a GPU machine, or pass --allow-cpu for the CPU-measurable subset "
              "(saved bytes, cost model, compile report; no times).", file=sys.stderr)
        return 2
    quick = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        att_json, train_json = Path(tmp) / "attention.json", Path(tmp) / "train_step.json"
        steps = []
        if gpu:
            steps.append(run_step("CUDA parity tests", ["-m", "pytest", "-m", "cuda", "tests", "-q", "-rs"], env))
        steps.append(run_step("Attention benchmark", ["bench/attention.py", *quick, "--json", str(att_json)], env))
        steps.append(run_step("Training step", ["bench/train_step.py", *quick, "--json", str(train_json)], env))
        steps.append(run_step("Kernel compile report",
                              ["bench/kernel_report.py", *(["--sample"] if args.quick else [])], env))
        rows = json.loads(att_json.read_text()) if att_json.exists() else []
    versions = software_versions()
    head = [f"# DCAMA attention: {'GPU' if gpu else 'CPU-ONLY SUBSET (no GPU: no times, no peak memory)'} report",
            "", f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by "
            "`python bench/gpu_report.py"
            f"{' --quick' if args.quick else ''}`.", "", "| software | version |", "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in versions.items()], "", describe_peaks() + ".", "",
            "## Design targets (Swin-B 1/8, K = 1, fwd+bwd, dropout 0.5)", "", *check_targets(rows)]
    report = "\n".join(head) + "\n\n" + "\n\n".join(section(s) for s in steps) + "\n"
    Path(args.out).write_text(report)
    print(f"wrote {args.out}: " + ", ".join(f"{s['title']} {'ok' if s['rc'] == 0 else 'FAILED'}" for s in steps))
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
