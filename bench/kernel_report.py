"""Compile report of the fused DCAMA attention kernels, read from the SASS, no GPU needed.

    python bench/kernel_report.py [--sample] [--json FILE] [--archs 80 86 89 90 100 120] [--match REGEX]
                                  [--jobs 2] [--choices]

First prints which configuration each architecture gets and why (`kernels/arch_configs.py`, derived by
bench/derive_configs.py; `--choices` stops there). Then compiles every kernel configuration each listed
architecture can get (`bench/kernel_specs.py`) for it with `triton.compile(..., target=GPUTarget("cuda", cc,
32))` and reads each cubin with the CUDA tools bundled in the triton wheel: `ptxas -v` for registers and
spills, Triton's metadata for shared and tensor memory, `cuobjdump -sass` for the instructions (HMMA, HGMMA,
UTCHMMA: the tensor cores of sm_80-sm_120, sm_90, sm_100). Exits with status 1 when a configuration fails
to compile or to analyse, or cannot ship (`limit_violations`).

What is counted (all static, from the SASS; nothing is typed in):
  * The main loop is the longest backward branch: a branch instruction whose target lies before it
    (a branch to itself, the trap at the end of every kernel, is not a loop). Its body is every
    instruction from the target to the branch, both included, as laid out in the binary; a retry loop
    nested inside it (a barrier wait) is counted once, as when the data is ready.
  * Lane-instructions per score = loop instructions x num_warps x 32 / (scores the loop body processes),
    times HEAD_DIM / D_SPLIT for kernels whose column splits each recompute the tile. The scores per
    iteration are BLOCK_M x BLOCK_N x the tiles one iteration processes by construction of the kernel
    (`kernels.fused.main_loop_tiles`: the 256 keys of a Philox call in the forward and dq loops with 1-bit
    dropout, and in a forward that rescales once per step, else 1). Work the compiler duplicates (a tile
    computed by two warpgroups, or a loop unrolled by ptxas) therefore counts in full, and shows as more than one
    MUFU.EX2 per score.
  * MUFU per score counts every MUFU instruction of the loop (EX2, RCP, ...) the same way; the opcode
    mix lists the most frequent opcodes (mnemonic without modifiers, MUFU with its function) per score.
  * The static model divides those counts by an H100 SXM's issue rate (32 lane-instructions per cycle per
    sub-partition) and exponential rate (4 MUFU.EX2 per cycle per sub-partition; `bench/common.py` holds
    the assumed rate) at the Swin-B 1/8 training shape. It is a model of the loop's issue slots, not a
    timing: latency, memory stalls and occupancy are not in it.

`--sample` compiles what the budget and the regression ceiling cover (`BUDGET_TOTAL`, `CEILING_TOTAL`: every
configuration the autotuner can pick for them, sm_90) plus a rotation over the other head dims, the budget's
D = 32 configurations on sm_80 and sm_89 (reported, not gated), and on each other arch the configurations
derived because the sm_90 entry failed there, for a training step at dropout 0.5 and the evaluation forward in
3xTF32 and 16 bits (`sample_tasks`): the CI gate (`tests/test_kernel_report.py`) runs
it. The summary line "budget:" lists every breach; "CANNOT SHIP" every configuration over its arch's limits or
spilling at D <= 64 (`limit_violations`).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # compiling needs real JITFunctions: the kernels must not be decorated for the interpreter
    os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.common import H100_SXM, markdown_table
from dcama.files import write_json
from kernels.configs import ARCHS, BASE_ARCH, REGISTERS_PER_BLOCK, REGISTERS_PER_THREAD, TRITON_VERSION, \
    base_candidates, candidates, config_group, derived_with, dq_in_forward, launch_keys, split_config
from kernels.arch_configs import DERIVED

ARCH_CAPABILITIES = tuple(arch.capability for arch in ARCHS.values())
RECORD_KEYS = ("kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "tmem_columns", "trap",
               "mma", "mufu_ex2",
               "loop_instructions", "tiles_per_iteration", "lane_instr_per_score", "mufu_per_score", "mix")
# Tensor-core instructions: mma.sync (HMMA, sm_80 - sm_120), wgmma (HGMMA, sm_90), tcgen05.mma (UTC*MMA, sm_100).
MMA_RE = re.compile(r"\b((?:HGMMA|HMMA|UTCHMMA|UTCQMMA|UTCOMMA)(?:\.[\w.]+)?)")
SASS_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
BRANCH_RE = re.compile(r"\b(?:BRA|JMP)(?:\.[\w.]+)?\s+(?:\S+,\s*)?(0x[0-9a-f]+)")
GUARD_RE = re.compile(r"^@!?U?P[T\d]+\s+")
MIX_TOP = 12
# One H100 SXM sub-partition issues 32 lane-instructions per cycle and completes 4 MUFU.EX2 per cycle, so
# its lane-instruction rate is 8x the exponential rate that bench/common.py assumes.
LANES_PER_EXP_SLOT = 32 / 4
# The Swin-B 1/8 training shape the model is evaluated at: 12 episodes, 2 attention layers stacked in the
# head axis (L * 8 = 16 heads, as dcama/model.py runs them), Nq = 48 * 48 tokens, K = 1 shot, D = 256 / 8.
SWIN_B_18 = {"batch": 12, "heads": 16, "n_query": 2304, "n_key": 2304, "head_dim": 32}
KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
GROUP_OF_DTYPE = {"fp16": "16bit", "bf16": "16bit"}  # fp32: the group is its dot precision


def step_kernels(config: dict[str, Any], arch: str = BASE_ARCH) -> tuple[str, ...]:
    """The kernels of one C = 1 training step (DCAMA's) on `arch` in the variant and head dim of `config`: the
    forward and dk/dv, and the dq kernel unless the forward computes dq's factor (kernels.configs.dq_in_forward)."""
    group = GROUP_OF_DTYPE.get(config["dtype"]) or config_group(config.get("dot_precision"))
    return KERNELS[:2] if dq_in_forward(group, 1, config["head_dim"], arch) else KERNELS


def in_step(config: dict[str, Any], arch: str = BASE_ARCH) -> bool:
    """Whether `config` is a kernel of that training step (its forward: with E exactly where the step takes dq
    from it; the evaluation forward twin is not)."""
    kernels = step_kernels(config, arch)
    return config["kernel"] in kernels and (config["kernel"] != "fwd" or
                                           config.get("dq_in_fwd", False) == (len(kernels) == EXP_PER_STEP))
# The variants of the summary at the DCAMA training shapes: (label, dtype, dot precision, drop bits).
SUMMARY_VARIANTS = (("fp16, dropout 0.5", "fp16", None, 1), ("bf16, dropout 0.5", "bf16", None, 1),
                    ("fp16, no dropout", "fp16", None, 0), ("bf16, no dropout", "bf16", None, 0),
                    ("fp32 TF32 dots, dropout 0.5", "fp32", "tf32", 1),
                    ("fp32 3xTF32 dots, dropout 0.5", "fp32", "tf32x3", 1))
SUMMARY_HEAD_DIMS = (32, 64)
# The budget (docs/kernels.md, "Budget"): sm_90 main-loop lane-instructions per score at D = 32 for every
# configuration the autotuner can pick, keyed (dtype, dot precision, drop bits): the total over the kernels of
# a training step (`step_kernels`), and a share per kernel (about half an instruction per score above what it
# counts, so that one extra operation per score in any kernel fails the gate). Every kernel of these variants:
# at most MAX_MUFU_PER_SCORE, no spills; a step that takes dq from the forward evaluates EXP_PER_STEP
# exponentials per score (one per kernel).
BUDGET_TOTAL = {("fp16", None, 1): 17.5, ("bf16", None, 1): 18.5, ("bf16", None, 0): 11.2, ("fp32", "tf32", 1): 23.0,
                ("fp32", "tf32x3", 1): 37.0}
BUDGET_SHARE = {1: {"fwd": 10.0, "bwd_dkdv": 8.95},  # 16 bits, dropout 0.5: dq from the forward
                0: {"fwd": 6.8, "bwd_dkdv": 4.9}}  # 16 bits, no dropout
BUDGET_SHARE_FP32 = {"tf32": {"fwd": 11.15, "bwd_dkdv": 12.3},  # fp32, dropout 0.5: dq from the forward
                     "tf32x3": {"fwd": 18.3, "bwd_dkdv": 19.1}}
MAX_MUFU_PER_SCORE = 1.07
EXP_PER_STEP = 2
# On every listed arch, configurations at D <= this (Swin-B's 32 and ResNet's 64 at 1/4 scale, the hot ones) must
# not spill.
MAX_SPILL_FREE_HEAD_DIM = 64
# The derived entries --sample compiles: the groups a training run uses (fp32's default precision and 16 bits)
# and per kernel the dropout modes (a training run's 1-bit, p = 0.5; the evaluation forward's none).
SAMPLED_GROUPS = ("tf32x3", "16bit")
SAMPLED_DROP_BITS = {"fwd": (0, 1), "bwd_dkdv": (1,), "bwd_dq": (1,)}
# The archs the budget table is reported for besides sm_90 (counted the same way: HMMA, mma.sync, for HGMMA).
BUDGET_REPORTED_ARCHS = ("sm_80", "sm_89")
# Regression ceiling: the fwd+bwd total the kernels before v2 (commit 84d5c0e) had on sm_90 for a variant the
# budget does not cover; (head dim, dtype, dot precision, drop bits) -> lane-instructions per score. The full
# report's summary table shows every other variant (fp16 equals bf16 there).
CEILING_TOTAL = {(64, "fp16", None, 1): 93.69}


@lru_cache(maxsize=None)
def _specs(arch: str) -> list[dict[str, Any]]:
    # Imported here, not at the top: importing the kernels decorates them, which must happen after main()
    # (or _init_worker) removed TRITON_INTERPRET from the environment.
    from bench.kernel_specs import kernel_compile_specs

    return kernel_compile_specs(arch)


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this triton wheel does not bundle {name}")
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Parsing ptxas and SASS
# ---------------------------------------------------------------------------------------------------------
def parse_ptxas(log: str) -> dict[str, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    if regs is None or spill is None:
        raise ValueError(f"unexpected ptxas -v output:\n{log}")
    return {"registers": int(regs.group(1)), "spill_bytes": int(spill.group(1)) + int(spill.group(2)),
            "static_smem": int(smem.group(1)) if smem else 0}


def parse_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without the trailing ';') for every SASS instruction, in order."""
    return [(int(addr, 16), text) for addr, text in SASS_RE.findall(sass)]


def opcode(text: str) -> str:
    """The mnemonic without its predicate guard and modifiers; MUFU keeps its function (MUFU.EX2)."""
    words = GUARD_RE.sub("", text).split()
    op = words[0] if words else ""
    return ".".join(op.split(".")[:2]) if op.startswith("MUFU.") else op.split(".")[0]


def main_loop(instructions: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) indices of the longest backward branch's body, or None for a loop-free kernel."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    best = None
    for i, (addr, text) in enumerate(instructions):
        hit = BRANCH_RE.search(text)
        if hit is None:
            continue
        target = int(hit.group(1), 16)
        if target < addr and target in index and (best is None or i - index[target] > best[1] - best[0]):
            best = (index[target], i)
    return best


def parse_sass(sass: str) -> dict[str, Any]:
    """Whole-kernel tensor-core instructions and MUFU.EX2 count, and the main loop's opcode counts."""
    instructions = parse_instructions(sass)
    loop = main_loop(instructions)
    body = [] if loop is None else [opcode(t) for _, t in instructions[loop[0]:loop[1] + 1]]
    # A kernel Triton refuses at compile time (tensor memory over the limit) compiles to a trap without EXIT.
    trap = not any(opcode(t) == "EXIT" for _, t in instructions)
    return {"mma": sorted(set(MMA_RE.findall(sass))), "mufu_ex2": len(re.findall(r"\bMUFU\.EX2\b", sass)),
            "loop_opcodes": Counter(body), "trap": trap}


TRAP_COSTS = {"loop_instructions": 0, "tiles_per_iteration": 0, "lane_instr_per_score": 0.0, "mufu_per_score": 0.0,
              "mix": {}}


def loop_costs(loop_opcodes: Counter, constexprs: dict[str, Any], num_warps: int, tiles: int) -> dict[str, Any]:
    """Per-score figures of the main loop, which processes `tiles` score tiles per iteration by construction
    (module docstring: the normalisation)."""
    instructions = sum(loop_opcodes.values())
    if not instructions:
        raise ValueError("no main loop found in the SASS")
    threads = num_warps * 32
    scores = constexprs["BLOCK_M"] * constexprs["BLOCK_N"] * tiles
    recompute = constexprs["HEAD_DIM"] // constexprs.get("D_SPLIT", constexprs["HEAD_DIM"])
    per_score = threads * recompute / scores
    mufu = sum(n for op, n in loop_opcodes.items() if op.startswith("MUFU"))
    return {"loop_instructions": instructions, "tiles_per_iteration": tiles,
            "lane_instr_per_score": round(instructions * per_score, 2),
            "mufu_per_score": round(mufu * per_score, 3),
            "mix": {op: round(n * per_score, 2) for op, n in loop_opcodes.most_common(MIX_TOP)}}


# ---------------------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------------------
def _ptxas_log(kernel: Any, cc: int, captured: str) -> str:
    """The `ptxas -v` log of this cubin: the one Triton printed while compiling (TRITON_DUMP_PTXAS_LOG), or,
    when the cubin came from Triton's cache, ptxas run again on the PTX with the flags Triton uses
    (triton/backends/nvidia/compiler.py make_cubin), which rebuilds the same cubin."""
    if "Used" in captured and "registers" in captured:
        return captured
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        # The ptxas Triton uses for this arch (sm_100 and newer: the bundled ptxas-blackwell).
        return subprocess.run([get_ptxas(cc).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(cc)}", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True).stderr


def compile_spec(spec: dict[str, Any], cc: int) -> Any:
    """The CompiledKernel of one spec for compute capability cc (Triton prints the ptxas log to stdout)."""
    src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})


