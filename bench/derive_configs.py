"""Derive the fused kernels' block sizes for every GPU architecture class by compiling them, no GPU needed.

    python bench/derive_configs.py [--archs 80 86 89 90 100 120] [--match REGEX] [--cache FILE] [--max-tries 6]

For each architecture class (`kernels.configs.ARCHS`) and each launch (kernel, group, head dim, dropout mode)
whose name matches REGEX (e.g. `bwd_dq 16bit d64 drop1`), it compiles the sm_90 entry (`GPU_CONFIGS`) for that
target with every dtype of the group and reads what it needs (bench/kernel_report.py: shared memory,
tensor-memory columns, registers, spills, a trap body). Where that does not fit the architecture or spills,
it first tries the entry derived for a class with the same limits (sm_86 for sm_89 and sm_120), then
shrinks the entry one step at a time (`shrink_steps`: fewer pipeline stages, smaller head-dim chunks and
key tiles, fewer key sub-tiles, more warps per tile, smaller BLOCK_M, in an order chosen by what failed) and
keeps the first variant that fits without spilling, else the least-spilling one that fits (reported as such).

It writes `kernels/arch_configs.py`: the derived entries with the reason, and every measurement (the runtime
prunes by them on a device with less shared memory than its class). Measurements are cached in FILE and the
module is rewritten after each launch, so an interrupted run loses one compile and a rerun, or a run over
other archs or launches, compiles only what is missing. Each measurement records the kernel's source hash
(`JITFunction.cache_key`) and the triton version: after a kernel change, or under another triton release, the
cached ones are stale and are measured again (another release's stay in FILE for a run under it). The module
names the triton it holds for; under another release a run must cover every launch and class. About
1-50 s per compile (spilling kernels are the slow ones); the launches the sm_90 entry already serves cost one
compile per dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # compiling needs real JITFunctions: the kernels must not be decorated for the interpreter
    os.environ.pop("TRITON_INTERPRET", None)

import triton

from bench.kernel_report import limit_problems
from dcama.files import write_json
from kernels.configs import ARCHS, CONFIG_FIELDS, TRITON_VERSION, Config, base_candidates, config_problem, \
    derived_with, dq_in_forward, launch_keys, triton_release
from kernels.ops import KERNELS

MODULE = Path(__file__).resolve().parents[1] / "kernels" / "arch_configs.py"
DEFAULT_CACHE = Path.home() / ".cache" / "dcama" / "derive_configs.json"
# Which field to shrink first, by what failed: resources (shared memory, tensor memory: the pipeline's
# buffers and the resident tiles) or registers (spills: the live tiles per thread).
# Software pipelining holds the next tiles in registers too, hence num_stages early for both.
SHRINK_ORDER = {"resources": ("num_stages", "D_CHUNK", "BLOCK_N", "BLOCK_M", "KEY_TILES", "D_SPLIT"),
                "registers": ("num_stages", "BLOCK_N", "KEY_TILES", "num_warps", "D_SPLIT", "D_CHUNK", "BLOCK_M")}
Key = tuple[str, str, int, int]
WHY_WIDTH = 90  # the reasons are written as string pieces of this length (the repository's 120-column limit)


def launch_name(key: Key) -> str:
    kernel, group, head_dim, bits = key
    return f"{kernel} {group} d{head_dim} drop{bits}"


def shrink_steps(kernel: str, head_dim: int, entry: Config, cause: str) -> list[tuple[Config, str]]:
    """The valid one-step shrinks of `entry`, most promising first for `cause`, each with its description:
    one pipeline stage fewer, D_CHUNK / D_SPLIT / KEY_TILES / BLOCK_N / BLOCK_M halved, or 4 -> 8 warps (the
    tile spread over twice the threads, so half the registers each)."""
    fields = CONFIG_FIELDS[kernel]
    out = []
    for name in SHRINK_ORDER[cause]:
        if name not in fields:
            continue
        value = entry[fields.index(name)]
        # Pipeline stages step down one at a time (each holds a whole tile set); the block sizes halve.
        new = {"num_warps": 8 if value == 4 else value, "num_stages": value - 1}.get(name, value // 2)
        if new == value or new < 1:
            continue
        variant = tuple(new if f == name else v for f, v in zip(fields, entry))
        if config_problem(kernel, head_dim, variant) is None:
            out.append((variant, f"{name} {value}->{new}"))
    return out


def _dtypes(group: str) -> list[Any]:
    from bench.kernel_specs import GROUP_VARIANTS

    return [dtype for dtype, _ in GROUP_VARIANTS[group]]


def measure(arch: str, key: Key, entry: Config, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The worst usage of `entry` over the group's dtypes on `arch` (compiled, or from the cache), for a forward
    with E and without; stops at the first that does not fit."""
    from bench.kernel_report import compile_record
    from bench.kernel_specs import spec_of

    kernel, group, head_dim, bits = key
    worst: dict[str, Any] = {}
    # A forward that computes E in training also runs without it (evaluation, C > 1): the entry must serve both.
    modes = (True, False) if kernel == "fwd" and dq_in_forward(group, 1, head_dim, arch) else (True,)
    for dtype, training in [(dtype, training) for dtype in _dtypes(group) for training in modes]:
        spec = spec_of(kernel, group, dtype, head_dim, bits, entry, arch, training)
        name = f"{arch} {spec['name']}"
        if name not in cache:
            record = compile_record(spec, ARCHS[arch].capability)
            cache[name] = {"arch": arch, "key": list(key), "entry": list(entry), "num_warps": spec["num_warps"],
                           "source": spec["fn"].cache_key, "triton": triton.__version__,
                           "with_e": spec["config"].get("dq_in_fwd", False),
                           **{k: record[k] for k in USAGE_KEYS if k != "num_warps"}}
        usage = cache[name]
        worst = {k: max(worst.get(k, 0), usage[k]) for k in USAGE_KEYS}
        if usage_problems(arch, worst):
            break
    return worst


