"""Kernel configurations per GPU architecture (kernels/configs.py, the generated kernels/arch_configs.py,
bench/derive_configs.py) and the device handling of the op (kernels/ops.py, kernels/attention.py): the table
each capability gets, pruning by the device's shared memory, the error for a launch the GPU refuses, and the
non-Triton path below compute capability 8.0. The GPU is faked: capability and properties queries are patched."""

import warnings
from types import SimpleNamespace

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

import kernels.attention as attention
import kernels.configs as configs
import kernels.ops as ops
from bench import derive_configs, kernel_report, kernel_specs
from bench.kernel_report import MAX_SPILL_FREE_HEAD_DIM, limit_problems
from kernels.arch_configs import DERIVED, MEASURED

CUDA0 = torch.device("cuda", 0)


def fake_gpu(monkeypatch: pytest.MonkeyPatch, major: int, minor: int, shared: int = 99 * 1024,
             name: str = "Fake GPU") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        name=name, major=major, minor=minor, shared_memory_per_block_optin=shared))


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, arch", [((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 7), "sm_86"),
                                              ((8, 9), "sm_89"), ((9, 0), "sm_90"), ((10, 0), "sm_100"),
                                              ((10, 3), "sm_100"), ((11, 0), "sm_100"), ((12, 0), "sm_120"),
                                              ((12, 1), "sm_120")])
def test_each_capability_gets_its_class_table(capability, arch):
    assert configs.arch_for_capability(*capability) == arch


@pytest.mark.parametrize("capability, with_e", [((9, 0), True), ((10, 0), True), ((8, 6), False), ((12, 0), False)])
def test_dq_from_the_forward_where_it_does_not_spill(monkeypatch, capability, with_e):
    """The op asks the device's class whether its forward computes E: in 16 bits at D = 64 and in fp32 at 3xTF32
    only on sm_90 and sm_100 (elsewhere no entry served the forward with and without E without spilling); 16 bits
    at D = 32 everywhere; never for D = 128 in fp32; the interpreter and CPU tensors count as sm_90."""
    fake_gpu(monkeypatch, *capability)
    arch = ops.device_arch(CUDA0)
    assert configs.dq_in_forward("16bit", 1, 64, arch) is with_e
    assert configs.dq_in_forward("tf32x3", 1, 32, arch) is with_e
    assert configs.dq_in_forward("16bit", 1, 32, arch) and not configs.dq_in_forward("tf32x3", 1, 128, arch)
    assert ops.device_arch(torch.device("cpu")) == configs.BASE_ARCH


def test_below_capability_8_has_no_table():
    with pytest.raises(ValueError, match="7.5 is below the 8.0"):
        configs.arch_for_capability(7, 5)


def test_derived_entries_replace_the_sm90_entry_on_their_arch_only():
    assert any(DERIVED.values()), "the generated table derives nothing"
    for arch, by_key in DERIVED.items():
        for key, (entry, why) in by_key.items():
            assert configs.candidates(*key, arch=arch) == ([entry] if entry else []) and why.startswith("sm_90 entry")
            assert configs.candidates(*key) == configs.base_candidates(*key)
            assert entry is None and "NO VARIANT FITS" in why or configs.config_problem(key[0], key[2], entry) is None


def test_a_dropout_mode_entry_replaces_the_default_for_that_mode_only():
    for bits, kernels in configs.MODE_CONFIGS.items():
        for kernel, groups in kernels.items():
            for group, by_dim in groups.items():
                for head_dim, entries in by_dim.items():
                    assert configs.base_candidates(kernel, group, head_dim, bits) == entries
                    others = [configs.base_candidates(kernel, group, head_dim, other) for other in configs.DROP_MODES
                              if head_dim not in configs.MODE_CONFIGS.get(other, {}).get(kernel, {}).get(group, {})]
                    assert others and all(o == configs.GPU_CONFIGS[kernel][group][head_dim] for o in others)


