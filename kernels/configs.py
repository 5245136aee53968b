"""Block sizes of the fused kernels: the single source for the autotuner (kernels/ops.py) and the compile
report (bench/kernel_specs.py). Why these sizes: docs/kernels.md, "Kernels and memory"."""

from __future__ import annotations

from kernels.fused import CALL_COLUMNS, SUB_TILE

Config = tuple[int, ...]
# The fields of each kernel's entries, in order; num_warps and num_stages are the launch options.
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "fwd": ("BLOCK_M", "BLOCK_N", "D_CHUNK", "num_warps", "num_stages"),
    "bwd_dkdv": ("BLOCK_M", "BLOCK_N", "KEY_TILES", "D_CHUNK", "D_SPLIT", "num_warps", "num_stages"),
    "bwd_dq": ("BLOCK_M", "BLOCK_N", "D_CHUNK", "D_SPLIT", "num_warps", "num_stages"),
}
# GPU_CONFIGS[kernel][group][head dim] (group: `config_group`): the autotuner's candidates. Every BLOCK_M is a
# multiple of 16 and every BLOCK_N a multiple of 64 (the dropout streams' granularity, kernels/fused.py). D_CHUNK < D
# reads q and k in head-dim chunks (3xTF32 dots triple the operand footprint).
GPU_CONFIGS: dict[str, dict[str, dict[int, list[Config]]]] = {
    "fwd": {
        "16bit": {16: [(128, 64, 16, 4, 3)], 32: [(128, 64, 32, 4, 3)], 64: [(128, 64, 64, 4, 3)],
                  128: [(128, 64, 128, 8, 2)], 256: [(128, 64, 64, 8, 1)]},
        "tf32": {16: [(128, 64, 16, 8, 2)], 32: [(128, 64, 32, 8, 2)], 64: [(128, 64, 64, 8, 2)],
                 128: [(128, 64, 32, 8, 1)], 256: [(128, 64, 16, 8, 1)]},
        "tf32x3": {16: [(128, 64, 16, 8, 1)], 32: [(128, 64, 32, 8, 1)], 64: [(128, 64, 16, 8, 1)],
                   128: [(128, 64, 16, 8, 1)], 256: [(64, 64, 16, 4, 1)]},
    },
    "bwd_dkdv": {
        "16bit": {16: [(64, 64, 4, 16, 16, 4, 1)], 32: [(64, 64, 4, 32, 32, 4, 1)], 64: [(64, 64, 2, 64, 64, 4, 1)],
                  128: [(64, 64, 1, 128, 128, 4, 1)], 256: [(32, 64, 1, 256, 256, 4, 1)]},
        "tf32": {16: [(64, 64, 2, 16, 16, 4, 1)], 32: [(64, 64, 2, 32, 32, 4, 1)], 64: [(64, 64, 1, 64, 64, 4, 1)],
                 128: [(32, 64, 1, 128, 128, 4, 1)], 256: [(32, 64, 1, 256, 256, 4, 1)]},
        "tf32x3": {16: [(128, 64, 1, 16, 16, 8, 1)], 32: [(128, 64, 1, 32, 32, 8, 1)], 64: [(32, 64, 1, 32, 64, 4, 1)],
                   128: [(32, 64, 1, 32, 64, 4, 1)], 256: [(32, 64, 1, 32, 64, 4, 1)]},
    },
    "bwd_dq": {
        "16bit": {16: [(128, 64, 16, 16, 4, 3)], 32: [(128, 64, 32, 32, 4, 3)], 64: [(128, 64, 64, 64, 8, 3)],
                  128: [(128, 64, 128, 128, 8, 2)], 256: [(128, 64, 64, 128, 8, 1)]},
        "tf32": {16: [(128, 64, 16, 16, 8, 1)], 32: [(128, 64, 32, 32, 8, 1)], 64: [(128, 64, 64, 64, 8, 1)],
                 128: [(16, 64, 128, 128, 8, 1)], 256: [(64, 64, 16, 32, 4, 1)]},
        "tf32x3": {16: [(128, 64, 16, 16, 8, 1)], 32: [(128, 64, 32, 32, 8, 1)], 64: [(128, 64, 16, 64, 8, 1)],
                   128: [(64, 64, 16, 64, 4, 1)], 256: [(64, 64, 16, 64, 4, 1)]},
    },
}
# With 16-bit dropout slices (p != 1/2) a 64-column sub-tile needs four Philox calls per stream: where the
# default entry runs out of registers with them, these entries replace it for that dropout mode.
SLICE_CONFIGS: dict[str, dict[str, dict[int, list[Config]]]] = {
    "fwd": {"16bit": {64: [(128, 64, 64, 8, 3)]}},
    "bwd_dkdv": {"16bit": {16: [(64, 64, 2, 16, 16, 4, 1)], 32: [(64, 64, 2, 32, 32, 4, 1)]}},
    "bwd_dq": {"16bit": {16: [(128, 64, 16, 16, 8, 3)], 32: [(128, 64, 32, 32, 8, 3)]}},
}
# The dropout modes a launch can be in, as DROP_BITS: none, 1-bit decisions (p = 1/2), 16-bit slices (any other p).
FINE_DROP_BITS = 16
DROP_MODES = (0, 1, FINE_DROP_BITS)
KEEP_MASK_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
# Under TRITON_INTERPRET=1 (no autotuning possible) one small configuration keeps the interpreter fast;
# D_CHUNK = min(D, 64) so that the tests exercise the resident and the chunked score paths, and a dk/dv program
# owns all 4 sub-tiles of a Philox call.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64}
INTERPRETER_KEY_TILES = 4
INTERPRETER_D_CHUNK = 64


