"""Fused Triton kernels for DCAMA's attention-weighted mask aggregation.

out[b, i] = mean_h sum_j dropout(softmax_j(scale * q[b, i, h] . k[b, j, h]))[h, i, j] * v[b, j]

The forward kernel streams over key tiles with an online softmax (running max ``m`` and running
sum ``l`` in the log2 domain) and keeps the value side a row reduction (C is 1 for DCAMA, so a
padded value matmul would waste the tensor cores). It saves only the per-row log-sum-exp and the
per-head output, O(B*H*Nq*C). Dropout decisions come from a counter-based RNG (Philox) keyed by
(seed, b*H + h, i, j), so the backward kernels regenerate exactly the forward's decisions and
nothing of size Nq x Nk is ever stored. The math is section 7 of the project spec.

Dropout RNG scheme (shared by every kernel through ``_keep_tile``):
  * DROP_BITS = 1 when dropout_p is 0.5 (one bit per decision: an exact Bernoulli(0.5) draw),
    else 16 (16-bit slices: threshold T = round(p * 2**16), at most 2**16 - 1).
  * Column j of row i of head bh uses Philox-4x32-10 with key = the 64-bit seed and counter
    (i, j // (2 * W), bh, 0), W = 32 // DROP_BITS decisions per 32-bit word; the first two output
    words serve 2 * W consecutive columns: word u = (j // W) % 2, slice t = j % W, i.e. bits
    [t * DROP_BITS, (t + 1) * DROP_BITS) of that word.
  * keep <=> slice >= T, so the keep probability is exactly 1 - T / 2**DROP_BITS; kept values are
    scaled by 1 / (1 - T / 2**DROP_BITS) (``effective_dropout_p`` returns T / 2**DROP_BITS).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("auto", "triton", "naive", "sdpa")
HEAD_REDUCTIONS = ("mean", "none")
FINE_DROP_BITS = 16
# Columns served by one Philox call with 1-bit decisions (2 words x 32 bits): the keep mask must not
# depend on the block sizes, so every BLOCK_N is a multiple of it.
MAX_DROP_GROUP = 64

# ---------------------------------------------------------------------------------------------
# Block-size configurations: the single source for the autotuner and kernel_compile_specs().
# GPU_CONFIGS[kernel][dtype group][head dim] = list of block-size tuples (see the field comments).
# BLOCK_N is a multiple of MAX_DROP_GROUP. D_CHUNK < D computes q k^T in head-dim chunks instead of
# keeping the q (or k) tile resident: fp32 "tf32x3" dots triple the operand footprint and need it at
# large D. Every entry (x dtype x dropout variant) compiles spill-free for sm_90a with ptxas.
# fp32 uses smaller tiles than fp16/bf16 for the same reason.
# ---------------------------------------------------------------------------------------------
Config = tuple[int, ...]
GPU_CONFIGS: dict[str, dict[str, dict[int, list[Config]]]] = {
    # fwd entries: (BLOCK_M, BLOCK_N, D_CHUNK, num_warps, num_stages)
    "fwd": {
        "16bit": {16: [(128, 64, 16, 4, 3), (64, 64, 16, 4, 3)], 32: [(128, 64, 32, 4, 3), (64, 64, 32, 4, 3)],
                  64: [(128, 64, 64, 4, 3), (64, 64, 64, 4, 3)], 128: [(128, 64, 128, 8, 2)],
                  256: [(64, 64, 256, 8, 1)]},
        "fp32": {16: [(128, 64, 16, 8, 2), (64, 64, 16, 4, 2)], 32: [(128, 64, 32, 8, 2), (64, 64, 32, 4, 2)],
                 64: [(128, 64, 64, 8, 2), (64, 64, 64, 4, 2)], 128: [(64, 64, 128, 8, 2)],
                 256: [(16, 64, 32, 8, 1)]},
    },
    # backward entries: (BLOCK_M, BLOCK_N, D_CHUNK, D_SPLIT, num_warps, num_stages); D_SPLIT < D splits
    # the dk / dq columns over HEAD_DIM // D_SPLIT programs (each recomputes P) to bound the accumulator.
    "bwd_dkdv": {
        "16bit": {16: [(64, 64, 16, 16, 4, 3)], 32: [(64, 64, 32, 32, 4, 3)], 64: [(64, 64, 64, 64, 4, 3)],
                  128: [(32, 64, 128, 128, 8, 2)], 256: [(32, 64, 256, 256, 8, 1)]},
        "fp32": {16: [(32, 64, 16, 16, 8, 2)], 32: [(32, 64, 32, 32, 8, 2)], 64: [(32, 64, 32, 64, 8, 2)],
                 128: [(32, 64, 32, 64, 8, 1)], 256: [(16, 64, 32, 64, 8, 1)]},
    },
    "bwd_dq": {
        "16bit": {16: [(128, 64, 16, 16, 8, 3)], 32: [(128, 64, 32, 32, 8, 3)], 64: [(128, 64, 64, 64, 8, 3)],
                  128: [(64, 64, 128, 128, 8, 2)], 256: [(64, 64, 256, 256, 8, 1)]},
        "fp32": {16: [(32, 64, 16, 16, 8, 1)], 32: [(64, 64, 32, 32, 8, 1)], 64: [(32, 64, 64, 64, 8, 1)],
                 128: [(16, 64, 128, 128, 8, 1)], 256: [(16, 64, 32, 64, 8, 1)]},
    },
}
KEEP_MASK_CONFIG = (32, 64, 4, 1)
# Under TRITON_INTERPRET=1 (no autotuning possible) one small config keeps the interpreter fast;
# D_CHUNK = D_SPLIT = min(D, 64) so that the tests exercise the resident, chunked and split paths.
INTERPRETER_CONFIG = (32, 64, 64, 64)


assert all(entry[1] % MAX_DROP_GROUP == 0 for kernel in GPU_CONFIGS.values() for group in kernel.values()
           for entries in group.values() for entry in entries), "BLOCK_N must be a multiple of MAX_DROP_GROUP"


def _config_meta(entry: Config) -> tuple[dict[str, int], int, int]:
    """A GPU_CONFIGS entry as (constexpr block sizes, num_warps, num_stages)."""
    *blocks, warps, stages = entry
    return dict(zip(("BLOCK_M", "BLOCK_N", "D_CHUNK", "D_SPLIT"), blocks)), warps, stages


def _dtype_group(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _keep_tile(seed, bh, offs_m, start_n, threshold,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr):
    """Keep decisions [BLOCK_M, BLOCK_N] for rows offs_m and columns start_n + arange(BLOCK_N)."""
    PER_WORD: tl.constexpr = 32 // DROP_BITS
    GROUP: tl.constexpr = 2 * PER_WORD  # columns served by one Philox call (its first two words)
    N_CALLS: tl.constexpr = BLOCK_N // GROUP
    zero = tl.zeros([BLOCK_M, N_CALLS], dtype=tl.uint32)
    c0 = offs_m.to(tl.uint32)[:, None] + zero
    c1 = (start_n // GROUP + tl.arange(0, N_CALLS)).to(tl.uint32)[None, :] + zero
    c2 = zero + bh.to(tl.uint32)
    r0, r1, _, _ = tl.philox(seed, c0, c1, c2, zero)
    # Spread each word over the columns it serves: interleaving x with x >> shift doubles the
    # number of columns per level, so after the last level column t of a word holds slice t.
    words = tl.interleave(r0, r1)
    for level in tl.static_range(5):
        if (16 >> level) >= DROP_BITS:
            words = tl.interleave(words, words >> (16 >> level))
    slices = words & ((1 << DROP_BITS) - 1)
    return slices >= threshold.to(tl.uint32)


@triton.jit
def _keep_mask_kernel(SEED, OUT, Nq, Nk, threshold,
                      DROP_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_tile(tl.load(SEED), bh, offs_m, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N, DROP_BITS)
    # int64 offsets: B*H*Nq*Nk can exceed 2**31.
    row = bh.to(tl.int64) * Nq + offs_m
    ptrs = OUT + row[:, None] * Nk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))


@triton.jit
def _chunked_scores(q_rows, k_cols, q_mask, k_mask, stride_qd, stride_kd,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """q k^T for a tile, D_CHUNK head-dim columns at a time: bounds registers and shared memory at large
    D (fp32 "tf32x3" dots triple the operand footprint) at the price of reloading the q or k tile."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_d = tl.arange(0, D_CHUNK)
    for d0 in tl.static_range(0, HEAD_DIM, D_CHUNK):
        q = tl.load(q_rows + (d0 + offs_d)[None, :] * stride_qd, mask=q_mask, other=0.0)
        k_t = tl.load(k_cols + (d0 + offs_d)[:, None] * stride_kd, mask=k_mask, other=0.0)
        s = tl.dot(q, k_t, s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _value_rows(p, V, offs_n, Nk, stride_vn, stride_vc,
                BLOCK_M: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr):
    """sum_j p[i, j] * v[j, c] as a row reduction per channel (no padded matmul): [BLOCK_M, C_PAD]."""
    offs_c = tl.arange(0, C_PAD)
    out = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    for c in tl.static_range(C):
        v_c = tl.load(V + offs_n * stride_vn + c * stride_vc, mask=offs_n < Nk, other=0.0).to(tl.float32)
        out += tl.where(offs_c[None, :] == c, tl.sum(p * v_c[None, :], 1)[:, None], 0.0)
    return out


@triton.jit
def _do_dot_v(DO, V, offs_m, offs_n, Nq, Nk, stride_don, stride_doc, stride_vn, stride_vc,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr):
    """dO_i . v_j for a tile: a rank-C outer product, again no matmul."""
    dov = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in tl.static_range(C):
        do_c = tl.load(DO + offs_m * stride_don + c * stride_doc, mask=offs_m < Nq, other=0.0)
        v_c = tl.load(V + offs_n * stride_vn + c * stride_vc, mask=offs_n < Nk, other=0.0).to(tl.float32)
        dov += do_c[:, None] * v_c[None, :]
    return dov


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEED,
                stride_qb, stride_qn, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vc,
                H, Nq, Nk, qk_scale, drop_threshold, drop_scale,
                HEAD_DIM: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr,
                DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    if D_CHUNK == HEAD_DIM:  # the q tile stays resident across the key loop
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < Nq, other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    V_b = V + b * stride_vb
    if DROP_BITS > 0:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of log2-scaled scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator (before dropout)
    acc = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)  # running sum_j p_ij * keep_ij * v_j
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if D_CHUNK == HEAD_DIM:
            k_t = tl.load(K_bh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                          mask=offs_n[None, :] < Nk, other=0.0)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        else:
            s = _chunked_scores(q_rows, K_bh + offs_n[None, :] * stride_kn, offs_m[:, None] < Nq,
                                offs_n[None, :] < Nk, stride_qd, stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK,
                                DOT_PRECISION)
        s = s * qk_scale  # log2(e) * scale * q.k
        s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
        # Online softmax: rescale what was accumulated so far to the new running max.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROP_BITS > 0:
            p = tl.where(_keep_tile(seed, bh, offs_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS), p, 0.0)
        acc = acc * alpha[:, None] + _value_rows(p, V_b, offs_n, Nk, stride_vn, stride_vc, BLOCK_M, C, C_PAD)
        m_i = m_new

    o = acc * (drop_scale / l_i)[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log log-sum-exp of scale * q.k
    row = bh.to(tl.int64) * Nq + offs_m
    tl.store(LSE + row, lse, mask=offs_m < Nq)
    offs_c = tl.arange(0, C_PAD)
    tl.store(O + row[:, None] * C + offs_c[None, :], o, mask=(offs_m[:, None] < Nq) & (offs_c[None, :] < C))


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEED,
                     stride_qb, stride_qn, stride_qh, stride_qd,
                     stride_kb, stride_kn, stride_kh, stride_kd,
                     stride_vb, stride_vn, stride_vc,
                     stride_dob, stride_doh, stride_don, stride_doc,
                     stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                     H, Nq, Nk, qk_scale, scale, drop_threshold, drop_scale,
                     HEAD_DIM: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr,
                     DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr,
                     D_SPLIT: tl.constexpr):
    """One program per key tile (and D_SPLIT columns of dk): loops over query tiles, accumulates dk and
    this head's dv (stored by the programs of the first column split only)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_ds = pid_d * D_SPLIT + tl.arange(0, D_SPLIT)  # the dk columns of this program
    offs_c = tl.arange(0, C_PAD)
    RESIDENT: tl.constexpr = D_CHUNK == HEAD_DIM and D_SPLIT == HEAD_DIM
    if RESIDENT:  # the k tile stays resident across the query loop
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=offs_n[:, None] < Nk, other=0.0)
    Q_bh = Q + b * stride_qb + h * stride_qh
    V_b = V + b * stride_vb
    DO_bh = DO + b * stride_dob + h * stride_doh
    if DROP_BITS > 0:
        seed = tl.load(SEED)

    dk = tl.zeros([BLOCK_N, D_SPLIT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, C_PAD], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row = bh.to(tl.int64) * Nq + offs_m
        q = tl.load(Q_bh + offs_m[:, None] * stride_qn + offs_ds[None, :] * stride_qd,
                    mask=offs_m[:, None] < Nq, other=0.0)
        # Rows past Nq get lse = +inf, hence P = 0.
        lse2 = tl.load(LSE + row, mask=offs_m < Nq, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row, mask=offs_m < Nq, other=0.0)
        if RESIDENT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            k_cols = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn
            s = _chunked_scores(Q_bh + offs_m[:, None] * stride_qn, k_cols, offs_m[:, None] < Nq,
                                offs_n[None, :] < Nk, stride_qd, stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK,
                                DOT_PRECISION)
        s = tl.where(offs_n[None, :] < Nk, s * qk_scale, float("-inf"))
        p = tl.exp2(s - lse2[:, None])  # P recomputed from q, k and lse
        dp = _do_dot_v(DO_bh, V_b, offs_m, offs_n, Nq, Nk, stride_don, stride_doc, stride_vn, stride_vc,
                       BLOCK_M, BLOCK_N, C) * drop_scale
        p_drop = p * drop_scale
        if DROP_BITS > 0:
            keep = _keep_tile(seed, bh, offs_m, pid_n * BLOCK_N, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS)
            dp = tl.where(keep, dp, 0.0)
            p_drop = tl.where(keep, p_drop, 0.0)
        # dv_j += sum_i P_ij z_ij / (1 - p) * dO_i: a column reduction per channel.
        for c in tl.static_range(C):
            do_c = tl.load(DO_bh + offs_m * stride_don + c * stride_doc, mask=offs_m < Nq, other=0.0)
            dv += tl.where(offs_c[None, :] == c, tl.sum(p_drop * do_c[:, None], 0)[:, None], 0.0)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_ds[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < Nk)
    dv_row = bh.to(tl.int64) * Nk + offs_n
    tl.store(DV + dv_row[:, None] * C + offs_c[None, :], dv,
             mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < C) & (pid_d == 0))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEED,
                   stride_qb, stride_qn, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vc,
                   stride_dob, stride_doh, stride_don, stride_doc,
                   stride_dqb, stride_dqn, stride_dqh, stride_dqd,
                   H, Nq, Nk, qk_scale, scale, drop_threshold, drop_scale,
                   HEAD_DIM: tl.constexpr, C: tl.constexpr,
                   DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr,
                   D_SPLIT: tl.constexpr):
    """One program per query tile (and D_SPLIT columns of dq): loops over key tiles, accumulates dq."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_ds = pid_d * D_SPLIT + tl.arange(0, D_SPLIT)  # the dq columns of this program
    row = bh.to(tl.int64) * Nq + offs_m
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    RESIDENT: tl.constexpr = D_CHUNK == HEAD_DIM and D_SPLIT == HEAD_DIM
    if RESIDENT:
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < Nq, other=0.0)
    lse2 = tl.load(LSE + row, mask=offs_m < Nq, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=offs_m < Nq, other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    V_b = V + b * stride_vb
    DO_bh = DO + b * stride_dob + h * stride_doh
    if DROP_BITS > 0:
        seed = tl.load(SEED)

    dq = tl.zeros([BLOCK_M, D_SPLIT], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K_bh + offs_n[:, None] * stride_kn + offs_ds[None, :] * stride_kd,
                    mask=offs_n[:, None] < Nk, other=0.0)
        if RESIDENT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            s = _chunked_scores(q_rows, K_bh + offs_n[None, :] * stride_kn, offs_m[:, None] < Nq,
                                offs_n[None, :] < Nk, stride_qd, stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK,
                                DOT_PRECISION)
        s = tl.where(offs_n[None, :] < Nk, s * qk_scale, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = _do_dot_v(DO_bh, V_b, offs_m, offs_n, Nq, Nk, stride_don, stride_doc, stride_vn, stride_vc,
                       BLOCK_M, BLOCK_N, C) * drop_scale
        if DROP_BITS > 0:
            dp = tl.where(_keep_tile(seed, bh, offs_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS), dp, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_ds[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < Nq)


# ---------------------------------------------------------------------------------------------
# Host side: dropout parameters, seeds, launches
# ---------------------------------------------------------------------------------------------
def _dropout_params(dropout_p: float) -> tuple[int, int, float]:
    """(DROP_BITS, threshold T, effective p = T / 2**DROP_BITS); DROP_BITS = 0 means no dropout."""
    if dropout_p == 0.0:
        return 0, 0, 0.0
    bits = 1 if dropout_p == 0.5 else FINE_DROP_BITS
    threshold = min(round(dropout_p * 2**bits), 2**bits - 1)
    if threshold == 0:  # p < 2**-17 rounds to "keep everything"
        return 0, 0, 0.0
    return bits, threshold, threshold / 2**bits


def effective_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels really apply (and scale by): round(p * 2**bits) / 2**bits.

    Equal to dropout_p whenever dropout_p is a multiple of 2**-16 (0.5, 0.25, 0.125, ...); otherwise
    within 2**-17 of it.
    """
    return _dropout_params(float(dropout_p))[2]


def _seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    """The 64-bit Philox key as a 1-element int64 tensor on `device`.

    seed=None draws it from torch's generator of that device (so torch.manual_seed repeats runs);
    keeping it a tensor avoids a host sync and lets torch.compile trace the draw.
    """
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)
    return torch.tensor([(int(seed) + 2**63) % 2**64 - 2**63], dtype=torch.int64, device=device)


def _is_interpreted() -> bool:
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _check_triton_device(device: torch.device) -> None:
    if _is_interpreted():
        if device.type != "cpu":
            raise ValueError(f"TRITON_INTERPRET=1 runs the kernels on CPU tensors only, got device {device}")
    elif device.type != "cuda":
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors), got {device}")


_AUTOTUNED: dict[tuple[str, str, int], Any] = {}
_KERNELS = {"fwd": _fwd_kernel, "bwd_dkdv": _bwd_dkdv_kernel, "bwd_dq": _bwd_dq_kernel}
_AUTOTUNE_KEY = ["Nq", "Nk", "HEAD_DIM", "C", "DROP_BITS", "DOT_PRECISION"]


def _autotuned(kernel: str, group: str, head_dim: int) -> Any:
    """triton.autotune over GPU_CONFIGS[kernel][group][head_dim], built once per such list."""
    if (kernel, group, head_dim) not in _AUTOTUNED:
        configs = [triton.Config(meta, num_warps=warps, num_stages=stages)
                   for meta, warps, stages in map(_config_meta, GPU_CONFIGS[kernel][group][head_dim])]
        _AUTOTUNED[kernel, group, head_dim] = triton.autotune(configs=configs, key=_AUTOTUNE_KEY)(_KERNELS[kernel])
    return _AUTOTUNED[kernel, group, head_dim]


def _launch(kernel: str, grid: Any, query: torch.Tensor, *args: Any, **constexprs: Any) -> None:
    head_dim = constexprs["HEAD_DIM"]
    if _is_interpreted():
        block_m, block_n, d_chunk, d_split = INTERPRETER_CONFIG
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "D_CHUNK": min(d_chunk, head_dim)}
        if kernel != "fwd":
            meta["D_SPLIT"] = min(d_split, head_dim)
        _KERNELS[kernel][grid(meta)](query, *args, **constexprs, **meta)
    else:
        with torch.cuda.device(query.device):
            _autotuned(kernel, _dtype_group(query.dtype), head_dim)[grid](query, *args, **constexprs)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 inputs following torch.get_float32_matmul_precision()."""
    if dtype != torch.float32:
        return "tf32"  # ignored by fp16/bf16 dots
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# A custom op (with a fake implementation below) so that impl="naive" with dropout traces under
# torch.compile and FakeTensor/meta modes like the fused op does.
@torch.library.custom_op("dcama::keep_mask", mutates_args=())
def _keep_mask(seed: torch.Tensor, batch: int, heads: int, n_query: int, n_key: int,
               dropout_p: float) -> torch.Tensor:
    bits, threshold, _ = _dropout_params(dropout_p)
    if bits == 0:
        return torch.ones((batch, heads, n_query, n_key), dtype=torch.bool, device=seed.device)
    _check_triton_device(seed.device)
    out = torch.empty((batch, heads, n_query, n_key), dtype=torch.uint8, device=seed.device)
    block_m, block_n, warps, stages = KEEP_MASK_CONFIG
    grid = (triton.cdiv(n_query, block_m), triton.cdiv(n_key, block_n), batch * heads)
    with torch.device(seed.device) if _is_interpreted() else torch.cuda.device(seed.device):
        _keep_mask_kernel[grid](seed, out, n_query, n_key, threshold, DROP_BITS=bits, BLOCK_M=block_m,
                                BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out.view(torch.bool)


@_keep_mask.register_fake
def _keep_mask_fake(seed: torch.Tensor, batch: int, heads: int, n_query: int, n_key: int,
                    dropout_p: float) -> torch.Tensor:
    return seed.new_empty((batch, heads, n_query, n_key), dtype=torch.bool)


def dropout_keep_mask(seed: int | None, batch: int, heads: int, n_query: int, n_key: int, dropout_p: float,
                      device: torch.device | str) -> torch.Tensor:
    """The kernels' keep decisions for `seed`: bool (batch, heads, n_query, n_key).

    Runs the same @triton.jit RNG helper as the attention kernels (a CUDA device, or CPU under
    TRITON_INTERPRET=1), so reference = mean_h((softmax(S) * keep / (1 - p_eff)) @ v) reproduces the
    kernel's dropout exactly, with p_eff = effective_dropout_p(dropout_p).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    for name, size in (("batch", batch), ("heads", heads), ("n_query", n_query), ("n_key", n_key)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    device = torch.device(device)
    return _keep_mask(_seed_tensor(seed, device), batch, heads, n_query, n_key, float(dropout_p))


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, with fake implementations and autograd)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dcama::attention_fwd", mutates_args=())
def attention_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seed: torch.Tensor,
                  dropout_p: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head output o (B, H, Nq, C) fp32 and log-sum-exp (B, H, Nq) fp32; value is (B, Nk, C)."""
    _check_triton_device(query.device)
    batch, n_query, heads, head_dim = query.shape
    n_key, channels = key.shape[1], value.shape[2]
    o = torch.empty((batch, heads, n_query, channels), dtype=torch.float32, device=query.device)
    lse = torch.empty((batch, heads, n_query), dtype=torch.float32, device=query.device)
    bits, threshold, p_eff = _dropout_params(dropout_p)
    _launch("fwd", lambda meta: (triton.cdiv(n_query, meta["BLOCK_M"]), batch * heads),
            query, key, value, o, lse, seed, *query.stride(), *key.stride(), *value.stride(),
            heads, n_query, n_key, scale * LOG2E, threshold, 1.0 / (1.0 - p_eff),
            HEAD_DIM=head_dim, C=channels, C_PAD=triton.next_power_of_2(channels), DROP_BITS=bits,
            DOT_PRECISION=_dot_precision(query.dtype))
    return o, lse


@attention_fwd.register_fake
def _attention_fwd_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seed: torch.Tensor,
                        dropout_p: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n_query, heads, _ = query.shape
    o = query.new_empty((batch, heads, n_query, value.shape[2]), dtype=torch.float32)
    return o, query.new_empty((batch, heads, n_query), dtype=torch.float32)


@torch.library.custom_op("dcama::attention_bwd", mutates_args=())
def attention_bwd(grad_o: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  o: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, dropout_p: float,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the per-head output gradient grad_o (B, H, Nq, C)."""
    _check_triton_device(query.device)
    batch, n_query, heads, head_dim = query.shape
    n_key, channels = key.shape[1], value.shape[2]
    grad_o = grad_o.float()
    delta = (grad_o * o).sum(-1)  # D_i = dO_i . o_i, (B, H, Nq): tiny, done once per row
    dq = query.new_empty(query.shape)
    dk = key.new_empty(key.shape)
    dv_heads = torch.empty((batch, heads, n_key, channels), dtype=torch.float32, device=query.device)
    bits, threshold, p_eff = _dropout_params(dropout_p)
    common = (*query.stride(), *key.stride(), *value.stride(), *grad_o.stride())
    scalars = (heads, n_query, n_key, scale * LOG2E, scale, threshold, 1.0 / (1.0 - p_eff))
    constexprs = dict(HEAD_DIM=head_dim, C=channels, DROP_BITS=bits, DOT_PRECISION=_dot_precision(query.dtype))
    _launch("bwd_dkdv",
            lambda meta: (triton.cdiv(n_key, meta["BLOCK_N"]), batch * heads, head_dim // meta["D_SPLIT"]),
            query, key, value, grad_o, lse, delta, dk, dv_heads, seed, *common, *dk.stride(), *scalars,
            C_PAD=triton.next_power_of_2(channels), **constexprs)
    _launch("bwd_dq",
            lambda meta: (triton.cdiv(n_query, meta["BLOCK_M"]), batch * heads, head_dim // meta["D_SPLIT"]),
            query, key, value, grad_o, lse, delta, dq, seed, *common, *dq.stride(), *scalars, **constexprs)
    # Deterministic head sum of dv (no atomics).
    return dq, dk, dv_heads.sum(1).to(value.dtype)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_o: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        o: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, dropout_p: float,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _fwd_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    query, key, value, seed, dropout_p, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    # Everything the backward needs: O(B*H*Nq*C) besides the inputs; P is recomputed.
    ctx.save_for_backward(query, key, value, o, lse, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _fwd_backward(ctx: Any, grad_o: torch.Tensor, grad_lse: torch.Tensor) -> tuple[Any, ...]:
    query, key, value, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_o, query, key, value, o, lse, seed, ctx.dropout_p, ctx.scale)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _validate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
              head_reduction: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction must be one of {HEAD_REDUCTIONS}, got {head_reduction!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 4:
        raise ValueError(f"query must have rank 4 (B, Nq, H, D), got shape {tuple(query.shape)}")
    if key.dim() != 4:
        raise ValueError(f"key must have rank 4 (B, Nk, H, D), got shape {tuple(key.shape)}")
    if value.dim() not in (2, 3):
        raise ValueError(f"value must have rank 2 (B, Nk) or 3 (B, Nk, C), got shape {tuple(value.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}: all inputs must share a device")
        if t.dtype != query.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but query has {query.dtype}: all inputs must share a dtype")
    allowed = DTYPES if impl == "triton" or (impl == "auto" and query.device.type == "cuda") else \
        DTYPES + (torch.float64,)
    if query.dtype not in allowed:
        raise ValueError(f"query dtype {query.dtype} is not supported by impl={impl!r}; use one of {allowed}")
    batch, _, heads, head_dim = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[2] != heads:
        raise ValueError(f"key has {key.shape[2]} heads but query has {heads}")
    if key.shape[3] != head_dim:
        raise ValueError(f"key head dim {key.shape[3]} differs from query head dim {head_dim}")
    if value.shape[1] != key.shape[1]:
        raise ValueError(f"value has {value.shape[1]} tokens but key has Nk={key.shape[1]}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"query head dim D={head_dim} is not supported; supported: {HEAD_DIMS}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _naive(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, scale: float,
           seed: int | None) -> torch.Tensor:
    """The original's math: materialise P (B, H, Nq, Nk), dropout with the kernel's keep mask, P @ v."""
    batch, n_query, heads, _ = query.shape
    probs = (torch.einsum("bihd,bjhd->bhij", query, key) * scale).softmax(dim=-1)
    if dropout_p > 0.0:
        seed_t = _seed_tensor(seed, query.device)
        keep = _keep_mask(seed_t, batch, heads, n_query, key.shape[1], dropout_p)
        probs = probs * keep / (1.0 - effective_dropout_p(dropout_p))
    return probs @ value.unsqueeze(1)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float,
          scale: float) -> torch.Tensor:
    """PyTorch SDPA with the value zero-padded to a multiple of 8 channels and expanded over heads.

    Dropout here is SDPA's own (torch RNG), so it cannot match the kernel's keep mask.
    """
    batch, _, heads, _ = query.shape
    channels = value.shape[2]
    padded = torch.nn.functional.pad(value, (0, -channels % 8))
    v = padded.unsqueeze(1).expand(batch, heads, *padded.shape[1:])
    o = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), v,
                                                         dropout_p=dropout_p, scale=scale)
    return o[..., :channels]


def dcama_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, dropout_p: float = 0.0,
                    scale: float | None = None, seed: int | None = None, head_reduction: str = "mean",
                    impl: str = "auto") -> torch.Tensor:
    """DCAMA attention-weighted mask aggregation.

    query (B, Nq, H, D) and key (B, Nk, H, D) with any strides; value (B, Nk) or (B, Nk, C) (stride 0
    allowed). Returns (B, Nq[, C]) for head_reduction="mean", (B, H, Nq[, C]) for "none".
    out = mean_h dropout(softmax(scale * q k^T)) @ v, scale defaulting to 1/sqrt(D).
    impl: "triton" (fused kernels), "naive" (materialises P, same dropout mask as the kernels),
    "sdpa" (PyTorch SDPA, value padded; own dropout), "auto" (triton on CUDA, sdpa otherwise).
    seed: int, or None to draw one from torch's generator of the inputs' device.
    """
    _validate(query, key, value, dropout_p, head_reduction, impl)
    dropout_p = float(dropout_p)
    scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else float(scale)
    if impl == "auto":
        impl = "triton" if query.device.type == "cuda" else "sdpa"
    value3 = value.unsqueeze(-1) if value.dim() == 2 else value
    if impl == "triton":
        if dropout_p > 0.0:
            seed_t = _seed_tensor(seed, query.device)
        else:  # never read by the kernels; no draw so the generator state is untouched
            seed_t = torch.zeros(1, dtype=torch.int64, device=query.device)
        o, _ = attention_fwd(query, key, value3, seed_t, dropout_p, scale)
    elif impl == "naive":
        o = _naive(query, key, value3, dropout_p, scale, seed)
    else:
        o = _sdpa(query, key, value3, dropout_p, scale)
    out = (o.mean(dim=1) if head_reduction == "mean" else o).to(query.dtype)
    return out.squeeze(-1) if value.dim() == 2 else out


# ---------------------------------------------------------------------------------------------
# Every GPU kernel configuration the op can launch, for the compile report (bench/kernel_report.py)
# ---------------------------------------------------------------------------------------------
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SHORT_NAMES = {"BLOCK_M": "m", "BLOCK_N": "n", "D_CHUNK": "c", "D_SPLIT": "x"}
_FLOAT_ARGS = ("qk_scale", "scale", "drop_scale")  # other non-pointer, non-constexpr args are i32


def _jit_kernels() -> dict[str, triton.runtime.JITFunction]:
    """The kernels as JITFunctions; under TRITON_INTERPRET=1 @triton.jit (triton's own library
    included) yields interpreted functions that triton.compile cannot take."""
    if _is_interpreted():
        raise RuntimeError("kernel_compile_specs() needs the kernels imported without TRITON_INTERPRET=1: "
                           "run the compile report in a process where that variable is unset")
    return _KERNELS


def _signature(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in pointers:
            sig[arg] = pointers[arg]
        else:
            sig[arg] = "fp32" if arg in _FLOAT_ARGS else "i32"
    return sig


def kernel_compile_specs() -> list[dict[str, Any]]:
    """One record per GPU kernel configuration the op can launch.

    Each record: name, fn (JITFunction), signature (arg -> Triton type), constexprs, num_warps,
    num_stages and config (a JSON-able description), such that
    ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32),
    options={"num_warps": .., "num_stages": ..})`` builds it. Covers kernel x dtype (fp32 with both
    dot precisions, fp16, bf16) x head dim x autotune config x dropout variant (off, 1-bit, 16-bit),
    with C = 1 (DCAMA's single-channel value). The keep-mask kernel behind dropout_keep_mask (used by
    tests and impl="naive", no matrix product) is not part of the fused op and is not listed.
    """
    fns = _jit_kernels()
    variants = [(torch.float32, "tf32x3"), (torch.float32, "tf32"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")]
    specs = []
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        fn = fns[kernel]
        for dtype, precision in variants:
            tt = _TRITON_DTYPES[dtype]
            pointers = {"Q": f"*{tt}", "K": f"*{tt}", "V": f"*{tt}", "O": "*fp32", "LSE": "*fp32", "SEED": "*i64",
                        "DO": "*fp32", "DELTA": "*fp32", "DK": f"*{tt}", "DV": "*fp32", "DQ": f"*{tt}"}
            for head_dim, configs in GPU_CONFIGS[kernel][_dtype_group(dtype)].items():
                for meta, warps, stages in map(_config_meta, configs):
                    for bits in (0, 1, FINE_DROP_BITS):
                        constexprs = {"HEAD_DIM": head_dim, "C": 1, "DROP_BITS": bits, "DOT_PRECISION": precision,
                                      **meta}
                        if "C_PAD" in fn.arg_names:
                            constexprs["C_PAD"] = 1
                        config = {"kernel": kernel, "dtype": tt, "dot_precision": precision if dtype ==
                                  torch.float32 else None, "head_dim": head_dim, "channels": 1, "drop_bits": bits,
                                  **{k.lower(): v for k, v in meta.items()}, "num_warps": warps, "num_stages": stages}
                        blocks = "".join(f"{_SHORT_NAMES[k]}{v}" for k, v in meta.items())
                        specs.append({"name": f"{kernel}_{tt}{'_' + precision if dtype == torch.float32 else ''}"
                                              f"_d{head_dim}_{blocks}w{warps}s{stages}_drop{bits}",
                                      "fn": fn, "signature": _signature(fn, pointers, constexprs),
                                      "constexprs": constexprs, "num_warps": warps, "num_stages": stages,
                                      "config": config})
    return specs