def test_shipped_entries_are_the_union_over_architectures():
    shipped = configs.shipped_entries()
    assert len(shipped) == len(set(shipped)) and all(len(e) == 5 for e in shipped)
    expected = {(*key, entry) for arch in configs.ARCHS for key in configs.launch_keys()
                for entry in configs.candidates(*key, arch=arch)}
    assert set(shipped) == expected
    assert {(*key, entry) for arch, d in DERIVED.items() for key, (entry, _) in d.items() if entry} <= set(shipped)


def test_every_measured_shipped_entry_fits_its_architecture():
    """What bench/derive_configs.py measured for each shipped entry: within the arch's limits, no spill at
    D <= 64 (the compile gate checks the same on fresh compiles)."""
    problems = []
    for arch in configs.ARCHS:
        for key in configs.launch_keys():
            for entry in configs.candidates(*key, arch=arch):
                usage = MEASURED.get(arch, {}).get((*key, entry))
                if usage is None:
                    continue
                shared, tmem, registers, spill = usage
                found = limit_problems(arch, {"shared_bytes": shared, "tmem_columns": tmem, "registers": registers,
                                              "num_warps": configs.split_config(key[0], entry)[1], "trap": False})
                found += [f"spills {spill} B"] if spill and key[2] <= MAX_SPILL_FREE_HEAD_DIM else []
                problems += [f"{arch} {key} {entry}: {found}"] if found else []
    assert not problems, "\n".join(problems)


def test_every_shipped_entry_was_measured_on_every_architecture():
    """bench/derive_configs.py compiled every candidate of every launch for every class (the test above then
    holds for all of them): a launch added or an entry changed without rerunning the derivation fails here."""
    missing = [f"{arch} {derive_configs.launch_name(key)} {entry}" for arch in configs.ARCHS
               for key in configs.launch_keys() for entry in configs.candidates(*key, arch=arch)
               if (*key, entry) not in MEASURED.get(arch, {})]
    assert not missing, f"{len(missing)} not measured, e.g. {missing[:5]}; run bench/derive_configs.py"


def test_pruning_keeps_the_entries_that_fit_the_device(monkeypatch):
    key = ("fwd", "16bit", 64, 1)
    entry = configs.candidates(*key, arch="sm_86")[0]
    monkeypatch.setattr(configs, "MEASURED", {"sm_86": {(*key, entry): (60_000, 0, 128, 0)}})
    assert configs.fitting_candidates(*key, "sm_86", 99 * 1024) == [entry]
    assert configs.fitting_candidates(*key, "sm_86", 48 * 1024) == []
    unmeasured = configs.candidates(*key, arch="sm_80")
    assert configs.fitting_candidates(*key, "sm_80", 48 * 1024) == unmeasured, "unmeasured entries are kept"


# ---------------------------------------------------------------------------------------------
# The derivation (compiles faked)
# ---------------------------------------------------------------------------------------------
def test_shrink_steps_follow_the_cause_and_stay_valid():
    steps = derive_configs.shrink_steps("bwd_dq", 64, (128, 64, 64, 64, 4, 3), "resources")
    assert [s for _, s in steps][:3] == ["num_stages 3->2", "D_CHUNK 64->32", "BLOCK_M 128->64"]
    steps = derive_configs.shrink_steps("bwd_dkdv", 32, (64, 64, 4, 32, 32, 4, 1), "registers")
    assert [s for _, s in steps][:2] == ["KEY_TILES 4->2", "num_warps 4->8"]
    assert all(configs.config_problem("bwd_dkdv", 32, v) is None for v, _ in steps)
    steps = derive_configs.shrink_steps("fwd", 32, (128, 128, 32, 8, 2), "registers")
    assert [s for _, s in steps][:2] == ["num_stages 2->1", "BLOCK_N 128->64"]
    assert "D_CHUNK 16->8" not in [s for _, s in derive_configs.shrink_steps("fwd", 16, (64, 64, 16, 4, 1),
                                                                           "resources")]


def fake_usage(shared=0, tmem=0, registers=128, spill=0, trap=False, num_warps=4):
    return {"shared_bytes": shared, "tmem_columns": tmem, "registers": registers, "spill_bytes": spill, "trap": trap,
            "num_warps": num_warps}


