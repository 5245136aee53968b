"""The benches on a CPU: schema of their JSON, the activation memory they measure at DCAMA's real shapes
(fake / meta tensors), null times without a GPU, and the shared helpers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.attention import make_call
from bench.common import (DTYPES, AttentionShape, SavedTensorBytes, attention_cost, attention_shape, floors_ms,
                          shape_only)
from bench import gpu_report
from bench.gpu_report import run_step, section, step_ok
from bench.train_step import largest_batch
from dcama.backbones import BACKBONES
from dcama.model import split_heads
from helpers import peaked_stage_attention, stage_attention_reference
from kernels import dcama_attention

REPO = Path(__file__).resolve().parents[1]
TIMED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
ATTENTION_KEYS = {"impl", "backbone", "stage", "shots", "batch", "dtype", "pass", "time_ms", "saved_bytes",
                  "peak_bytes", "tflops", "floor_ms", "device"}
ALL_IMPLS = {"triton", "naive", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex", "xformers"}


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def attention_records(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path, str]:
    tmp = tmp_path_factory.mktemp("attention")
    proc = _run(["bench/attention.py", "--quick", "--json", str(tmp / "a.json"), "--plot", str(tmp / "a.png")], tmp)
    return json.loads((tmp / "a.json").read_text()), tmp / "a.png", proc.stdout


def test_attention_quick_schema_and_rows(attention_records):
    records, plot, stdout = attention_records
    for r in records:
        assert ATTENTION_KEYS <= set(r), ATTENTION_KEYS - set(r)
        assert r["impl"] in ALL_IMPLS and r["dtype"] in ("fp32", "bf16") and r["pass"] in ("fwd", "fwd+bwd")
        assert r["backbone"] in ("swin_b", "resnet50", "resnet101") and r["stage"] in ("1/8", "1/16", "1/32")
        assert r["floor_ms"] > 0
    held = {(r["impl"], r["shots"]) for r in records
            if r["backbone"] == "swin_b" and r["stage"] == "1/8" and r["pass"] == "fwd+bwd"}
    assert held == {(impl, k) for impl in ALL_IMPLS for k in (1, 5)}
    assert plot.stat().st_size > 0
    assert "triton" in stdout


def test_attention_times_null_without_gpu(attention_records):
    records, _, stdout = attention_records
    if TIMED:
        pytest.skip("a GPU is present: the rows are timed")
    assert all(r["time_ms"] is None and r["peak_bytes"] is None and r["tflops"] is None for r in records)
    assert "NOT TIMED" in stdout


def test_fused_op_saves_O_rows_while_naive_saves_O_scores(attention_records):
    """The point of the project, at the Swin-B 1/8 shape: the fused op keeps q, k, v, the output and per-row
    statistics, and E (dq's factor from the forward: 16 bits, and fp32 at TF32 as the benchmark runs it by default),
    O(B*H*Nq*D) besides its inputs; the naive path keeps P, O(B*H*Nq*Nk): at 5 shots at least 20x more besides the
    inputs."""
    records, _, _ = attention_records
    rows = [r for r in records if r["backbone"] == "swin_b" and r["stage"] == "1/8" and r["pass"] == "fwd+bwd"]
    for shots in (1, 5):
        for dtype in ("fp32", "bf16"):
            by_impl = {r["impl"]: r for r in rows if r["shots"] == shots and r["dtype"] == dtype}
            s = attention_shape("swin_b", "1/8", shots)
            elt = torch.tensor([], dtype=DTYPES[dtype]).element_size()
            b, h, nq, nk, d = s.batch, s.heads, s.n_query, s.n_key, s.head_dim
            inputs = elt * (b * nq * h * d + b * nk * h * d + b * nk)
            e_row = d  # E's fp32 per (b, h, row): 16 bits at D <= 64, TF32 at D <= 32 (Swin-B: D = 32)
            extra_bound = 4 * (4 + e_row) * b * h * nq + 64  # a few fp32 per (b, h, row), E, the seed
            fused_bound = inputs + extra_bound
            scores = elt * b * h * nq * nk  # P alone
            triton, naive = by_impl["triton"]["saved_bytes"], by_impl["naive"]["saved_bytes"]
            assert inputs <= triton <= fused_bound
            assert 4 * e_row * b * h * nq <= by_impl["triton"]["saved_extra_bytes"] <= extra_bound
            assert naive >= scores
            assert naive / triton >= scores / fused_bound > 10
            if shots == 5:
                assert by_impl["naive"]["saved_extra_bytes"] >= 20 * by_impl["triton"]["saved_extra_bytes"]


@pytest.mark.parametrize("backbone", ["swin_b", "resnet50", "resnet101"])
def test_shapes_are_the_models(backbone):
    spec = BACKBONES[backbone]
    for stage, stride, layers, channels in zip(("1/8", "1/16", "1/32"), (8, 16, 32), spec.depths[1:],
                                               spec.channels[1:]):
        s = attention_shape(backbone, stage, 5)
        side = 384 // stride
        assert (s.layers, s.heads, s.head_dim, s.batch) == (layers, 8 * layers, channels // 8, 12)
        assert (s.n_query, s.n_key) == (side * side, 5 * side * side)


@pytest.mark.parametrize("impl", ["naive", "triton", "sdpa-math"])
def test_bench_calls_the_attention_as_the_model_does(impl, one_thread):
    """What is timed is what trains: a bench row computes the model's StageAttention output from the same
    projected tokens (layers stacked in the head axis, one mask per episode). Peaked attention (large
    projections) so that heads grouped with the wrong layer would give another output."""
    layers, channels, n_query, shots = 2, 128, 6, 2
    module, query, support, mask = peaked_stage_attention(layers, channels, n_query, shots * n_query, batch=3)
    shape = AttentionShape(backbone="test", stage="1/8", shots=shots, layers=layers, batch=3, heads=8 * layers,
                           n_query=n_query, n_key=shots * n_query, head_dim=channels // 8)
    with torch.no_grad():
        q, k = module.linears[0](query), module.linears[1](support)
        expected = module(query, support, mask, "naive")
        got = make_call(impl, shape, fake=False, dropout_p=0.0)(q, k, mask)
        # Peaked: most of each row's weight on one support token (uniform would be 1/12).
        _, probs = stage_attention_reference(module, query, support, mask)
        assert all(p.amax(-1).mean() > 0.5 for p in probs)
        # The heads of each layer averaged with another layer's: a different answer.
        per_head = dcama_attention(split_heads(q, 8), split_heads(k, 8), mask, head_reduction="none", impl="naive")
        mixed = per_head.reshape(3, 8, layers, n_query).mean(dim=1)
        assert (mixed - expected).abs().max() > 0.05
    assert got.shape == (3, layers, n_query)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cost_model_counts():
    s = attention_shape("swin_b", "1/8", 5)
    # 12 episodes; the stage's 2 layers stacked in the head axis: 2 x 8 heads.
    assert (s.batch, s.heads, s.n_query, s.n_key, s.head_dim) == (12, 16, 2304, 11520, 32)
    r101 = attention_shape("resnet101", "1/16", 1)
    assert (r101.batch, r101.heads, r101.n_query) == (12, 8 * 23, 576)
    assert attention_shape("resnet50", "1/32", 1).head_dim == 256
    cost = attention_cost(s, "bf16", "fwd+bwd")
    assert cost["exps"] == 2 * s.scores  # one exp per score per pass
    assert cost["tc_flops"] == 8 * s.head_dim * s.scores
    f = floors_ms(cost, "bf16")
    assert f["floor_ms"] == max(f["floor_tc_ms"], f["floor_exp_ms"], f["floor_mem_ms"]) == f["floor_exp_ms"]


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(4, 10, requires_grad=True)
    with SavedTensorBytes() as saved:
        y = x[:, :5] * x[:, 5:]  # saves two views of x
        (y * y).sum()  # saves y twice
    assert saved.count == 2 and saved.nbytes == x.nbytes + y.nbytes
    with SavedTensorBytes(exclude=[x]) as saved:
        (x * x).sum()
    assert saved.nbytes == 0
    with shape_only():  # fake tensors at a size no CPU could hold
        big = torch.empty(1 << 20, 1 << 16, requires_grad=True)
        with SavedTensorBytes() as saved:
            (big * big).sum()
    assert saved.nbytes == (1 << 36) * 4


def test_train_step_cpu_mode(tmp_path):
    proc = _run(["bench/train_step.py", "--quick", "--shots", "1", "--json", str(tmp_path / "t.json")], tmp_path)
    records = {r["impl"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    assert set(records) == {"naive", "triton"}
    naive, fused = records["naive"], records["triton"]
    assert 0 < fused["activation_bytes"] < naive["activation_bytes"]
    assert fused["max_batch"] > naive["max_batch"] > 0
    if not TIMED:
        assert fused["step_ms"] is None and fused["peak_bytes"] is None and "NOT TIMED" in proc.stdout
        assert fused["max_batch_basis"].startswith("modelled")


def test_largest_batch_is_linear_fit():
    assert largest_batch(10.0, 20.0, 1, 2, 55.0) == 5  # memory = 10 b
    assert largest_batch(12.0, 22.0, 1, 2, 50.0) == 4  # 2 + 10 b <= 50
    assert largest_batch(5.0, 5.0, 1, 2, 50.0) is None  # no growth measured: no claim


@pytest.mark.skipif(TIMED, reason="a GPU is present: the report would run")
def test_gpu_report_refuses_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_report.py", "--out", str(tmp_path / "r.md")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "REFUSED" in proc.stderr
    assert not (tmp_path / "r.md").exists()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


def test_gpu_report_step_keeps_its_output_at_the_deadline_and_stops_its_workers():
    # Unflushed output in a child started without PYTHONUNBUFFERED, and a worker process of its own.
    child = ("import subprocess, sys, time; worker = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(60)']); print('partial', worker.pid); time.sleep(60)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    started = time.perf_counter()
    step = run_step("sleeper", ["-c", child], env, seconds_left=5.0)
    assert time.perf_counter() - started < 30
    assert step["stopped"].startswith("stopped at the deadline") and "partial" in step["stdout"]
    assert not step_ok(step) and "partial" in section(step)
    worker = int(step["stdout"].split()[1])
    time.sleep(0.5)
    assert not _alive(worker), "the step's own processes outlived the deadline"
    skipped = run_step("late", ["-c", "pass"], dict(os.environ), seconds_left=0.0)
    assert skipped["stopped"].startswith("not run") and not step_ok(skipped)


def test_gpu_report_interrupted_stops_the_step_it_runs(tmp_path):
    pid_file = tmp_path / "step.pid"
    step = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    report = subprocess.Popen([sys.executable, "-c", "from bench.gpu_report import run_step; "
                               f"run_step('step', ['-c', {step!r}], {{}}, None)"], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.perf_counter() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.perf_counter() < deadline and report.poll() is None, report.stderr.read()
        time.sleep(0.1)
    report.send_signal(signal.SIGINT)  # Ctrl-C reaches the report, not the step's own session
    assert report.wait(timeout=30) != 0
    time.sleep(0.5)
    assert not _alive(int(pid_file.read_text())), "the step outlived the interrupted report"


def test_gpu_report_rewrites_the_report_after_every_step(tmp_path, monkeypatch):
    out, titles, seen = tmp_path / "r.md", [], []

    def fake_step(title, args, env, seconds_left):  # what the report held when this step began
        titles.append(title)
        seen.append(out.read_text() if out.exists() else "")
        return {"title": title, "cmd": "python " + " ".join(args), "rc": 0, "seconds": 0.0,
                "stdout": f"output of {title}", "stderr": "", "stopped": None}

    monkeypatch.setattr(gpu_report, "run_step", fake_step)
    assert gpu_report.main(["--allow-cpu", "--out", str(out)]) == 0
    assert len(titles) >= 3 and seen[0] == ""
    assert all(f"output of {titles[i - 1]}" in seen[i] for i in range(1, len(titles)))
    assert f"output of {titles[-1]}" in out.read_text()


def test_gpu_report_writes_what_ran_by_its_deadline(tmp_path):
    out = tmp_path / "new" / "r.md"
    out.parent.mkdir()
    out.with_suffix(".attention.json").write_text("[]")  # an earlier run's, which this one must not report
    proc = subprocess.run([sys.executable, "bench/gpu_report.py", "--allow-cpu", "--quick", "--deadline-s", "1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    report = out.read_text()
    steps = report.count("\n`python ")  # one per step (a GPU adds the parity tests first)
    assert report.count("stopped at the deadline") == 1
    assert report.count("not run: the deadline had passed") == steps - 1 >= 2
    assert not out.with_suffix(".attention.json").exists()
    for title in ("Attention benchmark", "Training step", "Kernel compile report"):
        assert f"## {title}" in report and title in proc.stdout


def test_checkpoint_sizes_count_the_frozen_backbone_once():
    from bench.checkpoint_sizes import run_folder_bytes

    sizes = run_folder_bytes("resnet18")
    frozen, trained = 4 * sizes["frozen_params"], 4 * sizes["trained_params"]  # float32 bytes
    # Before: each file the whole model, the 36 MB of positional encodings and AdamW's two moments.
    assert sizes["before_each_file"] > frozen + 3 * trained + 35_000_000
    assert sizes["backbone_pt"] > frozen and sizes["last_pt"] < frozen  # last.pt: the head and its moments only
    assert 3 * trained < sizes["last_pt"] < 3 * trained + 1_000_000
    assert frozen + trained < sizes["best_pt"] < frozen + trained + 1_000_000  # whole model, no optimiser
    assert sizes["after_run_folder"] == sizes["backbone_pt"] + 2 * sizes["last_pt"] + sizes["best_pt"]