USAGE_KEYS = ("shared_bytes", "tmem_columns", "registers", "spill_bytes", "trap", "num_warps")


def current_measurements(cache: dict[str, dict[str, Any]], sources: dict[str, str],
                         triton_version: str) -> dict[str, dict[str, Any]]:
    """The cached measurements taken from the kernels' current source (`sources`: kernel -> its JITFunction's
    cache_key, which hashes the source of the kernel and every function it calls) under `triton_version`'s
    release: one of an earlier source or another release is stale, since either can move registers, spills and
    shared memory (triton 3.6 spills entries 3.8 compiles without; docs/kernels.md, "Architectures")."""
    return {name: usage for name, usage in cache.items() if usage.get("source") == sources[usage["key"][0]]
            and triton_release(usage.get("triton", "")) == triton_release(triton_version)}


def usage_problems(arch: str, usage: dict[str, Any]) -> list[str]:
    """What keeps `usage` from shipping on `arch`: a limit (bench.kernel_report.limit_problems) or a spill."""
    return limit_problems(arch, usage) + ([f"spills {usage['spill_bytes']} B"] if usage["spill_bytes"] else [])


def derive(arch: str, key: Key, cache: dict[str, dict[str, Any]], max_tries: int,
           seeds: tuple[tuple[str, Config], ...] = (),
           previous: tuple[Config | None, str] | None = None) -> tuple[Config | None, str] | None:
    """(entry, why) replacing the sm_90 entry of `key` on `arch`, or None when that entry fits there; entry None
    when no variant fits `arch` (reported as NO VARIANT FITS). `seeds`:
    (arch, entry) derived for classes with the same limits, tried first (a compile or two instead of a search);
    `previous`: the entry derived before for `arch`, kept while it still fits without spilling."""
    kernel, _, head_dim, _ = key
    base = base_candidates(*key)[0]
    usage = measure(arch, key, base, cache)
    problems = usage_problems(arch, usage)
    if not problems:
        return None
    why = f"sm_90 entry {base}: {', '.join(problems)}"
    if previous and previous[0] and not usage_problems(arch, measure(arch, key, previous[0], cache)):
        # Its reason stays while it states what the sm_90 entry measures now (a kernel change can alter that).
        return previous if previous[1].startswith(why) else (previous[0], f"{why}; the entry derived before")
    # Best first: try every one-step shrink of the current entry (the first clean one wins), then go on from the
    # least-spilling one of those that fit (spills do not always fall as tiles shrink).
    tried: list[tuple[Config, dict[str, Any], list[str]]] = [(base, usage, [])]
    entry, steps = base, []

    def badness(t: tuple[Config, dict[str, Any], list[str]]) -> tuple[bool, int]:  # fits first, then fewer spills
        return bool(limit_problems(arch, t[1])), t[1]["spill_bytes"]

    for seed_arch, seed in seeds:
        seed_usage = measure(arch, key, seed, cache)
        tried.append((seed, seed_usage, [f"the entry derived for {seed_arch}"]))
        if not usage_problems(arch, seed_usage):
            return seed, f"{why}; {tried[-1][2][0]}"
    while len(tried) <= max_tries + len(seeds):
        level = []
        for variant, step in shrink_steps(kernel, head_dim, entry, "registers" if problems == [
                f"spills {usage['spill_bytes']} B"] else "resources")[:max_tries + 1 + len(seeds) - len(tried)]:
            variant_usage = measure(arch, key, variant, cache)
            tried.append((variant, variant_usage, [*steps, step]))
            if not usage_problems(arch, variant_usage):
                return variant, f"{why}; {', '.join(tried[-1][2])}"
            level.append(tried[-1])
        if not level:
            break
        entry, usage, steps = min(level, key=badness)
        problems = usage_problems(arch, usage)
    entry, usage, steps = min(tried, key=badness)
    if limit_problems(arch, usage):  # the launch is not supported there: no candidate (kernels.configs.candidates)
        return None, f"{why}; NO VARIANT FITS in {len(tried) - 1} tries"
    return entry, (f"{why}; {', '.join(steps) or 'kept'} (least spilling of {len(tried)} tried: "
                   f"{usage['spill_bytes']} B)")