def test_derive_keeps_the_first_variant_that_fits_without_spilling(monkeypatch):
    """Best first: every one-step shrink of the sm_90 entry, then on from the least-spilling one that fits."""
    key = ("fwd", "16bit", 128, 1)  # sm_90 entry (128, 64, 128, 8, 2)
    usage = {(128, 64, 128, 8, 2): fake_usage(shared=110_000), (128, 64, 128, 8, 1): fake_usage(shared=104_000),
             (128, 64, 64, 8, 2): fake_usage(shared=80_000, spill=8), (64, 64, 128, 8, 2): fake_usage(shared=105_000),
             (128, 64, 64, 8, 1): fake_usage(shared=70_000)}
    monkeypatch.setattr(derive_configs, "measure", lambda arch, k, entry, cache: usage[entry])
    entry, why = derive_configs.derive("sm_86", key, {}, max_tries=4)
    assert entry == (128, 64, 64, 8, 1)
    assert "110000 B shared memory > 101376" in why and why.endswith("D_CHUNK 128->64, num_stages 2->1")
    assert derive_configs.derive("sm_90", key, {}, max_tries=4) is None  # fits the H100's 227 KB
    entry, why = derive_configs.derive("sm_86", key, {}, max_tries=3)
    assert entry == (128, 64, 64, 8, 2) and "least spilling of 4 tried: 8 B" in why


def test_derive_tries_the_entry_of_a_class_with_the_same_limits_first(monkeypatch):
    usage = {(128, 64, 128, 8, 2): fake_usage(shared=110_000), (64, 64, 64, 8, 2): fake_usage(shared=60_000)}
    monkeypatch.setattr(derive_configs, "measure", lambda arch, k, entry, cache: usage[entry])
    entry, why = derive_configs.derive("sm_120", ("fwd", "16bit", 128, 1), {}, 4, (("sm_86", (64, 64, 64, 8, 2)),))
    assert entry == (64, 64, 64, 8, 2) and why.endswith("; the entry derived for sm_86")


def test_derive_keeps_the_entry_derived_before_while_it_fits(monkeypatch):
    """With its reason while that still states what the sm_90 entry measures; with the new measurement when a
    kernel change altered it."""
    usage = {(128, 64, 128, 8, 2): fake_usage(shared=110_000), (64, 64, 64, 8, 2): fake_usage(shared=60_000)}
    monkeypatch.setattr(derive_configs, "measure", lambda arch, k, entry, cache: usage[entry])
    why = "sm_90 entry (128, 64, 128, 8, 2): 110000 B shared memory > 101376"
    previous = ((64, 64, 64, 8, 2), f"{why}; BLOCK_M 128->64, D_CHUNK 128->64, given by hand")
    assert derive_configs.derive("sm_86", ("fwd", "16bit", 128, 1), {}, 4, (), previous) == previous
    stale = ((64, 64, 64, 8, 2), "sm_90 entry (128, 64, 128, 8, 2): 133000 B shared memory > 101376; BLOCK_M 128->64")
    assert derive_configs.derive("sm_86", ("fwd", "16bit", 128, 1), {}, 4, (), stale) == (
        (64, 64, 64, 8, 2), f"{why}; the entry derived before")


def test_derive_reports_when_no_variant_fits(monkeypatch):
    monkeypatch.setattr(derive_configs, "measure", lambda arch, k, entry, cache: fake_usage(tmem=640, trap=True))
    entry, why = derive_configs.derive("sm_100", ("bwd_dq", "16bit", 16, 1), {}, max_tries=2)
    assert entry is None, "a launch no variant fits is not supported there: no candidate"
    assert "640 tensor-memory columns > 512" in why and "compiles to a trap" in why and "NO VARIANT FITS" in why


