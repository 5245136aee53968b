"""The compile gate of the fused kernels, no GPU needed: `bench/kernel_report.py --sample` compiles the kernel
configurations the budget covers for sm_90 (and a rotation over the other head dims), and on every other listed
architecture the configurations derived there because the sm_90 entry failed (3xTF32 and 16-bit: a training
step at dropout 0.5 and the evaluation forward), and reads registers, spills, shared and tensor memory and the SASS
main loops.

It fails when a configuration does not compile, needs more shared memory, tensor memory or registers than its
architecture has, compiles to a trap, spills at D <= 64 on any architecture or at all on sm_90, has no
tensor-core instruction, or breaks the budget (docs/kernels.md, "Budget": fwd+bwd lane-instructions per score
and each kernel's share at D = 32, at most 1.07 MUFU per score per kernel) or the regression ceiling (the pre-v2
total of 16 bits at D = 64). Set DCAMA_FULL_COMPILE_CHECK=1 to compile every shipped configuration for
every architecture (hours on 2 cores). The report runs as a subprocess without TRITON_INTERPRET: kernels
decorated under the interpreter cannot be compiled.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.kernel_report import BUDGET_REPORTED_ARCHS, BUDGET_TOTAL, RECORD_KEYS, SAMPLED_DROP_BITS, \
    SAMPLED_GROUPS, budget_violations, limit_violations, loop_costs, main_loop, parse_instructions, parse_ptxas, \
    parse_sass, summary_rows
from kernels.arch_configs import DERIVED

REPO = Path(__file__).resolve().parents[1]
FULL = os.environ.get("DCAMA_FULL_COMPILE_CHECK") == "1"
# sm_90, the archs the budget is reported for, and every arch with derived configurations in the groups the
# sample compiles there.
ARCHS = {"sm_90", *BUDGET_REPORTED_ARCHS} | {
    arch for arch, derived in DERIVED.items()
    if any(group in SAMPLED_GROUPS and bits in SAMPLED_DROP_BITS[kernel] for kernel, group, _, bits in derived)}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "bench" / "kernel_report.py"), "--json", str(out),
           *([] if FULL else ["--sample"])]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=None if FULL else 3600)
    records = json.loads(out.read_text()) if out.exists() else []
    return proc, records


def test_every_configuration_compiles(report):
    proc, records = report
    assert proc.returncode == 0, f"compile failures:\n{proc.stderr[-4000:]}"
    assert records, proc.stdout[-2000:]


def test_records_have_the_documented_keys(report):
    _, records = report
    for r in records:
        assert set(r) == set(RECORD_KEYS)
        assert isinstance(r["registers"], int) and 0 < r["registers"] <= 255
        assert isinstance(r["spill_bytes"], int) and r["spill_bytes"] >= 0
        assert isinstance(r["tmem_columns"], int) and r["tmem_columns"] >= 0 and r["trap"] is False
        assert r["loop_instructions"] > 0 and r["lane_instr_per_score"] > 0 and r["tiles_per_iteration"] >= 1
        assert isinstance(r["mix"], dict) and isinstance(r["mma"], list)


def test_every_arch_included_every_kernel_on_sm90_bf16_included(report):
    _, records = report
    assert {r["arch"] for r in records} >= ARCHS
    assert {r["config"]["kernel"] for r in records if r["arch"] == "sm_90"} == {"fwd", "bwd_dkdv", "bwd_dq"}
    assert any(r["config"]["dtype"] == "bf16" for r in records if r["arch"] == "sm_90")


def test_every_configuration_fits_its_architecture(report):
    """Shared memory, tensor memory and registers within the arch's limits, no trap, no spill at D <= 64."""
    _, records = report
    assert not limit_violations(records), "\n".join(limit_violations(records))


def test_no_spills_on_sm90(report):
    _, records = report
    spilling = {r["kernel"]: r["spill_bytes"] for r in records if r["arch"] == "sm_90" and r["spill_bytes"]}
    assert not spilling, f"configurations spilling on sm_90 (bytes of spill stores+loads): {spilling}"


def test_attention_kernels_use_tensor_cores_and_the_exp_unit(report):
    _, records = report
    no_mma = [f"{r['kernel']} {r['arch']}" for r in records if not r["mma"]]
    assert not no_mma, f"no tensor-core instruction in: {no_mma}"
    assert all(r["mufu_ex2"] > 0 for r in records)


def test_budget_is_reported_for_sm80_and_sm89(report):
    """The D = 32 budget variants on sm_80 and sm_89, counted as on sm_90 (mma.sync instead of wgmma)."""
    _, records = report
    for arch in BUDGET_REPORTED_ARCHS:
        rows = [r for r in summary_rows(records, arch) if r["head_dim"] == 32]
        assert len(rows) == len(BUDGET_TOTAL) and all(r["total"] > 0 for r in rows), arch
        assert all(m.startswith("HMMA") for r in records if r["arch"] == arch for m in r["mma"])


def test_budget(report):
    """fwd+bwd totals and per-kernel shares at D = 32, MUFU per score, the 16-bit ceiling at D = 64."""
    _, records = report
    assert not budget_violations(records), "\n".join(budget_violations(records))


def _step_record(kernel, lane, mufu=1.03, dtype="fp16", dq_in_fwd=True):
    config = {"kernel": kernel, "dtype": dtype, "dot_precision": None, "head_dim": 32, "drop_bits": 1,
              **({"dq_in_fwd": True} if kernel == "fwd" and dq_in_fwd else {})}
    return {"kernel": kernel, "arch": "sm_90", "config": config, "lane_instr_per_score": lane, "mufu_per_score": mufu}