def config_group(dot_precision: str | None) -> str:
    """The GPU_CONFIGS group of a launch: "16bit" (fp16 / bf16 inputs), else the fp32 dot precision."""
    return dot_precision or "16bit"


def candidates(kernel: str, group: str, head_dim: int, drop_bits: int) -> list[Config]:
    """The autotuner's entries for a launch (SLICE_CONFIGS first when the dropout uses 16-bit slices)."""
    if drop_bits > 1 and head_dim in SLICE_CONFIGS.get(kernel, {}).get(group, {}):
        return SLICE_CONFIGS[kernel][group][head_dim]
    return GPU_CONFIGS[kernel][group][head_dim]


def shipped_entries() -> list[tuple[str, str, int, int, Config]]:
    """(kernel, group, head dim, DROP_BITS, entry) for every candidate the autotuner can be given: what the compile
    report and the interpreter parity tests must cover."""
    return [(kernel, group, head_dim, bits, entry)
            for kernel, groups in GPU_CONFIGS.items() for group, by_dim in groups.items() for head_dim in by_dim
            for bits in DROP_MODES for entry in candidates(kernel, group, head_dim, bits)]


def split_config(kernel: str, entry: Config) -> tuple[dict[str, int], int, int]:
    """An entry as (constexpr block sizes, num_warps, num_stages)."""
    fields = dict(zip(CONFIG_FIELDS[kernel], entry))
    warps, stages = fields.pop("num_warps"), fields.pop("num_stages")
    return fields, warps, stages


def interpreter_meta(kernel: str, head_dim: int) -> dict[str, int]:
    meta = dict(INTERPRETER_BLOCKS)
    for field in ("D_CHUNK", "D_SPLIT"):
        if field in CONFIG_FIELDS[kernel]:
            meta[field] = min(INTERPRETER_D_CHUNK, head_dim)
    if "KEY_TILES" in CONFIG_FIELDS[kernel]:
        meta["KEY_TILES"] = INTERPRETER_KEY_TILES
    return meta


def _check() -> None:
    for kernel, groups in [*GPU_CONFIGS.items(), *SLICE_CONFIGS.items()]:
        for entries in (e for group in groups.values() for e in group.values()):
            for entry in entries:
                meta, _, _ = split_config(kernel, entry)
                sub, call = SUB_TILE.value, CALL_COLUMNS.value
                keys = meta["BLOCK_N"] * meta.get("KEY_TILES", 1)
                if meta["BLOCK_M"] % 16 or meta["BLOCK_N"] % sub or call % keys:
                    raise AssertionError(f"{kernel} {entry}: BLOCK_M must be a multiple of 16, BLOCK_N of {sub}, "
                                         f"and BLOCK_N x KEY_TILES must divide {call}")


_check()