def test_measurements_of_an_earlier_kernel_source_or_another_triton_are_dropped(monkeypatch):
    """measure() records the kernel's source hash and the triton version; the cache keeps only what the current
    source measured with the running triton."""
    monkeypatch.setattr(kernel_report, "compile_record", lambda spec, cc: fake_usage(shared=5))
    monkeypatch.setattr(kernel_specs, "spec_of", lambda kernel, group, dtype, *args: {
        "name": f"fwd_{dtype}", "num_warps": 4, "fn": SimpleNamespace(cache_key="new"), "config": {}})
    running = triton.__version__
    cache = {"sm_86 fwd_torch.float16": {"arch": "sm_86", "key": ["fwd", "16bit", 16, 0], "source": "old",
                                         "triton": running, **fake_usage(shared=9)},
             "sm_86 fwd_torch.bfloat16": {"arch": "sm_86", "key": ["fwd", "16bit", 16, 0], "source": "new",
                                          "triton": "3.6.0", **fake_usage(shared=9)}}
    cache = derive_configs.current_measurements(cache, {"fwd": "new"}, running)
    assert cache == {}
    assert derive_configs.measure("sm_86", ("fwd", "16bit", 16, 0), (64, 64, 16, 4, 1), cache)["shared_bytes"] == 5
    assert {(usage["source"], usage["triton"]) for usage in cache.values()} == {("new", running)}
    assert len(cache) == 2  # fp16 and bf16
    assert derive_configs.current_measurements(cache, {"fwd": "newer"}, running) == {}
    assert derive_configs.current_measurements(cache, {"fwd": "new"}, "3.6.0") == {}


def test_the_cache_keeps_other_releases_and_a_partial_derivation_under_one_is_refused(monkeypatch, capsys):
    records = [{"name": "a", "triton": "3.6.0"}, {"name": "a", "triton": "3.8.1"}, {"name": "b"}]
    other, mine = derive_configs.split_by_release(records, "3.8.0")
    assert other == [records[0]] and mine == {"a": records[1], "b": records[2]}
    for module in (configs, derive_configs):  # the tables of another release than the running one
        monkeypatch.setattr(module, "TRITON_VERSION", "9.9.0")
    for partial in (["--match", "fwd 16bit d16 drop0"], ["--archs", "90"]):
        with pytest.raises(SystemExit):
            derive_configs.main(partial)
        assert "holds for triton 9.9.0" in capsys.readouterr().err


def test_generated_module_round_trips():
    derived = {"sm_86": {("fwd", "16bit", 128, 1): ((64, 64, 64, 8, 1), "sm_90 entry (...): " + "x" * 200)}}
    cache = {"a": {"arch": "sm_86", "key": ["fwd", "16bit", 128, 1], "entry": [64, 64, 64, 8, 1],
                   "shared_bytes": 5, "tmem_columns": 0, "registers": 100, "spill_bytes": 0},
             "b": {"arch": "sm_86", "key": ["fwd", "16bit", 128, 1], "entry": [64, 64, 64, 8, 1],
                   "shared_bytes": 7, "tmem_columns": 0, "registers": 90, "spill_bytes": 4}}
    text = derive_configs.module_text(derived, cache, "python bench/derive_configs.py", "3.8.0")
    assert max(len(line) for line in text.splitlines()) <= 120
    namespace: dict = {}
    exec(text, namespace)
    assert namespace["TRITON_VERSION"] == "3.8.0" and namespace["DERIVED"] == derived
    assert namespace["MEASURED"] == {"sm_86": {("fwd", "16bit", 128, 1, (64, 64, 64, 8, 1)): (7, 0, 100, 4)}}


def test_measured_leaves_out_a_forward_with_e_where_it_does_not_run():
    """A cached forward with E of a class where kernels.configs.dq_in_forward is False (the evaluation forward runs
    there with the same entry) does not count in MEASURED."""
    usage = {"key": ["fwd", "16bit", 64, 1], "entry": [64, 64, 64, 8, 1], "tmem_columns": 0, "registers": 100}
    cache = {arch + mode: {"arch": arch, "with_e": mode == "e", **usage, "shared_bytes": 5 if mode == "e" else 3,
                           "spill_bytes": 8 if mode == "e" else 0}
             for arch in ("sm_86", "sm_90") for mode in ("e", "eval")}
    assert not configs.dq_in_forward("16bit", 1, 64, "sm_86") and configs.dq_in_forward("16bit", 1, 64, "sm_90")
    measured = derive_configs._measured(cache)
    assert measured["sm_86"] == {("fwd", "16bit", 64, 1, (64, 64, 64, 8, 1)): (3, 0, 100, 0)}
    assert measured["sm_90"] == {("fwd", "16bit", 64, 1, (64, 64, 64, 8, 1)): (5, 0, 100, 8)}