def sass_of(kernel: Any) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def compile_record(spec: dict[str, Any], cc: int) -> dict[str, Any]:
    """Compile `spec` for compute capability `cc`; return its report record."""
    captured = io.StringIO()
    with redirect_stdout(captured):
        kernel = compile_spec(spec, cc)
    usage = parse_ptxas(_ptxas_log(kernel, cc, captured.getvalue()))
    sass = parse_sass(sass_of(kernel))
    return {"kernel": spec["name"], "arch": f"sm_{cc}", "config": spec["config"],
            "registers": usage["registers"], "spill_bytes": usage["spill_bytes"],
            "shared_bytes": int(kernel.metadata.shared) + usage["static_smem"],
            "tmem_columns": int(getattr(kernel.metadata, "tmem_size", None) or 0), "trap": sass["trap"],
            "mma": sass["mma"], "mufu_ex2": sass["mufu_ex2"],
            **(TRAP_COSTS if sass["trap"] else loop_costs(sass["loop_opcodes"], spec["constexprs"], spec["num_warps"],
                                                          spec["tiles_per_iteration"]))}


def compile_one(index: int, cc: int) -> dict[str, Any]:
    """Compile spec `index` of the configurations sm_`cc` can get; return its report record."""
    return compile_record(_specs(f"sm_{cc}")[index], cc)


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def limit_problems(arch: str, usage: dict[str, Any]) -> list[str]:
    """What `usage` (shared_bytes, tmem_columns, registers, num_warps, trap) needs beyond what one block may use
    on `arch` (a kernels.configs.ARCHS key): each such configuration fails to launch there. Empty when it fits."""
    limits, out = ARCHS[arch], []
    if usage["shared_bytes"] > limits.shared_bytes:
        out.append(f"{usage['shared_bytes']} B shared memory > {limits.shared_bytes}")
    if usage["tmem_columns"] > limits.tmem_columns:
        out.append(f"{usage['tmem_columns']} tensor-memory columns > {limits.tmem_columns}")
    if usage["registers"] > REGISTERS_PER_THREAD or usage["registers"] * usage["num_warps"] * 32 > REGISTERS_PER_BLOCK:
        out.append(f"{usage['registers']} registers x {usage['num_warps']} warps > {REGISTERS_PER_BLOCK} per block")
    if usage["trap"]:
        out.append("compiles to a trap")
    return out


