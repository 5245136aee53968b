"""The one command to run on a GPU machine: fills in every figure this project claims.

    python bench/gpu_report.py [--out gpu_report.md] [--quick] [--allow-cpu] [--deadline-s SECONDS]

Runs, each in a subprocess with TRITON_INTERPRET removed from the environment:
  1. the CUDA parity tests (`python -m pytest -m cuda tests`, bf16 included),
  2. bench/attention.py (every shape, implementation, dtype and pass),
  3. bench/train_step.py (step time, peak memory, largest batch in 80 GiB),
  4. bench/kernel_report.py (every kernel configuration for sm_80 and sm_90),
and writes one markdown report with every table, the device, the software versions, and the design targets
checked against the measured rows, with the benches' JSON beside it. The report is rewritten after every step,
so an interrupted run keeps what finished; --deadline-s stops a step still running at that many seconds from the
start (its output so far goes in, marked) and skips the steps left, for a GPU lent by the minute. Without a GPU
it refuses, unless --allow-cpu, which writes the subset a CPU can measure (saved bytes, cost model, compile
report), labelled as such; it never prints a time it did not measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
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


def positive_seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def run_step(title: str, args: list[str], env: dict[str, str], seconds_left: float | None) -> dict[str, Any]:
    """Run one step to its end, or until `seconds_left` (None: no limit; <= 0: not started). A step stopped at the
    deadline is killed with every process it started (its own session), and keeps the output it wrote."""
    step = {"title": title, "cmd": " ".join(["python", *args]), "rc": None, "seconds": 0.0, "stdout": "",
            "stderr": "", "stopped": None}
    if seconds_left is not None and seconds_left <= 0:
        step["stopped"] = "not run: the deadline had passed"
        return step
    start = time.perf_counter()
    # Unbuffered: a Python child killed at the deadline would lose what sat in its pipe buffer.
    with subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=seconds_left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its workers (the compile report's processes)
            stdout, stderr = proc.communicate()
            step["stopped"] = f"stopped at the deadline after {seconds_left:.0f} s; its output so far"
        except BaseException:  # Ctrl-C: the terminal's signal does not reach the step's own session
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    step.update(rc=proc.returncode, stdout=stdout, stderr=stderr, seconds=time.perf_counter() - start)
    return step


def step_ok(step: dict[str, Any]) -> bool:
    return step["rc"] == 0 and step["stopped"] is None


def step_status(step: dict[str, Any]) -> str:
    return step["stopped"] or ("ok" if step["rc"] == 0 else f"FAILED (exit {step['rc']})")


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
    body = [f"## {step['title']}", "", f"`{step['cmd']}`: {step_status(step)}, {step['seconds']:.0f} s", "",
            step["stdout"].strip()]
    if not step_ok(step) and step["stderr"].strip():
        body += ["", "```", step["stderr"].strip()[-4000:], "```"]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_report.md", help="markdown report to write")
    parser.add_argument("--quick", action="store_true",
                        help="the benches' --quick subsets and the sampled compile report")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, write the CPU-measurable subset")
    parser.add_argument("--deadline-s", type=positive_seconds, metavar="SECONDS",
                        help="stop the step running at this many seconds after the first began, skip the rest")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.name or out.is_dir():
        parser.error(f"--out {args.out!r}: must name a file (the report; its JSON goes beside it)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    gpu = torch.cuda.is_available()  # the children run without TRITON_INTERPRET, compiled
    if not gpu and not args.allow_cpu:
        print("REFUSED: no CUDA device on this machine. This report needs a GPU to time anything. "
              "Run it on a GPU machine, or pass --allow-cpu for the CPU-measurable subset "
              "(saved bytes, cost model, compile report; no times).", file=sys.stderr)
        return 2
    quick = ["--quick"] if args.quick else []
    att_json, train_json = out.with_suffix(".attention.json"), out.with_suffix(".train_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, att_json, train_json):  # an earlier run's rows must not pass for this run's
        stale.unlink(missing_ok=True)
    plan = [("CUDA parity tests", ["-m", "pytest", "-m", "cuda", "tests", "-q", "-rs"])] if gpu else []
    plan += [("Attention benchmark", ["bench/attention.py", *quick, "--json", str(att_json)]),
             ("Training step", ["bench/train_step.py", *quick, "--json", str(train_json)]),
             ("Kernel compile report", ["bench/kernel_report.py", *(["--sample"] if args.quick else [])])]
    versions = software_versions()  # the report's header, the same after every step
    start, steps = time.perf_counter(), []
    for title, step_args in plan:
        left = None if args.deadline_s is None else args.deadline_s - (time.perf_counter() - start)
        steps.append(run_step(title, step_args, env, left))
        write_report(out, steps, gpu, args.quick, att_json, versions)
        print(f"{title}: {step_status(steps[-1])}, {steps[-1]['seconds']:.0f} s", flush=True)
    print("wrote " + ", ".join(str(p) for p in (out, att_json, train_json) if p.exists()))
    return 0 if all(step_ok(s) for s in steps) else 1


def write_report(out: Path, steps: list[dict[str, Any]], gpu: bool, quick: bool, att_json: Path,
                 versions: dict[str, str]) -> None:
    """The report of the steps run so far (rewritten after each)."""
    rows = json.loads(att_json.read_text()) if att_json.exists() else []
    head = [f"# DCAMA attention: {'GPU' if gpu else 'CPU-ONLY SUBSET (no GPU: no times, no peak memory)'} report",
            "", f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by "
            "`python bench/gpu_report.py"
            f"{' --quick' if quick else ''}`.", "", "| software | version |", "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in versions.items()], "", describe_peaks() + ".", "",
            "## Design targets (Swin-B 1/8, K = 1, fwd+bwd, dropout 0.5)", "", *check_targets(rows)]
    out.write_text("\n".join(head) + "\n\n" + "\n\n".join(section(s) for s in steps) + "\n")


if __name__ == "__main__":
    sys.exit(main())
