"""Compile report of the fused DCAMA attention kernels, no GPU needed.

    python bench/kernel_report.py [--json FILE] [--archs 80 90] [--jobs 2]

Compiles every kernel configuration the op can launch (`kernels.attention.kernel_compile_specs()`)
for sm_80 (Ampere) and sm_90 (Hopper) with `triton.compile(..., target=GPUTarget("cuda", cc, 32))`, then
reads the cubin with the CUDA tools bundled in the triton wheel: `ptxas -v` (run again on the PTX with the
flags Triton uses, so it builds the same cubin) for registers and spills, and `cuobjdump -sass` for the
tensor-core instructions (HMMA on Ampere, HGMMA on Hopper) and the count of MUFU.EX2 (the exponential unit).
Shared memory is the dynamic shared memory Triton launches the kernel with, plus any static shared memory.
Exits with status 1 when a configuration fails to compile.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table
from dcama.files import write_json

ARCHS = (80, 90)
# Largest shared memory one block may use (CUDA C Programming Guide, compute capabilities table).
MAX_SHARED_BYTES = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
RECORD_KEYS = ("kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "mma", "mufu_ex2")
MMA_RE = re.compile(r"\b((?:HGMMA|HMMA|UTCHMMA|UTCQMMA)\.[\w.]+)")


@lru_cache(maxsize=1)
def _specs() -> list[dict[str, Any]]:
    from kernels.attention import kernel_compile_specs

    specs = list(kernel_compile_specs())
    for spec in specs:
        if not hasattr(spec["fn"], "src") or type(spec["fn"]).__name__ == "InterpretedFunction":
            raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; run this report without it")
    return specs


def _config(spec: dict[str, Any]) -> dict[str, Any]:
    config = dict(spec["config"])
    config.setdefault("num_warps", spec["num_warps"])
    config.setdefault("num_stages", spec["num_stages"])
    return config


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this triton wheel does not bundle {name}")
    return str(path)


def parse_ptxas(log: str) -> dict[str, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    if regs is None or spill is None:
        raise ValueError(f"unexpected ptxas -v output:\n{log}")
    return {"registers": int(regs.group(1)), "spill_bytes": int(spill.group(1)) + int(spill.group(2)),
            "static_smem": int(smem.group(1)) if smem else 0}


def parse_sass(sass: str) -> dict[str, Any]:
    return {"mma": sorted(set(MMA_RE.findall(sass))), "mufu_ex2": len(re.findall(r"\bMUFU\.EX2\b", sass))}


def _ptxas_log(kernel: Any, cc: int, captured: str) -> str:
    """The `ptxas -v` log of this cubin: the one Triton printed while compiling (TRITON_DUMP_PTXAS_LOG), or,
    when the cubin came from Triton's cache, ptxas run again on the PTX with the flags Triton uses
    (triton/backends/nvidia/compiler.py make_cubin), which rebuilds the same cubin."""
    if "Used" in captured and "registers" in captured:
        return captured
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        return subprocess.run([_tool("ptxas"), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(cc)}", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True).stderr


def compile_one(index: int, cc: int) -> dict[str, Any]:
    """Compile spec `index` for compute capability `cc`; return its report record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _specs()[index]
    src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"])
    captured = io.StringIO()
    with redirect_stdout(captured):  # Triton prints the ptxas log to stdout
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    usage = parse_ptxas(_ptxas_log(kernel, cc, captured.getvalue()))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    return {"kernel": spec["name"], "arch": f"sm_{cc}", "config": _config(spec),
            "registers": usage["registers"], "spill_bytes": usage["spill_bytes"],
            "shared_bytes": int(kernel.metadata.shared) + usage["static_smem"], **parse_sass(sass)}


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def sample_indices(specs: list[dict[str, Any]]) -> list[int]:
    """A subset that compiles every block configuration once: specs are grouped by everything but the
    variant (dtype, dot precision, dropout bits); group g takes its (g mod n)-th variant, so the subset
    also covers every variant. Kernels without variants (one spec per group) are all kept."""
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        key = {k: v for k, v in _config(spec).items() if k not in ("dtype", "dot_precision", "drop_bits")}
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(i)
    return sorted(members[g % len(members)] for g, members in enumerate(groups.values()))