def test_budget_counts_the_kernels_of_a_training_step():
    """A 16-bit step at D = 32 is the forward with E plus dk/dv: a dq record (C > 1) and the evaluation forward
    do not count; a step kernel evaluating two exponentials per score, or over its share, breaks the gate."""
    step = []
    for dtype in ("fp16", "bf16"):
        step += [_step_record("fwd", 8.5, dtype=dtype), _step_record("bwd_dkdv", 8.5, dtype=dtype),
                 _step_record("bwd_dq", 30.0, mufu=2.0, dtype=dtype),
                 _step_record("fwd", 30.0, dtype=dtype, dq_in_fwd=False)]
    # The other gated variants have no records here: only those messages.
    assert all(v.endswith(" record") for v in budget_violations(step)), budget_violations(step)
    doubled = [dict(r, mufu_per_score=2.06) if r["config"]["kernel"] == "bwd_dkdv" else r for r in step]
    assert any("not one exponential per score per kernel" in v for v in budget_violations(doubled))
    heavy = [dict(r, lane_instr_per_score=10.6) if r["config"].get("dq_in_fwd") else r for r in step]
    assert any("> its share 10.0" in v for v in budget_violations(heavy))


# ---------------------------------------------------------------------------------------------
# The parsers and the normalisation, on hand-written input
# ---------------------------------------------------------------------------------------------
def _record(arch="sm_86", head_dim=64, num_warps=4, **usage):
    return {"kernel": "k", "arch": arch, "config": {"head_dim": head_dim, "num_warps": num_warps},
            **{"shared_bytes": 1000, "tmem_columns": 0, "registers": 128, "spill_bytes": 0, "trap": False, **usage}}


def test_limit_violations_name_what_does_not_fit():
    assert limit_violations([_record(), _record(head_dim=128, spill_bytes=64), _record("sm_90", shared_bytes=200_000),
                             _record("sm_100", tmem_columns=512)]) == []
    found = limit_violations([_record(shared_bytes=102_000), _record("sm_100", tmem_columns=640),
                              _record("sm_80", registers=255, num_warps=16), _record(trap=True),
                              _record(head_dim=32, spill_bytes=8)])
    assert len(found) == 5
    assert "102000 B shared memory > 101376" in found[0] and "640 tensor-memory columns > 512" in found[1]
    assert "compiles to a trap" in found[3] and "spills 8 B at D = 32" in found[4]


def test_parsers_read_ptxas_and_sass_output():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 512 bytes smem\n")
    assert parse_ptxas(log) == {"registers": 168, "spill_bytes": 32, "static_smem": 512}
    sass = ("  /*1620*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT ;\n"
            "  /*1650*/  HMMA.16816.F32.BF16 R12, R32, R38, RZ ;\n"
            "  /*1670*/  MUFU.EX2 R24, R24 ;\n  /*1680*/  MUFU.EX2 R25, R25 ;\n  /*1690*/  MUFU.RCP R2, R2 ;\n")
    parsed = parse_sass(sass + "  /*16a0*/  UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], idesc[UR9], UPT ;\n")
    assert parsed["mma"] == ["HGMMA.64x64x16.F32.BF16", "HMMA.16816.F32.BF16", "UTCHMMA"]
    assert parsed["mufu_ex2"] == 2 and parsed["trap"]  # no EXIT
    trap_body = "  /*0000*/  LDC R1, c[0x0][0x37c] ;\n  /*0010*/  BPT.TRAP 0x1 ;\n  /*0020*/  BRA 0x20 ;\n"
    assert parse_sass(trap_body)["trap"] and not parse_sass(SASS_TWO_LOOPS)["trap"]
    with pytest.raises(ValueError):
        parse_ptxas("garbage")


SASS_TWO_LOOPS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   MUFU.EX2 R4, R2 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   FMUL R5, R5, R6 ;
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R7 ;
        /*0060*/              @!P1 BRA 0x50 ;
        /*0070*/                   MUFU.EX2 R8, R5 ;
        /*0080*/              @!P2 LOP3.LUT R9, R9, R10, RZ, 0xc0, !PT ;
        /*0090*/              @!P0 BRA 0x40 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_main_loop_is_the_longest_backward_branch():
    """The loop 0x40..0x90 (6 instructions, a retry loop nested in it) beats 0x10..0x30 (3); the final
    branch-to-self is not a loop."""
    instructions = parse_instructions(SASS_TWO_LOOPS)
    first, last = main_loop(instructions)
    assert (instructions[first][0], instructions[last][0]) == (0x40, 0x90)
    ops = parse_sass(SASS_TWO_LOOPS)["loop_opcodes"]
    assert ops == Counter({"FMUL": 1, "SYNCS": 1, "BRA": 2, "MUFU.EX2": 1, "LOP3": 1})


def test_loop_costs_normalise_by_the_scores_of_an_iteration():
    # 64 instructions, 4 warps (128 threads), 2 tiles of 64 x 64 per iteration, D split in two (recomputed).
    ops = Counter({"FFMA": 40, "MUFU.EX2": 16, "MUFU.RCP": 8})
    costs = loop_costs(ops, {"BLOCK_M": 64, "BLOCK_N": 64, "HEAD_DIM": 64, "D_SPLIT": 32}, num_warps=4, tiles=2)
    per_score = 128 * 2 / (64 * 64 * 2)
    assert costs["lane_instr_per_score"] == round(64 * per_score, 2)
    assert costs["mufu_per_score"] == round(24 * per_score, 3)
    assert costs["mix"]["FFMA"] == round(40 * per_score, 2) and list(costs["mix"])[0] == "FFMA"
    with pytest.raises(ValueError):
        loop_costs(Counter(), {"BLOCK_M": 64, "BLOCK_N": 64, "HEAD_DIM": 64}, num_warps=4, tiles=1)
