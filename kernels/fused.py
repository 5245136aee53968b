"""The Triton kernels of DCAMA attention: forward, the two backward passes, and the dropout keep mask.

The math, the tiling, the operand layouts (VX, DOD) and the dropout counter scheme are documented in
docs/kernels.md; the host side that builds the operands and launches these kernels is kernels/ops.py.
Every kernel works on score tiles with the query rows as tile rows, so that the dropout decisions are
generated directly in the register layout of the score accumulator (see `_bit_keep`).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of one Philox call's stream with 1-bit decisions: 4 words x 32 bits serve 2 rows x 64 columns
# of a stream (docs/kernels.md, "Dropout"); a 64-column sub-tile reads one word of it.
SUB_TILE = tl.constexpr(64)
CALL_COLUMNS = tl.constexpr(256)


def main_loop_tiles(kernel: str, drop_bits: int, block_n: int) -> int:
    """Score tiles [BLOCK_M, BLOCK_N] one iteration of a kernel's main loop processes: the forward and dq
    loops step over CALL_COLUMNS keys with 1-bit dropout (one Philox call per stream), else one tile."""
    return CALL_COLUMNS.value // block_n if kernel in ("fwd", "bwd_dq") and drop_bits == 1 else 1


# ---------------------------------------------------------------------------------------------
# Dropout decisions. A tile [BLOCK_M, BLOCK_N] (BLOCK_M % 16 == 0, BLOCK_N % 64 == 0) is viewed as
# [BLOCK_M // 16, 2 (r), 8 (a), ..., 4 (q), 2 (e)] with row i = 16 g + 8 r + a and column
# j = ... + 2 q + e: (g, a, q) index a stream, held by one thread in every MMA accumulator layout, and the
# reshape back to 2-D lands in the accumulator layout without any data movement.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _stream_ids(start_m, BLOCK_M: tl.constexpr, SHAPE: tl.constexpr):
    """(pair, q) of the streams of rows start_m .. start_m + BLOCK_M as uint32 tensors broadcast to SHAPE,
    a 7-D shape whose dims 0, 2 and 5 are (g, a, q)."""
    g = tl.arange(0, BLOCK_M // 16)[:, None, None, None, None, None, None]
    a = tl.arange(0, 8)[None, None, :, None, None, None, None]
    q = tl.arange(0, 4)[None, None, None, None, None, :, None]
    zero = tl.zeros(SHAPE, dtype=tl.uint32)
    pair = ((start_m // 16 + g) * 8 + a).to(tl.uint32) + zero
    return pair, q.to(tl.uint32) + zero


@triton.jit
def _bit_words(seed, bh, start_m, call, BLOCK_M: tl.constexpr):
    """The 4 Philox words of call number `call` of every stream of the row tile (1-bit decisions)."""
    shape: tl.constexpr = [BLOCK_M // 16, 1, 8, 1, 1, 4, 1]
    pair, q = _stream_ids(start_m, BLOCK_M, shape)
    zero = tl.zeros(shape, dtype=tl.uint32)
    return tl.philox(seed, pair, zero + call, zero + bh, q)


@triton.jit
def _bit_keep(r0, r1, r2, r3, first_word, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep decisions [BLOCK_M, BLOCK_N] (p = 1/2) of columns whose first 64-column sub-tile reads word
    `first_word` of the call (r0..r3 from `_bit_words`): sub-tile k reads word first_word + k, row
    8 r + a and column 8 c + 2 q + e of a sub-tile are bit 16 r + 2 c + e of that word."""
    r = tl.arange(0, 2)[None, :, None, None, None, None, None]
    k = tl.arange(0, BLOCK_N // 64)[None, None, None, :, None, None, None]
    c = tl.arange(0, 8)[None, None, None, None, :, None, None]
    e = tl.arange(0, 2)[None, None, None, None, None, None, :]
    word = first_word + k
    w = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    bit = tl.full([1, 2, 1, 1, 8, 1, 2], 1, tl.uint32) << (16 * r + 2 * c + e).to(tl.uint32)
    return tl.reshape((w & bit) != 0, [BLOCK_M, BLOCK_N])


@triton.jit
def _slice_keep(seed, bh, start_m, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep decisions [BLOCK_M, BLOCK_N] with 16-bit slices (any p but 1/2): the view is
    [g, r, a, kc, cw, q, e] with column j = 32 kc + 8 cw + 2 q + e; the decision is slice e of word cw of
    call (start_n // 64 + kc // 2) * 4 + 2 r + kc % 2 of its stream, kept when the slice >= threshold."""
    shape: tl.constexpr = [BLOCK_M // 16, 2, 8, BLOCK_N // 32, 1, 4, 1]
    pair, q = _stream_ids(start_m, BLOCK_M, shape)
    r = tl.arange(0, 2)[None, :, None, None, None, None, None]
    kc = tl.arange(0, BLOCK_N // 32)[None, None, None, :, None, None, None]
    cw = tl.arange(0, 4)[None, None, None, None, :, None, None]
    e = tl.arange(0, 2)[None, None, None, None, None, None, :]
    zero = tl.zeros(shape, dtype=tl.uint32)
    call = ((start_n // 64 + kc // 2) * 4 + 2 * r + kc % 2).to(tl.uint32) + zero
    w0, w1, w2, w3 = tl.philox(seed, pair, call, zero + bh, q)
    w = tl.where(cw == 0, w0, tl.where(cw == 1, w1, tl.where(cw == 2, w2, w3)))
    slices = (w >> (16 * e).to(tl.uint32)) & 0xFFFF
    return tl.reshape(slices >= threshold.to(tl.uint32), [BLOCK_M, BLOCK_N])


@triton.jit
def _tile_keep(seed, bh, start_m, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DROP_BITS: tl.constexpr):
    """Keep decisions of one tile, computing the Philox calls it needs (any tile position)."""
    if DROP_BITS == 1:
        r0, r1, r2, r3 = _bit_words(seed, bh, start_m, start_n // CALL_COLUMNS, BLOCK_M)
        return _bit_keep(r0, r1, r2, r3, (start_n // SUB_TILE) % 4, BLOCK_M, BLOCK_N)
    else:
        return _slice_keep(seed, bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N)


@triton.jit
def _keep_mask_kernel(SEED, OUT, Nq, Nk, threshold,
                      DROP_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dropout_keep_mask: the decisions of a [BLOCK_M, BLOCK_N] tile of head bh as uint8."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _tile_keep(tl.load(SEED), bh, pid_m * BLOCK_M, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N, DROP_BITS)
    row = bh.to(tl.int64) * Nq + offs_m  # int64: B*H*Nq*Nk can exceed 2**31
    tl.store(OUT + row[:, None] * Nk + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))


# ---------------------------------------------------------------------------------------------
# Score tiles
# ---------------------------------------------------------------------------------------------
@triton.jit
def _scores(q, q_rows, k_rows, q_mask, k_mask, stride_qd, stride_kd,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
            MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q k^T [BLOCK_M, BLOCK_N] in fp32. With D_CHUNK == HEAD_DIM q is the resident query tile; otherwise
    q and k are read D_CHUNK columns at a time (bounds registers at large D with 3xTF32 dots)."""
    if D_CHUNK == HEAD_DIM:
        offs_d = tl.arange(0, HEAD_DIM)
        if MASKED:
            k = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=k_mask, other=0.0)
        else:
            k = tl.load(k_rows + offs_d[None, :] * stride_kd)
        return _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        offs_c = tl.arange(0, D_CHUNK)
        for d0 in tl.static_range(0, HEAD_DIM, D_CHUNK):
            q_c = tl.load(q_rows + (d0 + offs_c)[None, :] * stride_qd, mask=q_mask, other=0.0)
            if MASKED:
                k_c = tl.load(k_rows + (d0 + offs_c)[None, :] * stride_kd, mask=k_mask, other=0.0)
            else:
                k_c = tl.load(k_rows + (d0 + offs_c)[None, :] * stride_kd)
            s = _mma(q_c, tl.trans(k_c), s, DOT_PRECISION)
        return s


@triton.jit
def _load_rows(ptrs, offs, n, MASKED: tl.constexpr):
    """A [len(offs), ...] tile of rows offs; rows >= n read as 0 when MASKED (only the last tile is)."""
    if MASKED:
        return tl.load(ptrs, mask=offs[:, None] < n, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _tf32_hi(x):
    """x with its 13 low mantissa bits cleared: exact in TF32, and x - _tf32_hi(x) is exact in fp32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b on the tensor cores. For fp32 operands at "tf32x3" it is three TF32 products of the
    hi / lo split (hi = TF32 truncation, lo = the exact rest), dropping lo @ lo: about 2**-20 relative
    per product (docs/kernels.md, "Precision")."""
    if DOT_PRECISION == "tf32x3":
        a_hi = _tf32_hi(a)
        b_hi = _tf32_hi(b)
        acc = tl.dot(a - a_hi, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, m_i, q, q_rows, K_bh, VX_b, offs_m, start_n, keep, ones, Nq, Nk,
              stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero,
              HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr, L_COL: tl.constexpr,
              DROP: tl.constexpr, VALUE_MMA: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr):
    """One key tile of the online softmax: acc[:, :C] += P~ v, acc[:, L_COL] += P 1 (P~: dropped P)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = _scores(q, q_rows, K_bh + offs_n[:, None] * stride_kn, offs_m[:, None] < Nq, offs_n[:, None] < Nk,
                stride_qd, stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, MASKED, DOT_PRECISION)
    vx = _load_rows(VX_b + offs_n[:, None] * stride_vn + tl.arange(0, DV)[None, :], offs_n, Nk, MASKED)
    if MASKED:
        s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
    # log2 domain: x = scale * log2(e) * s - m, one FFMA per score (qk_scale > 0, so max commutes with it).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    acc = acc * alpha[:, None]
    p_drop = tl.where(keep, p, zero) if DROP else p
    if VALUE_MMA:
        # `zero` is a runtime 0.0: the select stays in fp32 instead of being pushed past the fp16 rounding.
        acc = tl.dot(p_drop.to(vx.dtype), vx, acc)
        if DROP:
            acc = tl.dot(p.to(vx.dtype), ones, acc)
    else:  # fp32 inputs: exact fp32 row reductions (an fp32 P operand would need a register shuffle)
        offs_v = tl.arange(0, DV)
        for c in tl.static_range(C):
            v_c = tl.sum(tl.where(offs_v[None, :] == c, vx, 0.0), 1)
            acc += tl.where(offs_v[None, :] == c, tl.sum(p_drop * v_c[None, :], 1)[:, None], 0.0)
        acc += tl.where(offs_v[None, :] == L_COL, tl.sum(p, 1)[:, None], 0.0)
    return acc, m_new


@triton.jit
def _fwd_kernel(Q, K, VX, O, LSE, SEED,
                stride_qb, stride_qn, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn,
                H, Nq, Nk, qk_scale, drop_threshold, drop_scale, zero,
                HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr,
                DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr):
    """One program per (query tile, b*H + h): streams over the key tiles with an online softmax."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    q = tl.load(q_rows + tl.arange(0, D_CHUNK)[None, :] * stride_qd, mask=offs_m[:, None] < Nq, other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    VX_b = VX + b * stride_vb
    offs_v = tl.arange(0, DV)
    # The denominator column: VX's "1" column C without dropout; with dropout, a zero column of VX (C + 1)
    # fed by the undropped P.
    L_COL: tl.constexpr = C + 1 if DROP_BITS > 0 else C
    VALUE_MMA: tl.constexpr = Q.dtype.element_ty != tl.float32
    ones = tl.zeros([BLOCK_N, DV], dtype=VX.dtype.element_ty) + (offs_v[None, :] == L_COL).to(VX.dtype.element_ty)
    seed = tl.load(SEED) if DROP_BITS > 0 else 0
    # 1-bit decisions: one Philox call per stream serves four 64-column sub-tiles, so the main loop steps
    # over CALL_COLUMNS keys; otherwise over one tile.
    SUB: tl.constexpr = CALL_COLUMNS // BLOCK_N if DROP_BITS == 1 else 1
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    n_full = Nk // BLOCK_N * BLOCK_N
    n_main = Nk // (SUB * BLOCK_N) * (SUB * BLOCK_N)
    for start_n in range(0, n_main, SUB * BLOCK_N):
        if DROP_BITS == 1:
            r0, r1, r2, r3 = _bit_words(seed, bh, start_m, start_n // CALL_COLUMNS, BLOCK_M)
        for sub in tl.static_range(SUB):
            if DROP_BITS == 1:
                keep = _bit_keep(r0, r1, r2, r3, sub * (BLOCK_N // SUB_TILE), BLOCK_M, BLOCK_N)
            elif DROP_BITS > 0:
                keep = _slice_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N)
            else:
                keep = 0
            acc, m_i = _fwd_tile(acc, m_i, q, q_rows, K_bh, VX_b, offs_m, start_n + sub * BLOCK_N, keep, ones,
                                 Nq, Nk, stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero, HEAD_DIM, C, DV, L_COL,
                                 DROP_BITS > 0, VALUE_MMA, False, DOT_PRECISION, BLOCK_M, BLOCK_N, D_CHUNK)
    for start_n in range(n_main, n_full, BLOCK_N):  # the full tiles left over by the main loop
        keep = _tile_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS) \
            if DROP_BITS > 0 else 0
        acc, m_i = _fwd_tile(acc, m_i, q, q_rows, K_bh, VX_b, offs_m, start_n, keep, ones, Nq, Nk,
                             stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero, HEAD_DIM, C, DV, L_COL,
                             DROP_BITS > 0, VALUE_MMA, False, DOT_PRECISION, BLOCK_M, BLOCK_N, D_CHUNK)
    if n_full < Nk:  # the last, partial key tile: the only one masked
        keep = _tile_keep(seed, bh, start_m, n_full, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS) \
            if DROP_BITS > 0 else 0
        acc, m_i = _fwd_tile(acc, m_i, q, q_rows, K_bh, VX_b, offs_m, n_full, keep, ones, Nq, Nk,
                             stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero, HEAD_DIM, C, DV, L_COL,
                             DROP_BITS > 0, VALUE_MMA, True, DOT_PRECISION, BLOCK_M, BLOCK_N, D_CHUNK)

    l_i = tl.sum(tl.where(offs_v[None, :] == L_COL, acc, 0.0), 1)
    o = acc * (drop_scale / l_i)[:, None]
    row = bh.to(tl.int64) * Nq + offs_m
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=offs_m < Nq)  # lse of the log2-scaled scores
    tl.store(O + row[:, None] * C + offs_v[None, :], o, mask=(offs_m[:, None] < Nq) & (offs_v[None, :] < C))


# ---------------------------------------------------------------------------------------------
# Backward: dS = P * (dP - Delta) with dP - Delta = DOD VX^T from one small MMA (docs/kernels.md)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _ds_tile(s, lse2, dpd, neg_delta, keep, qk_scale, zero, DROP: tl.constexpr):
    """(P, P~, dS) of a tile from the scores, the log2 lse, dP - Delta and the keep decisions; P~ is the
    dropped P (P without dropout)."""
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if DROP:
        return p, tl.where(keep, p, zero), p * tl.where(keep, dpd, neg_delta[:, None])
    else:
        return p, p, p * dpd


@triton.jit
def _bwd_dkdv_kernel(Q, K, VX, DOD, LSE, DK, DV_OUT, SEED,
                     stride_qb, stride_qn, stride_qh, stride_qd,
                     stride_kb, stride_kn, stride_kh, stride_kd,
                     stride_vb, stride_vn,
                     stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                     H, Nq, Nk, qk_scale, scale, drop_threshold, zero,
                     HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr,
                     DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key tile, b*H + h): loops over the query tiles, accumulates dk and this head's dv."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_v = tl.arange(0, DV)
    # Keys past Nk read as 0: their dk / dv rows are never stored and touch no other row.
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=offs_n[:, None] < Nk, other=0.0)
    vx = tl.load(VX + b * stride_vb + offs_n[:, None] * stride_vn + offs_v[None, :], mask=offs_n[:, None] < Nk,
                 other=0.0)
    Q_bh = Q + b * stride_qb + h * stride_qh
    row0 = bh.to(tl.int64) * Nq
    seed = tl.load(SEED) if DROP_BITS > 0 else 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    n_full = Nq // BLOCK_M * BLOCK_M
    for start_m in range(0, n_full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, vx, Q_bh, DOD, LSE, row0, start_m, start_n, seed, bh, Nq, stride_qn,
                            stride_qd, qk_scale, drop_threshold, zero, HEAD_DIM, C, DV, DROP_BITS, False,
                            DOT_PRECISION, BLOCK_M, BLOCK_N)
    if n_full < Nq:
        dk, dv = _dkdv_tile(dk, dv, k, vx, Q_bh, DOD, LSE, row0, n_full, start_n, seed, bh, Nq, stride_qn,
                            stride_qd, qk_scale, drop_threshold, zero, HEAD_DIM, C, DV, DROP_BITS, True,
                            DOT_PRECISION, BLOCK_M, BLOCK_N)

    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < Nk)
    # dv: the hi and lo halves of DOD's dO columns add up (columns c and DV / 2 + c).
    dv = tl.sum(tl.reshape(dv, [BLOCK_N, 2, DV // 2]), 1)
    offs_c = tl.arange(0, DV // 2)
    tl.store(DV_OUT + (bh.to(tl.int64) * Nk + offs_n)[:, None] * C + offs_c[None, :], dv,
             mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < C))


@triton.jit
def _dkdv_tile(dk, dv, k, vx, Q_bh, DOD, LSE, row0, start_m, start_n, seed, bh, Nq, stride_qn, stride_qd,
               qk_scale, drop_threshold, zero,
               HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr, DROP_BITS: tl.constexpr,
               MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row = row0 + offs_m
    # Query rows past Nq read as 0 (q, DOD and lse): P = 1, dP - Delta = 0, so they add nothing.
    q = _load_rows(Q_bh + offs_m[:, None] * stride_qn + tl.arange(0, HEAD_DIM)[None, :] * stride_qd, offs_m, Nq,
                   MASKED)
    dod = _load_rows(DOD + row[:, None] * DV + tl.arange(0, DV)[None, :], offs_m, Nq, MASKED)
    if MASKED:
        lse2 = tl.load(LSE + row, mask=offs_m < Nq, other=0.0)
    else:
        lse2 = tl.load(LSE + row)
    s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
    dpd = _mma(dod, tl.trans(vx), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
    if DROP_BITS > 0:
        keep = _tile_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS)
        neg_delta = _neg_delta(dod, C, DV)
    else:
        keep = 0
        neg_delta = 0
    p, p_drop, ds = _ds_tile(s, lse2, dpd, neg_delta, keep, qk_scale, zero, DROP_BITS > 0)
    dv = _mma(tl.trans(p_drop.to(dod.dtype)), dod, dv, DOT_PRECISION)
    dk = _mma(tl.trans(ds.to(q.dtype)), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _neg_delta(dod, C: tl.constexpr, DV: tl.constexpr):
    """-Delta per row: the sum of DOD's hi and lo -Delta columns (C and DV / 2 + C)."""
    offs_v = tl.arange(0, DV)
    return tl.sum(tl.where(offs_v[None, :] % (DV // 2) == C, dod.to(tl.float32), 0.0), 1)


@triton.jit
def _dq_tile(dq, q, q_rows, K_bh, VX_b, dod, lse2, neg_delta, offs_m, start_n, keep, Nq, Nk,
             stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero,
             HEAD_DIM: tl.constexpr, DV: tl.constexpr, DROP: tl.constexpr, MASKED: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K_bh + offs_n[:, None] * stride_kn + tl.arange(0, HEAD_DIM)[None, :] * stride_kd, offs_n, Nk,
                   MASKED)
    vx = _load_rows(VX_b + offs_n[:, None] * stride_vn + tl.arange(0, DV)[None, :], offs_n, Nk, MASKED)
    s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
    if MASKED:  # keys past Nk: P = 0 (their k rows are 0, but P could overflow)
        s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
    dpd = _mma(dod, tl.trans(vx), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
    p, p_drop, ds = _ds_tile(s, lse2, dpd, neg_delta, keep, qk_scale, zero, DROP)
    return _mma(ds.to(k.dtype), k, dq, DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(Q, K, VX, DOD, LSE, DQ, SEED,
                   stride_qb, stride_qn, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn,
                   stride_dqb, stride_dqn, stride_dqh, stride_dqd,
                   H, Nq, Nk, qk_scale, scale, drop_threshold, zero,
                   HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr,
                   DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query tile, b*H + h): loops over the key tiles, accumulates dq."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = bh.to(tl.int64) * Nq + offs_m
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < Nq, other=0.0)
    dod = tl.load(DOD + row[:, None] * DV + tl.arange(0, DV)[None, :], mask=offs_m[:, None] < Nq, other=0.0)
    lse2 = tl.load(LSE + row, mask=offs_m < Nq, other=0.0)
    neg_delta = _neg_delta(dod, C, DV) if DROP_BITS > 0 else 0
    K_bh = K + b * stride_kb + h * stride_kh
    VX_b = VX + b * stride_vb
    seed = tl.load(SEED) if DROP_BITS > 0 else 0
    SUB: tl.constexpr = CALL_COLUMNS // BLOCK_N if DROP_BITS == 1 else 1
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = Nk // BLOCK_N * BLOCK_N
    n_main = Nk // (SUB * BLOCK_N) * (SUB * BLOCK_N)
    for start_n in range(0, n_main, SUB * BLOCK_N):
        if DROP_BITS == 1:
            r0, r1, r2, r3 = _bit_words(seed, bh, start_m, start_n // CALL_COLUMNS, BLOCK_M)
        for sub in tl.static_range(SUB):
            if DROP_BITS == 1:
                keep = _bit_keep(r0, r1, r2, r3, sub * (BLOCK_N // SUB_TILE), BLOCK_M, BLOCK_N)
            elif DROP_BITS > 0:
                keep = _slice_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N)
            else:
                keep = 0
            dq = _dq_tile(dq, q, q_rows, K_bh, VX_b, dod, lse2, neg_delta, offs_m, start_n + sub * BLOCK_N, keep,
                          Nq, Nk, stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero, HEAD_DIM, DV,
                          DROP_BITS > 0, False, DOT_PRECISION, BLOCK_M, BLOCK_N)
    for start_n in range(n_main, n_full, BLOCK_N):
        keep = _tile_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS) \
            if DROP_BITS > 0 else 0
        dq = _dq_tile(dq, q, q_rows, K_bh, VX_b, dod, lse2, neg_delta, offs_m, start_n, keep, Nq, Nk,
                      stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero, HEAD_DIM, DV,
                      DROP_BITS > 0, False, DOT_PRECISION, BLOCK_M, BLOCK_N)
    if n_full < Nk:
        keep = _tile_keep(seed, bh, start_m, n_full, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS) \
            if DROP_BITS > 0 else 0
        dq = _dq_tile(dq, q, q_rows, K_bh, VX_b, dod, lse2, neg_delta, offs_m, n_full, keep, Nq, Nk,
                      stride_qd, stride_kn, stride_kd, stride_vn, qk_scale, zero, HEAD_DIM, DV,
                      DROP_BITS > 0, True, DOT_PRECISION, BLOCK_M, BLOCK_N)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < Nq)