def variant_key(config: dict[str, Any]) -> tuple[str, str | None, int]:
    return config["dtype"], config.get("dot_precision"), config["drop_bits"]


def is_gated(config: dict[str, Any]) -> bool:
    """A configuration the budget or a regression ceiling covers (a kernel of the training step)."""
    return in_step(config) and (
        (config["head_dim"] == 32 and variant_key(config) in BUDGET_TOTAL)
        or (config["head_dim"], *variant_key(config)) in CEILING_TOTAL)


def sample_tasks(archs: tuple[int, ...]) -> list[tuple[int, int]]:
    """(cc, spec index) pairs of `--sample`, the CI gate's set. On sm_90 every gated spec (with the evaluation twin
    of each gated forward with E) and, for each kernel,
    one spec at one other head dim (the head dims and the variants rotate over the kernels); on the archs of
    BUDGET_REPORTED_ARCHS the budget's D = 32 specs (reported there). On every arch but sm_90 the configurations
    derived there because the sm_90 entry failed (kernels/arch_configs.py) in the groups a training run uses,
    fp32 3xTF32 (the default precision) and 16-bit, for its launches (DCAMA's dropout 0.5) and the evaluation
    forward (no dropout), bf16 standing for fp16 (the same entry); the other dropout modes' derived entries
    are in the full check (their measurements: tests/test_arch_configs.py)."""
    tasks = []
    for cc in archs:
        arch, specs = f"sm_{cc}", _specs(f"sm_{cc}")
        if arch == BASE_ARCH:
            tasks += [(cc, i) for i, s in enumerate(specs) if is_gated(s["config"]) or (  # and their eval twins
                s["config"]["kernel"] == "fwd" and s["config"]["head_dim"] == 32 and not in_step(s["config"])
                and variant_key(s["config"]) in BUDGET_TOTAL)]
            others = sorted({s["config"]["head_dim"] for s in specs} - {32, 64})
            for n, kernel in enumerate(KERNELS):
                members = [i for i, s in enumerate(specs) if s["config"]["kernel"] == kernel and
                           s["config"]["head_dim"] == others[n % len(others)]]
                tasks.append((cc, members[n % len(members)]))
            continue
        if arch in BUDGET_REPORTED_ARCHS:
            tasks += [(cc, i) for i, s in enumerate(specs) if s["config"]["head_dim"] == 32 and
                      variant_key(s["config"]) in BUDGET_TOTAL and in_step(s["config"], arch)]
        derived = DERIVED.get(arch, {})
        tasks += [(cc, i) for i, s in enumerate(specs) for c in [s["config"]] if c["dtype"] != "fp16"
                  and s["group"] in SAMPLED_GROUPS and c["drop_bits"] in SAMPLED_DROP_BITS[c["kernel"]]
                  and (c["kernel"], s["group"], c["head_dim"], c["drop_bits"]) in derived]
    return sorted(set(tasks))