def _measured(cache: dict[str, dict[str, Any]]) -> dict[str, dict[tuple, tuple[int, ...]]]:
    """arch -> (key..., entry) -> worst (shared, tmem, registers, spill) over the dtypes measured, of the kernels
    the op launches there: a forward with E only where kernels.configs.dq_in_forward says so (a cached one of a
    class where it no longer does is left out)."""
    out: dict[str, dict[tuple, tuple[int, ...]]] = {}
    for usage in cache.values():
        _, group, head_dim, _ = usage["key"]
        if usage.get("with_e") and not dq_in_forward(group, 1, head_dim, usage["arch"]):
            continue
        slot = (*usage["key"], tuple(usage["entry"]))
        old = out.setdefault(usage["arch"], {}).get(slot, (0, 0, 0, 0))
        new = (usage["shared_bytes"], usage["tmem_columns"], usage["registers"], usage["spill_bytes"])
        out[usage["arch"]][slot] = tuple(max(a, b) for a, b in zip(old, new))
    return out


def module_text(derived: dict[str, dict[Key, tuple[Config, str]]], cache: dict[str, dict[str, Any]],
                command: str, triton_version: str) -> str:
    lines = ['"""GENERATED by bench/derive_configs.py: do not edit by hand. Regenerate with', "",
             f"    {command}", "",
             'and see docs/kernels.md, "Architectures"."""', "",
             "# The triton whose compiles these tables hold (kernels.ops warns when another one runs them).",
             f"TRITON_VERSION = {triton_version!r}",
             "# DERIVED[arch][(kernel, group, head dim, DROP_BITS)] = (entry, why): where the sm_90 entry does not fit",
             "# `arch` or spills there; entry None where no variant fits (the launch is not supported there).",
             "DERIVED: dict[str, dict[tuple[str, str, int, int], tuple[tuple[int, ...] | None, str]]] = {"]
    for arch in sorted(derived, key=lambda a: ARCHS[a].capability):
        lines.append(f"    {arch!r}: {{")
        for key in sorted(derived[arch]):
            entry, why = derived[arch][key]
            pieces = [why[i:i + WHY_WIDTH] for i in range(0, len(why), WHY_WIDTH)]
            lines += [f"        {key!r}:", f"            ({entry!r},",
                      *(f"             {piece!r}" for piece in pieces[:-1]), f"             {pieces[-1]!r}),"]
        lines.append("    },")
    lines += ["}",
              "# MEASURED[arch][(kernel, group, head dim, DROP_BITS, entry)] = (shared bytes, tensor-memory columns,",
              "# registers, spill bytes), the largest over the group's dtypes measured (fp16 and bf16 for \"16bit\").",
              "MEASURED: dict[str, dict[tuple[str, str, int, int, tuple[int, ...]], tuple[int, int, int, int]]] = {"]
    measured = _measured(cache)
    for arch in sorted(measured, key=lambda a: ARCHS[a].capability):
        lines.append(f"    {arch!r}: {{")
        lines += [f"        {slot!r}: {usage!r}," for slot, usage in sorted(measured[arch].items())]
        lines.append("    },")
    return "\n".join(lines + ["}", ""])


