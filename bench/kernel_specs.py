"""Every GPU kernel configuration the fused op can launch, as `triton.compile` inputs, for the compile
report (bench/kernel_report.py).

Nothing here lists argument names or types: for each configuration the op's own launch builders
(`kernels.ops.fwd_launch`, `dkdv_launch`, `dq_launch`) are called on meta tensors laid out as dcama/model.py
passes them (q and k views of Linear outputs, a contiguous mask as the value) at a DCAMA training shape,
and Triton's own binder turns those arguments into the signature, constexprs and specialisation
attributes (integers equal to 1 become constexprs, 16-divisible ones get divisibility hints) exactly as
a launch on a GPU would. Needs the kernels imported without TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Any

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from kernels.configs import BASE_ARCH, Config, candidates, dq_in_forward, launch_keys, rank_one_dkdv, split_config
from kernels.fused import main_loop_tiles
from kernels.ops import KERNELS, Launch, backward_operands, copies_in_dkdv, dkdv_launch, dq_launch, \
    dropout_params, effective_dropout_p, forward_operands, fwd_launch, input_group, is_interpreted

# The shape the specialisation is taken at: Swin-B's 1/8 stage (12 episodes, 2 layers stacked in the head
# axis, 48 x 48 tokens, K = 1), any head dim. Nq, Nk and the strides are multiples of 16 at every DCAMA
# shape, so the divisibility hints are the ones a real launch gets.
SPEC_SHAPE = {"batch": 12, "heads": 16, "n_query": 2304, "n_key": 2304, "channels": 1}
# The dtypes (and fp32 matmul precision) of each configuration group, and a dropout_p of each DROP_BITS mode.
GROUP_VARIANTS = {"tf32x3": ((torch.float32, "highest"),), "tf32": ((torch.float32, "high"),),
                  "16bit": ((torch.float16, None), (torch.bfloat16, None))}
DROPOUT_OF_BITS = {0: 0.0, 1: 0.5, 16: 0.1}  # no dropout, 1-bit decisions, 16-bit slices
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SHORT_NAMES = {"BLOCK_M": "m", "BLOCK_N": "n", "D_CHUNK": "c", "KEY_TILES": "t", "D_SPLIT": "x"}


def _launches(dtype: torch.dtype, head_dim: int, dropout_p: float, arch: str, training: bool) -> dict[str, Launch]:
    """The op's three launches at SPEC_SHAPE on `arch`, on meta tensors; the forward of a training step or
    (`training` False) of an evaluation."""
    b, h, nq, nk, c = (SPEC_SHAPE[k] for k in ("batch", "heads", "n_query", "n_key", "channels"))
    meta = torch.device("meta")
    linear = lambda n: torch.empty(b, n, h * head_dim, dtype=dtype, device=meta).view(b, n, h, head_dim)  # noqa: E731
    q, k = linear(nq), linear(nk)
    value = torch.empty(b, nk, c, dtype=dtype, device=meta)
    seed = torch.empty(1, dtype=torch.int64, device=meta)
    lse2 = torch.empty(b, h, nq, dtype=torch.float32, device=meta)
    o = torch.empty(b, h, nq, c, dtype=torch.float32, device=meta)
    grad_o = torch.empty(b, h, nq, c, dtype=torch.float32, device=meta)
    dv = torch.empty(b, h, nk, c, dtype=torch.float32, device=meta)
    scale = head_dim ** -0.5
    drop_scale = 1.0 / (1.0 - effective_dropout_p(dropout_p))
    with_e = training and dq_in_forward(input_group(dtype), c, head_dim, arch)
    operands = forward_operands(k, value, with_e)
    e = torch.empty(b, h, nq, head_dim, dtype=torch.float32, device=meta) if with_e else None
    return {"fwd": fwd_launch(q, k, operands, o, lse2, e, seed, dropout_p, scale, arch),
            "bwd_dkdv": dkdv_launch(q, k, backward_operands(q, k, value, grad_o, o, drop_scale, copies_in_dkdv(dtype),
                                                            rank_one_dkdv(arch, input_group(dtype), c, head_dim,
                                                                          dropout_params(dropout_p)[0])),
                                    lse2, torch.empty_like(k), dv, seed, dropout_p, scale),
            "bwd_dq": dq_launch(q, k, backward_operands(q, k, value, grad_o, o, drop_scale, False), lse2,
                                torch.empty_like(q), seed, c, dropout_p, scale)}


def bind(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of fn(*args, **kwargs) as Triton's launcher computes them
    (triton/runtime/jit.py: JITFunction.run's binder and _pack_args)."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs


def kernel_compile_specs(arch: str = BASE_ARCH) -> list[dict[str, Any]]:
    """One record per GPU kernel configuration the op can launch on `arch` (a kernels.configs.ARCHS key).

    Each record: name, fn (JITFunction), signature, constexprs (by argument name), attrs, num_warps,
    num_stages, config (a JSON-able description) and tiles_per_iteration (score tiles per main-loop
    iteration, by construction of the kernel), such that ``triton.compile(ASTSource(fn, signature,
    constexprs, attrs), target=GPUTarget("cuda", cc, 32), options={"num_warps": .., "num_stages": ..})``
    builds it. Covers kernel x dtype (fp32 with both dot precisions, fp16, bf16) x head dim x autotune
    config x dropout variant (off, 1-bit, 16-bit), with C = 1 (DCAMA's single-channel value). The keep-mask
    kernel behind dropout_keep_mask (tests and impl="naive") is not part of the fused op and is not listed.
    """
    launches = [(kernel, group, dtype, head_dim, bits, entry) for kernel, group, head_dim, bits in launch_keys()
                for dtype, _ in GROUP_VARIANTS[group] for entry in candidates(kernel, group, head_dim, bits, arch)]
    # Where a training step's forward computes E, the evaluation forward (no E) runs with the same entries: its
    # twin, named without "_e".
    twins = [(group, dtype, head_dim, bits, entry) for kernel, group, dtype, head_dim, bits, entry in launches
             if kernel == "fwd" and dq_in_forward(group, 1, head_dim, arch)]
    return [spec_of(*launch, arch) for launch in launches] + \
        [spec_of("fwd", *twin, arch, training=False) for twin in twins]


def spec_of(kernel: str, group: str, dtype: torch.dtype, head_dim: int, drop_bits: int, entry: Config,
            arch: str = BASE_ARCH, training: bool = True) -> dict[str, Any]:
    """The compile record of `kernel` in configuration group `group` run on `dtype` inputs (one of the group's
    GROUP_VARIANTS) at `head_dim` in dropout mode `drop_bits`, with block sizes `entry`, as a training step on
    `arch` launches it (the forward with E where kernels.configs.dq_in_forward says so), or an evaluation."""
    if is_interpreted():
        raise RuntimeError("kernel_compile_specs() needs the kernels imported without TRITON_INTERPRET=1: "
                           "run the compile report in a process where that variable is unset")
    precision = dict(GROUP_VARIANTS[group])[dtype]
    saved = torch.get_float32_matmul_precision()
    try:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        launch = _launches(dtype, head_dim, DROPOUT_OF_BITS[drop_bits], arch, training)[kernel]
    finally:
        torch.set_float32_matmul_precision(saved)
    return _spec(kernel, launch, dtype, entry)


def _spec(kernel: str, launch: Launch, dtype: torch.dtype, entry: Config) -> dict[str, Any]:
    fn = KERNELS[kernel]
    names = [p.name for p in fn.params]
    tt = TRITON_DTYPES[dtype]
    precision = launch.constexprs["DOT_PRECISION"] if dtype == torch.float32 else None
    meta, warps, stages = split_config(kernel, entry)
    signature, constexprs, attrs = bind(fn, launch.args, {**launch.constexprs, **meta, "num_warps": warps,
                                                           "num_stages": stages})
    by_name = {names[path[0]]: value for path, value in constexprs.items()}
    with_e = bool(by_name.get("DQ_IN_FWD"))  # the forward that also computes dq's factor E
    config = {"kernel": kernel, "dtype": tt, "dot_precision": precision, "head_dim": launch.head_dim,
              "channels": by_name["C"], "drop_bits": by_name["DROP_BITS"], **({"dq_in_fwd": True} if with_e else {}),
              **{k.lower(): v for k, v in meta.items()}, "num_warps": warps, "num_stages": stages}
    blocks = "".join(f"{SHORT_NAMES[k]}{v}" for k, v in meta.items())
    return {"name": f"{kernel}{'_e' if with_e else ''}_{tt}{'_' + precision if precision else ''}_d{launch.head_dim}_"
                    f"{blocks}w{warps}s{stages}_drop{by_name['DROP_BITS']}",
            "fn": fn, "signature": signature, "constexprs": by_name, "attrs": attrs,
            "num_warps": warps, "num_stages": stages, "config": config, "group": launch.group, "entry": entry,
            "tiles_per_iteration": main_loop_tiles(kernel, by_name["DROP_BITS"], meta["BLOCK_N"],
                                                  meta.get("KEY_TILES", 1), by_name["DOT_PRECISION"],
                                                  bool(by_name.get("RESCALE_PER_STEP")))}