def limit_violations(records: list[dict[str, Any]]) -> list[str]:
    """Every record that cannot launch on its arch (`limit_problems`) or spills at D <= 64."""
    out = []
    for r in records:
        problems = limit_problems(r["arch"], {**r, "num_warps": r["config"]["num_warps"]})
        if r["spill_bytes"] and r["config"]["head_dim"] <= MAX_SPILL_FREE_HEAD_DIM:
            problems.append(f"spills {r['spill_bytes']} B at D = {r['config']['head_dim']}")
        out += [f"{r['kernel']} on {r['arch']}: {'; '.join(problems)}"] if problems else []
    return out


def budget_violations(records: list[dict[str, Any]]) -> list[str]:
    """Every breach of the budget and the regression ceiling by sm_90 records (the worst configuration of each
    kernel counts); a gated variant with a kernel missing is a breach too."""
    out = []
    sm90 = [r for r in records if r["arch"] == "sm_90"]
    gated = {(32, *k): v for k, v in BUDGET_TOTAL.items()} | CEILING_TOTAL
    for (head_dim, *variant), limit in gated.items():
        worst = {}
        kernels = step_kernels({"dtype": variant[0], "dot_precision": variant[1], "head_dim": head_dim})
        for kernel in kernels:
            hits = [r for r in sm90 if r["config"]["kernel"] == kernel and r["config"]["head_dim"] == head_dim
                    and list(variant_key(r["config"])) == variant and in_step(r["config"])]
            if not hits:
                out.append(f"D={head_dim} {variant}: no {kernel} record")
                continue
            worst[kernel] = max(hits, key=lambda r: r["lane_instr_per_score"])
        if len(worst) < len(kernels):
            continue
        total = sum(r["lane_instr_per_score"] for r in worst.values())
        if total > limit:
            out.append(f"D={head_dim} {variant}: fwd+bwd {total:.2f} lane-instructions per score > {limit}")
        if (head_dim, *variant) in CEILING_TOTAL:
            continue
        if len(kernels) == EXP_PER_STEP and any(round(r["mufu_per_score"]) != 1 for r in worst.values()):
            out.append(f"D={head_dim} {variant}: not one exponential per score per kernel "
                       f"({', '.join(str(r['mufu_per_score']) for r in worst.values())})")
        shares = BUDGET_SHARE_FP32[variant[1]] if variant[0] == "fp32" else BUDGET_SHARE[variant[2]]
        for kernel, r in worst.items():
            if r["lane_instr_per_score"] > shares[kernel]:
                out.append(f"{r['kernel']}: {r['lane_instr_per_score']} lane-instructions per score > its share "
                           f"{shares[kernel]}")
            if r["mufu_per_score"] > MAX_MUFU_PER_SCORE:
                out.append(f"{r['kernel']}: {r['mufu_per_score']} MUFU per score > {MAX_MUFU_PER_SCORE}")
    return out