# ---------------------------------------------------------------------------------------------
# The device: capability, pruning, resource errors (GPU faked)
# ---------------------------------------------------------------------------------------------
def test_device_limits_read_capability_and_shared_memory(monkeypatch):
    fake_gpu(monkeypatch, 8, 7, shared=163 * 1024, name="Jetson")
    limits = ops.device_limits(CUDA0)
    assert (limits.arch, limits.shared_bytes) == ("sm_86", 163 * 1024)
    assert "Jetson" in limits.description and "8.7" in limits.description


def _launch(kernel="fwd", head_dim=64, dropout_p=0.5):
    q = torch.zeros(1, 64, 1, head_dim)
    vx = ops.value_operand(torch.zeros(1, 64, 1))
    o, lse2 = torch.zeros(1, 1, 64, 1), torch.zeros(1, 1, 64)
    return ops.fwd_launch(q, q, ops.ForwardOperands(vx, None, None), o, lse2, None, torch.zeros(1, dtype=torch.int64),
                          dropout_p, 0.1, configs.BASE_ARCH)


def test_a_launch_keeps_the_group_of_the_precision_it_was_built_with():
    """The compile report builds each launch under its group's fp32 precision, then restores the setting."""
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        launch = _launch()
        torch.set_float32_matmul_precision("highest")
        assert (launch.constexprs["DOT_PRECISION"], launch.group) == ("tf32", "tf32")
        assert _launch().group == "tf32x3"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_a_device_no_entry_fits_gets_one_error_naming_kernel_configuration_and_device(monkeypatch):
    launch = _launch()
    entry = configs.candidates("fwd", launch.group, 64, 1, arch="sm_86")[0]
    monkeypatch.setattr(configs, "MEASURED", {"sm_86": {("fwd", launch.group, 64, 1, entry): (60_000, 0, 128, 0)}})
    limits = ops.DeviceLimits("sm_86", 48 * 1024, "Small GPU (compute capability 8.6, 49152 B shared memory)")
    with pytest.raises(ops.KernelResourceError) as err:
        ops._autotuned(launch, limits)
    message = str(err.value)
    assert "kernel fwd" in message and "Small GPU" in message
    assert ops.describe_config("fwd", dict(zip(configs.CONFIG_FIELDS["fwd"], entry))) in message


def test_a_launch_no_variant_fits_has_no_candidate_and_its_error_says_why(monkeypatch):
    launch = _launch()
    why = "sm_90 entry (128, 64, 64, 8, 1): 156672 B shared memory > 101376; NO VARIANT FITS in 6 tries"
    monkeypatch.setattr(configs, "DERIVED", {"sm_86": {("fwd", launch.group, 64, 1): (None, why)}})
    assert configs.candidates("fwd", launch.group, 64, 1, arch="sm_86") == []
    assert configs.unsupported_reason("fwd", launch.group, 64, 1, "sm_86") == why
    assert configs.unsupported_reason("fwd", launch.group, 64, 1, "sm_80") is None
    limits = ops.DeviceLimits("sm_86", 100_000, "RTX-like GPU (compute capability 8.6, 100000 B shared memory)")
    with pytest.raises(ops.KernelResourceError) as err:
        ops._autotuned(launch, limits)
    assert "kernel fwd" in str(err.value) and why in str(err.value) and "impl='sdpa'" in str(err.value)
    monkeypatch.setattr(kernel_report, "DERIVED", configs.DERIVED)
    row = next(line for line in kernel_report.format_choices((86,)).splitlines() if f"fwd {launch.group} 64 1" in line)
    assert "| none: not supported |" in row and why in row