def build_report(archs: tuple[int, ...] = ARCHS, jobs: int = 2, match: str | None = None,
                 sample: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of every (spec, arch) whose kernel name matches the regex `match` (of the `sample_indices`
    subset when `sample`), and the failures as messages."""
    pool_ids = sample_indices(_specs()) if sample else range(len(_specs()))
    chosen = [i for i in pool_ids if match is None or re.search(match, _specs()[i]["name"])]
    tasks = [(i, cc) for i in chosen for cc in archs]
    records, failures = [], []
    # Spawned workers: each imports the kernels afresh; compiles of distinct configs are independent.
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn"),
                             initializer=_init_worker) as pool:
        futures = [(i, cc, pool.submit(compile_one, i, cc)) for i, cc in tasks]
        for i, cc, fut in futures:
            try:
                records.append(fut.result())
            except Exception as exc:  # report every failing config, not only the first
                detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
                failures.append(f"{_specs()[i]['name']} {_config(_specs()[i])} sm_{cc}: {type(exc).__name__}: {detail}")
    return records, failures


def format_report(records: list[dict[str, Any]]) -> str:
    def cfg(c: dict[str, Any]) -> str:
        return " ".join(f"{k}={v}" for k, v in c.items())

    return markdown_table(records, [
        ("kernel", "kernel", str), ("arch", "arch", str), ("config", "config", cfg),
        ("registers", "registers", str), ("spill_bytes", "spill bytes", str),
        ("shared_bytes", "shared bytes", str), ("mma", "tensor-core instructions", lambda m: ", ".join(m) or "NONE"),
        ("mufu_ex2", "MUFU.EX2", str)])


def summary(records: list[dict[str, Any]]) -> str:
    lines = []
    for arch in sorted({r["arch"] for r in records}):
        rs = [r for r in records if r["arch"] == arch]
        lines.append(f"{arch}: {len(rs)} configs, registers {min(r['registers'] for r in rs)}-"
                     f"{max(r['registers'] for r in rs)}, {sum(r['spill_bytes'] > 0 for r in rs)} spilling, "
                     f"shared {min(r['shared_bytes'] for r in rs)}-{max(r['shared_bytes'] for r in rs)} B, "
                     f"{sum(not r['mma'] for r in rs)} without tensor-core instructions")
        limit = MAX_SHARED_BYTES.get(arch)
        for r in rs:
            if limit is not None and r["shared_bytes"] > limit:
                lines.append(f"  WARNING {r['kernel']} needs {r['shared_bytes']} B of shared memory, more than the "
                             f"{limit} B a block may use on {arch}: it cannot launch there")
            if r["spill_bytes"]:
                lines.append(f"  SPILL {r['kernel']} on {arch}: {r['spill_bytes']} bytes of spill stores+loads")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    parser.add_argument("--match", metavar="REGEX", help="only the kernel configurations whose name matches")
    parser.add_argument("--sample", action="store_true",
                        help="compile each block configuration once, rotating dtype/dropout variants (fast check)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    args = parser.parse_args(argv)
    # Compiling needs real JITFunctions; kernels decorated under the interpreter cannot be compiled.
    os.environ.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    records, failures = build_report(tuple(args.archs), args.jobs, args.match, args.sample)
    print(format_report(records))
    print()
    print(summary(records))
    print(f"compiled {len(records)} kernel/arch pairs in {time.perf_counter() - start:.1f} s with {args.jobs} processes")
    if args.json:
        write_json(args.json, records)
    for msg in failures:
        print(f"FAILED: {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
