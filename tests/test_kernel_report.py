"""Compile check of the fused kernels, no GPU needed: `bench/kernel_report.py` compiles the kernel
configurations the op can launch for sm_80 and sm_90 and reads registers, spills and SASS.

By default the check compiles each block configuration once (`--sample`: dtype, dot precision and dropout
variants rotate over the configurations, bf16 included), which fits the CI budget on 2 cores; set
DCAMA_FULL_COMPILE_CHECK=1 to compile every shipped configuration (about 360 x 2 compiles).
The report runs as a subprocess without TRITON_INTERPRET: kernels decorated under the interpreter
cannot be compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.kernel_report import RECORD_KEYS, parse_ptxas, parse_sass

REPO = Path(__file__).resolve().parents[1]
FULL = os.environ.get("DCAMA_FULL_COMPILE_CHECK") == "1"
ARCHS = {"sm_80", "sm_90"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "bench" / "kernel_report.py"), "--json", str(out)] + ([] if FULL else ["--sample"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    records = json.loads(out.read_text()) if out.exists() else []
    return proc, records


def _attention(records: list[dict]) -> list[dict]:
    return [r for r in records if r["config"].get("kernel") != "keep_mask"]


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
        assert isinstance(r["shared_bytes"], int) and isinstance(r["mufu_ex2"], int)
        assert isinstance(r["mma"], list)


def test_each_configuration_on_both_archs_bf16_included(report):
    _, records = report
    archs: dict[str, set] = {}
    for r in records:
        archs.setdefault(r["kernel"], set()).add(r["arch"])
    assert archs and all(a == ARCHS for a in archs.values()), {k: a for k, a in archs.items() if a != ARCHS}
    for arch in ARCHS:
        assert any(r["config"].get("dtype") == "bf16" for r in records if r["arch"] == arch)
    assert {r["config"].get("kernel") for r in records} >= {"fwd", "bwd_dkdv", "bwd_dq"}


def test_no_spills_on_sm90(report):
    _, records = report
    spilling = {r["kernel"]: r["spill_bytes"] for r in records if r["arch"] == "sm_90" and r["spill_bytes"]}
    assert not spilling, f"configurations spilling on sm_90 (bytes of spill stores+loads): {spilling}"


def test_attention_kernels_use_tensor_cores_and_the_exp_unit(report):
    # The keep-mask kernel (dropout_keep_mask) has no matmul by design; every attention kernel has.
    _, records = report
    attention = _attention(records)
    assert attention
    no_mma = [f"{r['kernel']} {r['arch']}" for r in attention if not r["mma"]]
    assert not no_mma, f"no tensor-core instruction in: {no_mma}"
    assert all(r["mufu_ex2"] > 0 for r in attention)  # softmax exponentials (forward and recompute)


def test_parsers_read_ptxas_and_sass_output():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 512 bytes smem\n")
    assert parse_ptxas(log) == {"registers": 168, "spill_bytes": 32, "static_smem": 512}
    sass = ("  /*1620*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT ;\n"
            "  /*1650*/  HMMA.16816.F32.BF16 R12, R32, R38, RZ ;\n"
            "  /*1670*/  MUFU.EX2 R24, R24 ;\n  /*1680*/  MUFU.EX2 R25, R25 ;\n  /*1690*/  MUFU.RCP R2, R2 ;\n")
    parsed = parse_sass(sass)
    assert parsed["mma"] == ["HGMMA.64x64x16.F32.BF16", "HMMA.16816.F32.BF16"] and parsed["mufu_ex2"] == 2
    with pytest.raises(ValueError):
        parse_ptxas("garbage")