def split_by_release(records: list[dict[str, Any]], triton_version: str) -> tuple[list[dict[str, Any]],
                                                                                  dict[str, dict[str, Any]]]:
    """The cache file's records as (those of another triton release, kept in the file for a derivation under it;
    the rest by name, for `current_measurements`). A record that names no release counts as the rest's, stale."""
    release = triton_release(triton_version)
    other = [r for r in records if "triton" in r and triton_release(r["triton"]) != release]
    return other, {r["name"]: r for r in records if "triton" not in r or triton_release(r["triton"]) == release}


def _load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, nargs="+", default=[a.capability for a in ARCHS.values()])
    parser.add_argument("--match", metavar="REGEX", help="only the launches whose name ('bwd_dq 16bit d64 drop1') "
                                                          "matches")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="measurements kept between runs")
    parser.add_argument("--max-tries", type=int, default=6, help="variants compiled per launch before giving up")
    args = parser.parse_args(argv)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    from kernels.arch_configs import DERIVED

    names = {a.capability: name for name, a in ARCHS.items()}
    unknown = [cc for cc in args.archs if cc not in names]
    if unknown:
        parser.error(f"--archs {unknown}: not in kernels.configs.ARCHS ({sorted(names)})")
    running = triton.__version__
    if not derived_with(running) and (args.match or sorted(args.archs) != sorted(names)):
        parser.error(f"kernels/arch_configs.py holds for triton {TRITON_VERSION}; under triton {running} derive "
                     "every launch on every class (no --match, no --archs), so that it holds for one release")
    other_releases, loaded = split_by_release(_load(args.cache), running)
    cache = current_measurements(loaded, {kernel: fn.cache_key for kernel, fn in KERNELS.items()}, running)
    if len(cache) < len(loaded):
        print(f"{len(loaded) - len(cache)} cached measurements are of an earlier kernel source (or name no triton "
              "release): measuring again")
    derived = {arch: dict(by_key) for arch, by_key in DERIVED.items()}
    command = "python bench/derive_configs.py --cache FILE  # reusing the measurements of earlier runs"
    keys = [k for k in launch_keys() if args.match is None or re.search(args.match, launch_name(k))]
    start = time.perf_counter()
    for n, key in enumerate(keys, 1):
        for cc in args.archs:
            arch = names[cc]
            same_limits = [other for other in derived if other != arch and derived[other].get(key, (None,))[0]
                           and (ARCHS[other].shared_bytes, ARCHS[other].tmem_columns) ==
                           (ARCHS[arch].shared_bytes, ARCHS[arch].tmem_columns)]
            result = derive(arch, key, cache, args.max_tries, tuple((o, derived[o][key][0]) for o in same_limits),
                            derived.get(arch, {}).get(key))
            derived.setdefault(arch, {}).pop(key, None)
            if result:
                derived[arch][key] = result
            print(f"[{n}/{len(keys)} {time.perf_counter() - start:.0f} s] {arch} {launch_name(key)}: "
                  f"{result[1] if result else 'the sm_90 entry fits'}", flush=True)
            write_json(args.cache, other_releases + [{"name": name, **usage} for name, usage in cache.items()])
            MODULE.write_text(module_text({a: d for a, d in derived.items() if d}, cache, command, running))
    return 0


if __name__ == "__main__":
    sys.exit(main())