def build_report(archs: tuple[int, ...] = ARCH_CAPABILITIES, jobs: int = 2, match: str | None = None,
                 sample: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of every (spec, arch) of the configurations each arch can get whose kernel name matches the regex
    `match` (of the `sample_tasks` subset when `sample`), and the failures as messages."""
    tasks = sample_tasks(archs) if sample else [(cc, i) for cc in archs for i in range(len(_specs(f"sm_{cc}")))]
    tasks = [(cc, i) for cc, i in tasks if match is None or re.search(match, _specs(f"sm_{cc}")[i]["name"])]
    records, failures = [], []
    # Spawned workers: each imports the kernels afresh; compiles of distinct configs are independent.
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn"),
                             initializer=_init_worker) as pool:
        futures = [(i, cc, pool.submit(compile_one, i, cc)) for cc, i in tasks]
        for i, cc, fut in futures:
            try:
                records.append(fut.result())
            except Exception as exc:  # report every failing config, not only the first
                detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
                failures.append(f"{_specs(f'sm_{cc}')[i]['name']} sm_{cc}: {type(exc).__name__}: {detail}")
    return records, failures


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def _mix(mix: dict[str, float], top: int = 6) -> str:
    return ", ".join(f"{op} {n:g}" for op, n in list(mix.items())[:top])


def format_report(records: list[dict[str, Any]]) -> str:
    def cfg(c: dict[str, Any]) -> str:
        return " ".join(f"{k}={v}" for k, v in c.items() if k not in ("kernel", "channels"))

    return markdown_table(records, [
        ("kernel", "kernel", str), ("arch", "arch", str), ("config", "config", cfg),
        ("registers", "regs", str), ("spill_bytes", "spill B", str), ("shared_bytes", "shared B", str),
        ("mma", "tensor-core instructions", lambda m: ", ".join(m) or "NONE"),
        ("lane_instr_per_score", "lane-instr/score", str), ("mufu_per_score", "MUFU/score", str),
        ("mix", "top opcodes per score", _mix)])


def summary_rows(records: list[dict[str, Any]], arch: str = "sm_90") -> list[dict[str, Any]]:
    """Per (head dim, variant): for each kernel the best (fewest lane-instructions per score) and the worst
    shipped configuration compiled for `arch`, the fwd+bwd totals of both, the largest MUFU per score and the
    largest spill of any of those configurations, over the kernels of a training step (`step_kernels`; "kernels"
    lists them). Variants with a kernel missing are left out."""
    rows = []
    for head_dim in SUMMARY_HEAD_DIMS:
        for label, dtype, precision, bits in SUMMARY_VARIANTS:
            kernels = step_kernels({"dtype": dtype, "dot_precision": precision, "head_dim": head_dim}, arch)
            row: dict[str, Any] = {"head_dim": head_dim, "variant": label, "mufu_max": 0.0, "spill_max": 0,
                                   "kernels": kernels}
            for kernel in kernels:
                hits = [r for r in records if r["arch"] == arch and r["config"]["kernel"] == kernel
                        and r["config"]["head_dim"] == head_dim and r["config"]["dtype"] == dtype
                        and r["config"].get("dot_precision") == precision and r["config"]["drop_bits"] == bits
                        and in_step(r["config"], arch)]
                if not hits:
                    break
                best = min(hits, key=lambda r: r["lane_instr_per_score"])
                row[kernel] = best["lane_instr_per_score"]
                row[f"{kernel}_worst"] = max(r["lane_instr_per_score"] for r in hits)
                row[f"{kernel}_best_record"] = best
                row["mufu_max"] = max(row["mufu_max"], *(r["mufu_per_score"] for r in hits))
                row["spill_max"] = max(row["spill_max"], *(r["spill_bytes"] for r in hits))
            else:
                row["total"] = round(sum(row[k] for k in kernels), 2)
                row["total_worst"] = round(sum(row[f"{k}_worst"] for k in kernels), 2)
                rows.append(row)
    return rows


def _no_dq_kernel(value: float | None) -> str:
    return "from fwd" if value is None else str(value)


def format_summary(rows: list[dict[str, Any]], arch: str = BASE_ARCH) -> str:
    return markdown_table(rows, [
        ("head_dim", "D", str), ("variant", f"{arch}, lane-instr per score", str), ("fwd", "fwd", str),
        ("bwd_dkdv", "bwd dk/dv", str), ("bwd_dq", "bwd dq", _no_dq_kernel), ("total", "total", str),
        ("total_worst", "total, worst configs", str), ("mufu_max", "max MUFU/score", str),
        ("spill_max", "max spill B", str)])


def format_mix(rows: list[dict[str, Any]], head_dim: int = 32) -> str:
    """Where the slots go: the best configuration's top opcodes per score, per kernel, at `head_dim`."""
    out = []
    for row in rows:
        if row["head_dim"] != head_dim:
            continue
        for kernel in row["kernels"]:
            r = row[f"{kernel}_best_record"]
            out.append({"variant": row["variant"], "kernel": kernel, "name": r["kernel"],
                        "total": r["lane_instr_per_score"], "mix": _mix(r["mix"], MIX_TOP)})
    return markdown_table(out, [("variant", "variant", str), ("kernel", "kernel", str), ("name", "config", str),
                                ("total", "lane-instr/score", str), ("mix", "top opcodes per score", str)])


def static_model(rows: list[dict[str, Any]], shape: dict[str, int] = SWIN_B_18) -> list[dict[str, Any]]:
    """Issue-bound and exp-bound time of each kernel's main loop at `shape` on an H100 SXM: a STATIC MODEL."""
    scores = shape["batch"] * shape["heads"] * shape["n_query"] * shape["n_key"]
    exp_rate = H100_SXM.exp_per_s
    issue_rate = exp_rate * LANES_PER_EXP_SLOT
    out = []
    for row in rows:
        if row["head_dim"] != shape["head_dim"]:
            continue
        kernels = row["kernels"]
        issue = {k: row[k] * scores / issue_rate * 1e3 for k in kernels}
        exp = {k: row[f"{k}_best_record"]["mufu_per_score"] * scores / exp_rate * 1e3 for k in kernels}
        bound = {k: max(issue[k], exp[k]) for k in kernels}
        out.append({"variant": row["variant"], **{f"{k}_ms": bound.get(k) for k in KERNELS},
                    "issue_ms": sum(issue.values()), "exp_ms": sum(exp.values()), "model_ms": sum(bound.values()),
                    "floor_ms": EXP_PER_STEP * scores / exp_rate * 1e3,
                    "bound": ", ".join("issue" if issue[k] >= exp[k] else "exp" for k in kernels)})
    return out


def format_model(model: list[dict[str, Any]], shape: dict[str, int] = SWIN_B_18) -> str:
    ms = lambda x: "from fwd" if x is None else f"{x:.3f}"  # noqa: E731
    head = (f"STATIC MODEL (not a timing), H100 SXM ({H100_SXM.exp_per_s:.2g} exp/s assumed, "
            f"{LANES_PER_EXP_SLOT:g} lane-instructions per exp slot): B={shape['batch']}, H={shape['heads']}, "
            f"Nq={shape['n_query']}, Nk={shape['n_key']}, D={shape['head_dim']}; each kernel costs "
            "max(issue-bound, exp-bound) of its main loop")
    return head + "\n\n" + markdown_table(model, [
        ("variant", "variant", str), ("fwd_ms", "fwd ms", ms), ("bwd_dkdv_ms", "bwd dk/dv ms", ms),
        ("bwd_dq_ms", "bwd dq ms", ms), ("model_ms", "fwd+bwd ms", ms), ("issue_ms", "issue-bound sum", ms),
        ("exp_ms", "exp-bound sum", ms), ("floor_ms", "2-exp floor ms", ms), ("bound", "bound by (per kernel)", str)])


def summary(records: list[dict[str, Any]]) -> str:
    lines = [f"budget: {'; '.join(budget_violations(records)) or 'met'}"] if any(
        is_gated(r["config"]) for r in records) else []
    for arch in sorted({r["arch"] for r in records}, key=lambda a: ARCHS[a].capability):
        rs = [r for r in records if r["arch"] == arch]
        lines.append(f"{arch}: {len(rs)} configs, registers {min(r['registers'] for r in rs)}-"
                     f"{max(r['registers'] for r in rs)}, {sum(r['spill_bytes'] > 0 for r in rs)} spilling "
                     f"({sum(r['spill_bytes'] > 0 for r in rs if r['config']['head_dim'] <= MAX_SPILL_FREE_HEAD_DIM)}"
                     f" at D <= {MAX_SPILL_FREE_HEAD_DIM}), shared {min(r['shared_bytes'] for r in rs)}-"
                     f"{max(r['shared_bytes'] for r in rs)} B (limit {ARCHS[arch].shared_bytes}), tensor memory "
                     f"<= {max(r['tmem_columns'] for r in rs)} columns, {sum(not r['mma'] for r in rs)} without "
                     f"tensor-core instructions")
        lines += [f"  SPILL {r['kernel']} on {arch}: {r['spill_bytes']} bytes of spill stores+loads"
                  for r in rs if r["spill_bytes"]]
    lines += [f"  CANNOT SHIP {v}" for v in limit_violations(records)]
    return "\n".join(lines)


def arch_table(archs: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per arch, from what bench/derive_configs.py measured of the configurations it ships (kernels/arch_configs.py):
    launches measured, derived, the largest shared memory, the launches that spill, the groups whose every measured
    launch fits."""
    from kernels.arch_configs import MEASURED

    rows = []
    for cc in archs:
        arch = f"sm_{cc}"
        shipped = {(*k, e): MEASURED.get(arch, {}).get((*k, e)) for k in launch_keys()
                   for e in candidates(*k, arch=arch)}
        measured = {slot: usage for slot, usage in shipped.items() if usage is not None}
        spilling = [slot for slot, usage in measured.items() if usage[3]]
        fits = {slot: not limit_problems(arch, {"shared_bytes": u[0], "tmem_columns": u[1], "registers": u[2],
                                                "num_warps": split_config(slot[0], slot[4])[1], "trap": False})
                for slot, u in measured.items()}
        groups = sorted({slot[1] for slot in measured})
        rows.append({"arch": arch, "gpus": ARCHS[arch].gpus, "measured": f"{len(measured)} of {len(shipped)}",
                     "derived": len(DERIVED.get(arch, {})),
                     "shared": max((u[0] for u in measured.values()), default=0),
                     "tmem": max((u[1] for u in measured.values()), default=0),
                     "spilling": f"{len(spilling)} ({sum(s[2] <= MAX_SPILL_FREE_HEAD_DIM for s in spilling)} "
                                 "at D <= 64)",
                     "groups": ", ".join(g for g in groups if all(ok for slot, ok in fits.items() if slot[1] == g))
                     or "-"})
    return rows


def format_choices(archs: tuple[int, ...]) -> str:
    """Which configuration each arch gets for each launch and why (kernels/arch_configs.py): per arch what was
    measured of the configurations it ships, then every launch that gets another entry than sm_90's, with the
    reason."""
    rows = [{"arch": arch, "launch": " ".join(map(str, k)),
             "entry": "none: not supported" if DERIVED[arch][k][0] is None else str(DERIVED[arch][k][0]),
             "sm_90": str(base_candidates(*k)[0]), "why": DERIVED[arch][k][1]}
            for arch in (f"sm_{cc}" for cc in archs) for k in sorted(DERIVED.get(arch, {}))]
    return markdown_table(arch_table(archs), [
        ("arch", "arch", str), ("gpus", "GPUs", str), ("measured", "launches measured", str),
        ("derived", "derived entries", str), ("shared", "largest shared B", str), ("tmem", "tmem columns", str),
        ("spilling", "spilling launches", str), ("groups", "groups that fit (measured)", str)]) + "\n\n" + \
        markdown_table(rows, [("arch", "arch", str), ("launch", "kernel group D drop_bits", str),
                              ("sm_90", "sm_90 entry", str), ("entry", "entry there", str),
                              ("why", "why (measured by bench/derive_configs.py)", str)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCH_CAPABILITIES),
                        help="compute capabilities (kernels.configs.ARCHS)")
    parser.add_argument("--match", metavar="REGEX", help="only the kernel configurations whose name matches")
    parser.add_argument("--sample", action="store_true",
                        help="the hot configurations plus one rotation over the others (the CI gate's set)")
    parser.add_argument("--choices", action="store_true",
                        help="only print which configuration each architecture gets and why, compiling nothing")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.archs) - set(ARCH_CAPABILITIES))
    if unknown:
        parser.error(f"--archs {unknown}: not in kernels.configs.ARCHS {ARCH_CAPABILITIES}")
    print("Which configuration each architecture gets (kernels/arch_configs.py):\n")
    print(format_choices(tuple(args.archs)))
    print()
    if args.choices:
        return 0
    start = time.perf_counter()
    records, failures = build_report(tuple(args.archs), args.jobs, args.match, args.sample)
    print(format_report(records))
    print()
    print(summary(records))
    for arch in BUDGET_REPORTED_ARCHS:
        other = summary_rows(records, arch)
        if other:
            print(f"\nBudget table on {arch} (reported, not gated; counted as on sm_90, HMMA for HGMMA):\n")
            print(format_summary(other, arch))
    rows = summary_rows(records)
    if rows:
        print("\nBudget table (main loop, static count from the sm_90 SASS; best shipped config per kernel):\n")
        print(format_summary(rows))
        print("\nWhere the slots go at D = 32 (best config per kernel):\n")
        print(format_mix(rows))
        print()
        print(format_model(static_model(rows)))
    other = "" if derived_with(triton.__version__) else \
        f" (the tables were derived with triton {TRITON_VERSION}: a failure below may be this triton's)"
    print(f"\ncompiled {len(records)} kernel/arch pairs in {time.perf_counter() - start:.1f} s "
          f"with {args.jobs} processes, triton {triton.__version__}{other}")
    if args.json:
        write_json(args.json, records)
    for msg in failures + limit_violations(records):
        print(f"FAILED: {msg}", file=sys.stderr)
    return 1 if failures or limit_violations(records) else 0


if __name__ == "__main__":
    sys.exit(main())