def test_another_triton_than_the_tables_were_derived_with_is_warned_of_once_per_class(monkeypatch):
    derived_with = configs.TRITON_VERSION
    assert configs.other_triton_warning(derived_with, "sm_90") is None
    assert configs.other_triton_warning(derived_with.rsplit(".", 1)[0] + ".9", "sm_90") is None  # a patch release
    hopper = configs.other_triton_warning("3.6.0", "sm_90")
    assert "triton 3.6.0" in hopper and derived_with in hopper and "spills" in hopper and "--archs 90" in hopper
    assert "tensor memory" in configs.other_triton_warning("3.6.0", "sm_100")
    monkeypatch.setattr(ops, "_WARNED_OF_TRITON", set())
    monkeypatch.setattr(ops.triton, "__version__", "3.6.0")
    launch = _launch()
    limits = ops.DeviceLimits("sm_86", 100, "Tiny GPU (compute capability 8.6, 100 B shared memory)")
    for expected in (1, 0):  # warned by the first launch built for the class, not by the next
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ops.KernelResourceError):  # no entry fits 100 B: the launch is refused after it
                ops._autotuned(launch, limits)
        assert [str(w.message) for w in caught] == [configs.other_triton_warning("3.6.0", "sm_86")] * expected
    monkeypatch.setattr(ops.triton, "__version__", derived_with)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops._warn_once_of_other_triton("sm_90")
    assert not caught


class RefusingKernel:
    """What triton.autotune returns, for a GPU whose shared memory is smaller than the kernel needs."""
    best_config = SimpleNamespace(kwargs={"BLOCK_M": 128, "BLOCK_N": 64, "D_CHUNK": 64}, num_warps=4, num_stages=3)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise OutOfResources(120_000, 101_376, "shared memory")
        return launch


def test_a_launch_the_gpu_refuses_raises_one_error_naming_kernel_configuration_and_device(monkeypatch):
    fake_gpu(monkeypatch, 8, 6, name="Unforeseen GPU")
    monkeypatch.setattr(ops, "is_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(ops, "_autotuned", lambda launch, limits: RefusingKernel())
    with pytest.raises(ops.KernelResourceError) as err:
        ops.run(_launch())
    message = str(err.value)
    for part in ("kernel fwd", "BLOCK_M=128 BLOCK_N=64 D_CHUNK=64 num_warps=4 num_stages=3", "Unforeseen GPU",
                 "compute capability 8.6", "120000 of shared memory", "101376"):
        assert part in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


# ---------------------------------------------------------------------------------------------
# Below compute capability 8.0
# ---------------------------------------------------------------------------------------------
def test_auto_runs_sdpa_below_capability_8_with_one_warning(monkeypatch):
    fake_gpu(monkeypatch, 7, 5, name="Tesla T4")
    monkeypatch.setattr(attention, "_WARNED_DEVICES", set())
    with pytest.warns(UserWarning, match="Tesla T4 has compute capability 7.5, below the 8.0"):
        assert attention.resolve_impl("auto", CUDA0) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.resolve_impl("auto", CUDA0) == "sdpa"  # once per device


def test_triton_below_capability_8_raises_naming_the_capability(monkeypatch):
    fake_gpu(monkeypatch, 7, 0, name="Tesla V100")
    with pytest.raises(ValueError, match="compute capability 8.0 or newer.*Tesla V100 has 7.0"):
        attention.resolve_impl("triton", CUDA0)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_capability_8_and_newer_runs_the_fused_kernels(monkeypatch, impl):
    fake_gpu(monkeypatch, 8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.resolve_impl(impl, CUDA0) == "triton"
    assert attention.resolve_impl("auto", torch.device("cpu")) == "sdpa"
    assert attention.resolve_impl("naive", CUDA0) == "naive"


@pytest.mark.cuda
def test_this_gpu_has_an_entry_for_every_launch():
    limits = ops.device_limits(torch.device("cuda"))
    missing = [key for key in configs.launch_keys()  # but those measured not to fit its class at all
               if not configs.fitting_candidates(*key, limits.arch, limits.shared_bytes)
               and configs.unsupported_reason(*key, limits.arch) is None]
    assert not missing, f"{limits.description}: no fitting configuration for {missing}"
