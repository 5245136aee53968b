"""The Triton kernels of DCAMA attention: forward, the two backward passes, and the dropout keep mask.

The math, the tiling, the operand layouts (VX, DOD) and the dropout counter scheme are documented in
docs/kernels.md; the host side that builds the operands and launches these kernels is kernels/ops.py.
Every kernel works on score tiles with the query rows as tile rows, so that the dropout decisions are
generated directly in the register layout of the score accumulator (see `_bit_keep`).
"""

from __future__ import annotations

import triton
import triton.language as tl

# With 1-bit decisions one Philox call (4 words x 32 bits) serves a stream's 2 rows x 64 columns of 256
# consecutive keys, CALL_COLUMNS; the kernels tile keys in sub-tiles of SUB_TILE = 64 columns
# (docs/kernels.md, "Dropout: the RNG scheme").
SUB_TILE = tl.constexpr(64)
CALL_COLUMNS = tl.constexpr(256)


def shares_calls(kernel: str, dot_precision: str | None) -> bool:
    """Whether a forward or dq main-loop step with 1-bit dropout takes the CALL_COLUMNS keys of one Philox call
    (the call computed once, its sub-tiles unrolled). The fp32 dq kernels step one tile at a time, computing
    the call per tile: with the sub-tiles unrolled, ptxas holds several sub-tiles' operands at once, and at D = 64
    the 3xTF32 one spilled on sm_86, sm_89 and sm_120 in every configuration tried (16-3140 B), the TF32 one on
    sm_120 (12-504 B, BLOCK_M 16-128); one tile per step, 0 B (docs/kernels.md, "Architectures")."""
    return not (kernel == "bwd_dq" and dot_precision in ("tf32", "tf32x3"))


def main_loop_tiles(kernel: str, drop_bits: int, block_n: int, key_tiles: int = 1,
                    dot_precision: str | None = None, rescale_per_step: bool = False) -> int:
    """Score tiles [BLOCK_M, BLOCK_N] one iteration of a kernel's main loop processes: a dk/dv program's
    KEY_TILES key sub-tiles; in the forward and dq loops CALL_COLUMNS // BLOCK_N with 1-bit dropout (the
    keys one Philox call per stream serves) where `shares_calls`, and in a forward that rescales once per step
    (RESCALE_PER_STEP), else one tile."""
    if kernel == "bwd_dkdv":
        return key_tiles
    call_step = drop_bits == 1 and shares_calls(kernel, dot_precision)
    return CALL_COLUMNS.value // block_n if call_step or (rescale_per_step and kernel == "fwd") else 1


# ---------------------------------------------------------------------------------------------
# Dropout decisions. A tile [BLOCK_M, BLOCK_N] (BLOCK_M % 16 == 0, BLOCK_N % 64 == 0) is viewed as
# [BLOCK_M // 16, 2 (r), 8 (a), ..., 4 (q), 2 (e)] with row i = 16 g + 8 r + a and column
# j = ... + 2 q + e: (g, a, q) index a stream, held by one thread in every MMA accumulator layout, and the
# reshape back to 2-D lands in the accumulator layout without any data movement.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _philox(seed, c0, c1, c2, c3):
    """Philox-4x32-10 (Salmon et al., SC 2011) of the counter (c0, c1, c2, c3) (uint32 tensors) under the
    64-bit key `seed` (low word first), the same function as tl.philox(seed, c0, c1, c2, c3): each round's
    32 x 32 -> 64-bit products are one widening multiply (IMAD.WIDE.U32) instead of separate high and
    low halves."""
    seed = seed.to(tl.uint64, bitcast=True)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        prod0 = c0.to(tl.uint64) * 0xD2511F53
        prod2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (prod2 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (prod0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = prod2.to(tl.uint32)
        c3 = prod0.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


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
    return _philox(seed, pair, zero + call, zero + bh, q)


@triton.jit
def _bit_keep(r0, r1, r2, r3, first, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep decisions [BLOCK_M, BLOCK_N] (p = 1/2) of BLOCK_N // 64 consecutive 64-column sub-tiles of a
    call's 256 columns, the first being sub-tile `first` (r0..r3 from `_bit_words`): row 8 r + a and column
    64 k + 8 c + 2 q + e of the call are bit 4 c + k of word 2 r + e. A runtime `first` costs one shift per
    word, not a select."""
    r = tl.arange(0, 2)[None, :, None, None, None, None, None]
    k = tl.arange(0, BLOCK_N // 64)[None, None, None, :, None, None, None]
    c = tl.arange(0, 8)[None, None, None, None, :, None, None]
    e = tl.arange(0, 2)[None, None, None, None, None, None, :]
    shift = tl.zeros([1, 1, 1, BLOCK_N // 64, 1, 1, 1], dtype=tl.uint32) + first + k
    w = tl.where(r == 0, tl.where(e == 0, r0, r1), tl.where(e == 0, r2, r3)) >> shift
    bit = tl.full([1, 1, 1, 1, 8, 1, 1], 1, tl.uint32) << (4 * c).to(tl.uint32)
    return tl.reshape((w & bit) != 0, [BLOCK_M, BLOCK_N])


@triton.jit
def _bit_scale(r0, r1, r2, r3, first, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_bit_keep`'s decisions as 16-bit multipliers, uint16 [BLOCK_M, BLOCK_N]: 0x4000 where kept (2.0 = 1 / (1 - p)
    in fp16 and in bf16), 0 where dropped. Multiplying a 16-bit weight by it drops the weight and applies inverted
    dropout's scale exactly, and columns 2 q and 2 q + 1 share a packed register, so one HMUL2 does two weights
    (`_fwd_tile`). Their bits are bit b of words 2 r and 2 r + 1, so the halves of those words are paired first
    (bits b < 16 of both in one word at b and b + 16, bits b >= 16 in another); each pair is then rotated to bits
    14 and 30 and masked: two integer instructions per two weights, where a select costs a bit test and a select
    per weight."""
    r = tl.arange(0, 2)[None, :, None, None, None, None, None]
    k = tl.arange(0, BLOCK_N // 64)[None, None, None, :, None, None, None]
    c = tl.arange(0, 8)[None, None, None, None, :, None, None]
    low0, high0 = (r0 & 0xFFFF) | (r1 << 16), (r0 >> 16) | (r1 & 0xFFFF0000)
    low1, high1 = (r2 & 0xFFFF) | (r3 << 16), (r2 >> 16) | (r3 & 0xFFFF0000)
    w = tl.where(r == 0, tl.where(c < 4, low0, high0), tl.where(c < 4, low1, high1))
    # bit 4 c + first + k of the call's words is bit b = 4 (c % 4) + first + k of w; rotate it right by b - 14
    b = tl.zeros([1, 1, 1, BLOCK_N // 64, 8, 1, 1], dtype=tl.uint32) + first + k + 4 * (c % 4)
    n = (b + 18) & 31
    pair = ((w >> n) | (w << ((32 - n) & 31))) & 0x40004000
    halves = tl.join((pair & 0xFFFF).to(tl.uint16), (pair >> 16).to(tl.uint16))
    return tl.reshape(halves, [BLOCK_M, BLOCK_N])


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
    w0, w1, w2, w3 = _philox(seed, pair, call, zero + bh, q)
    w = tl.where(cw == 0, w0, tl.where(cw == 1, w1, tl.where(cw == 2, w2, w3)))
    slices = (w >> (16 * e).to(tl.uint32)) & 0xFFFF
    return tl.reshape(slices >= threshold.to(tl.uint32), [BLOCK_M, BLOCK_N])


@triton.jit
def _call_words(seed, bh, start_m, start_n, BLOCK_M: tl.constexpr, DROP_BITS: tl.constexpr):
    """With 1-bit decisions the 4 words (`_bit_words`) of the call whose keys hold start_n; placeholders otherwise
    (16-bit slices compute their calls per tile)."""
    if DROP_BITS == 1:
        return _bit_words(seed, bh, start_m, start_n // CALL_COLUMNS, BLOCK_M)
    else:
        return 0, 0, 0, 0


@triton.jit
def _tile_keep(seed, bh, start_m, start_n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DROP_BITS: tl.constexpr, AS_SCALE: tl.constexpr = False):
    """Keep decisions of a tile, computing the Philox calls it needs (any tile position; BLOCK_N <= 256 and
    the tile within one call's 256 columns); 0 without dropout. AS_SCALE: as `_sub_keep`."""
    r0, r1, r2, r3 = _call_words(seed, bh, start_m, start_n, BLOCK_M, DROP_BITS)
    return _sub_keep(r0, r1, r2, r3, seed, bh, start_m, start_n, 0, threshold, BLOCK_M, BLOCK_N, DROP_BITS, AS_SCALE)


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
def _scores(q, k, q_rows, k_rows, q_mask, k_mask, stride_qd, stride_kd,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """q k^T [BLOCK_M, BLOCK_N] in fp32. With D_CHUNK == HEAD_DIM from the q and k tiles given; otherwise
    q and k are read (masked) from q_rows / k_rows D_CHUNK columns at a time: this bounds the registers of
    3xTF32 dots at large D, at the price of reading the tiles again."""
    if D_CHUNK == HEAD_DIM:
        return _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        offs_c = tl.arange(0, D_CHUNK)
        for d0 in tl.static_range(0, HEAD_DIM, D_CHUNK):
            q_c = tl.load(q_rows + (d0 + offs_c)[None, :] * stride_qd, mask=q_mask, other=0.0)
            k_c = tl.load(k_rows + (d0 + offs_c)[None, :] * stride_kd, mask=k_mask, other=0.0)
            s = _mma(q_c, tl.trans(k_c), s, DOT_PRECISION)
        return s


@triton.jit
def _key_scores(q, q_rows, K_bh, offs_m, start_n, Nq, Nk, stride_qd, stride_kn, stride_kd,
                HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr):
    """(offs_n, k row pointers, the k tile (0 when chunked), scores) of the key tile at start_n against the query
    tile, for the loops over keys. In the MASKED (last) tile keys past Nk get -inf, so P = 0 there: their k
    rows read as 0, but P = exp2(-lse2) could overflow."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_rows = K_bh + offs_n[:, None] * stride_kn
    if D_CHUNK == HEAD_DIM:
        k = _load_rows(k_rows + tl.arange(0, HEAD_DIM)[None, :] * stride_kd, offs_n, Nk, MASKED)
    else:
        k = 0
    s = _scores(q, k, q_rows, k_rows, offs_m[:, None] < Nq, offs_n[:, None] < Nk, stride_qd, stride_kd,
                BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, DOT_PRECISION)
    if MASKED:
        s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
    return offs_n, k_rows, k, s


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
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, SPLIT_A: tl.constexpr = True, SPLIT_B: tl.constexpr = True):
    """acc + a @ b on the tensor cores. For fp32 operands at "tf32x3" it is the TF32 products of the
    hi / lo split (hi = TF32 truncation, lo = the exact rest), dropping lo @ lo: about 2**-20 relative
    per product (docs/kernels.md, "Precision"). SPLIT_A / SPLIT_B = False for an operand that is already
    a hi / lo pair (DOD): one product fewer."""
    if DOT_PRECISION == "tf32x3":
        if SPLIT_A:
            a_hi = _tf32_hi(a)
            acc = tl.dot(a - a_hi, _tf32_hi(b) if SPLIT_B else b, acc, input_precision="tf32")
        else:
            a_hi = a
        if SPLIT_B:
            b_hi = _tf32_hi(b)
            acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32")
        else:
            b_hi = b
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _key_loop(state, tile: tl.constexpr, ctx, META: tl.constexpr, seed, bh, start_m, Nk, drop_threshold,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr, SHARE_CALLS: tl.constexpr,
              KEEP_AS_SCALE: tl.constexpr = False, step_max: tl.constexpr = None):
    """state = tile(state, ctx, start_n, keep, META, MASKED) over the key tiles of [0, Nk), for the forward and
    dq kernels: a main loop whose step is the CALL_COLUMNS keys of one Philox call per stream with 1-bit
    dropout and SHARE_CALLS (SUB sub-tiles, the call computed once; `shares_calls`), else one tile; then the
    full tiles left over; then the last, partial tile, the only one with MASKED set. KEEP_AS_SCALE: `keep` is
    `_bit_scale`'s multipliers (1-bit decisions). With `step_max` (the forward's `_step_max`) every main-loop step
    is CALL_COLUMNS keys and starts with state = step_max(state, ctx, start_n, META, SUB), which moves the online
    softmax to the step's maximum once; its sub-tiles then run as tile(..., FIXED_MAX=True)."""
    if step_max is not None or (DROP_BITS == 1 and SHARE_CALLS):
        SUB: tl.constexpr = CALL_COLUMNS // BLOCK_N
    else:
        SUB: tl.constexpr = 1
    n_full = Nk // BLOCK_N * BLOCK_N
    n_main = Nk // (SUB * BLOCK_N) * (SUB * BLOCK_N)
    for start_n in range(0, n_main, SUB * BLOCK_N):
        r0, r1, r2, r3 = _call_words(seed, bh, start_m, start_n, BLOCK_M, DROP_BITS)
        if step_max is not None:
            state = step_max(state, ctx, start_n, META, SUB)
        for sub in tl.static_range(SUB):
            keep = _sub_keep(r0, r1, r2, r3, seed, bh, start_m, start_n, sub, drop_threshold, BLOCK_M, BLOCK_N,
                             DROP_BITS, KEEP_AS_SCALE)
            if step_max is not None:
                state = tile(state, ctx, start_n + sub * BLOCK_N, keep, META, False, True)
            else:
                state = tile(state, ctx, start_n + sub * BLOCK_N, keep, META, False)
    for start_n in range(n_main, n_full, BLOCK_N):
        keep = _tile_keep(seed, bh, start_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS, KEEP_AS_SCALE)
        state = tile(state, ctx, start_n, keep, META, False)
    if n_full < Nk:
        keep = _tile_keep(seed, bh, start_m, n_full, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS, KEEP_AS_SCALE)
        state = tile(state, ctx, n_full, keep, META, True)
    return state


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _p16(x, dtype, SPLIT: tl.constexpr):
    """fp32 x as a 16-bit `dtype` operand: rounded to it (hi; lo is hi, unused), or with SPLIT an fp32 pair, hi
    truncated to TF32's (= fp16's) mantissa and lo the exact rest, each rounded to the B operand's dtype where a
    product takes it (`_dot_p`): hi + lo keeps about 22 significant bits, 3xTF32's precision."""
    if SPLIT:
        hi = _tf32_hi(x)
        return hi, x - hi
    else:
        hi = x.to(dtype)
        return hi, hi


@triton.jit
def _dot_p(p_hi, p_lo, b, acc, SPLIT: tl.constexpr):
    """acc + P @ b for P given as `_p16` gives it."""
    acc = tl.dot(p_hi.to(b.dtype), b, acc)
    if SPLIT:
        acc = tl.dot(p_lo.to(b.dtype), b, acc)
    return acc


@triton.jit
def _rescale(state, m_new, DQ_IN_FWD: tl.constexpr):
    """The online softmax's state moved to the running maximum m_new: its sums times exp2(m_old - m_new) (E's
    only with DQ_IN_FWD: otherwise they are [1, 1] placeholders)."""
    acc, m_i, ea, eb = state
    alpha = tl.exp2(m_i - m_new)
    if DQ_IN_FWD:
        ea = ea * alpha[:, None]
        eb = eb * alpha[:, None]
    return acc * alpha[:, None], m_new, ea, eb


@triton.jit
def _scaled(x, alpha, FIXED_MAX: tl.constexpr):
    """x, or with the running maximum moved (not FIXED_MAX) x times alpha per row."""
    if FIXED_MAX:
        return x
    else:
        return x * alpha[:, None]


@triton.jit
def _step_max(state, ctx, start_n, META: tl.constexpr, SUB: tl.constexpr):
    """The state rescaled once to the maximum over a main-loop step's SUB full key tiles (RESCALE_PER_STEP,
    docs/kernels.md, "One rescale per step"): their scores are the ones the step's `_fwd_tile`s compute, and the
    compiler computes each once (the count shows one score product per tile)."""
    qk_scale = ctx[14]
    BLOCK_N: tl.constexpr = META[8]
    DQ_IN_FWD: tl.constexpr = META[10]
    _, _, _, s_max = _fwd_scores(ctx, start_n, META, False)
    for sub in tl.static_range(1, SUB):
        _, _, _, s = _fwd_scores(ctx, start_n + sub * BLOCK_N, META, False)
        s_max = tl.maximum(s_max, s)
    return _rescale(state, tl.maximum(state[1], tl.max(s_max, 1) * qk_scale), DQ_IN_FWD)


@triton.jit
def _fwd_scores(ctx, start_n, META: tl.constexpr, MASKED: tl.constexpr):
    """`_key_scores` of the forward's key tile at start_n (ctx and META as _fwd_kernel packs them)."""
    q, q_rows, K_bh, _, _, offs_m, _, Nq, Nk, stride_qd, stride_kn, stride_kd, _, _, _, _ = ctx
    HEAD_DIM: tl.constexpr = META[0]
    DOT_PRECISION: tl.constexpr = META[6]
    BLOCK_M: tl.constexpr = META[7]
    BLOCK_N: tl.constexpr = META[8]
    D_CHUNK: tl.constexpr = META[9]
    return _key_scores(q, q_rows, K_bh, offs_m, start_n, Nq, Nk, stride_qd, stride_kn, stride_kd, HEAD_DIM, MASKED,
                       DOT_PRECISION, BLOCK_M, BLOCK_N, D_CHUNK)


@triton.jit
def _fwd_tile(state, ctx, start_n, keep, META: tl.constexpr, MASKED: tl.constexpr, FIXED_MAX: tl.constexpr = False):
    """One key tile of the online softmax: acc[:, :C] += P~ v, acc[:, L_COL] += P 1 (P~: dropped P), and with
    DQ_IN_FWD the two sums of E (docs/kernels.md, "dq from the forward pass"): ea += P~ (v * k), eb += P k;
    state = (acc, m_i, ea, eb), ctx and META as _fwd_kernel packs them. SCALED (fp32 inputs at TF32, and at
    3xTF32 with E): the products take P in fp16 (rounded; at 3xTF32 a hi / lo pair) and the scaled fp16 copies of
    their B operands that VX and VK carry. KEEP_AS_SCALE (1-bit dropout, fp16 products): `keep` is
    `_bit_scale`'s multipliers and P~ is 2 P where kept, inverted dropout's 1 / (1 - p) included. FIXED_MAX: the
    state is already at this tile's maximum (`_step_max`), so the tile neither takes a maximum nor rescales."""
    acc, m_i, ea, eb = state
    q, q_rows, K_bh, VX_b, VK_bh, offs_m, ones, Nq, Nk, stride_qd, stride_kn, stride_kd, stride_vn, stride_vkn, \
        qk_scale, zero = ctx
    HEAD_DIM: tl.constexpr = META[0]
    C: tl.constexpr = META[1]
    DV: tl.constexpr = META[2]
    L_COL: tl.constexpr = META[3]
    DROP: tl.constexpr = META[4]
    VALUE_MMA: tl.constexpr = META[5]
    DOT_PRECISION: tl.constexpr = META[6]
    BLOCK_M: tl.constexpr = META[7]
    BLOCK_N: tl.constexpr = META[8]
    D_CHUNK: tl.constexpr = META[9]
    DQ_IN_FWD: tl.constexpr = META[10]
    SCALED: tl.constexpr = META[11]
    KEEP_AS_SCALE: tl.constexpr = META[12]
    offs_n, k_rows, k, s = _fwd_scores(ctx, start_n, META, MASKED)
    vx = _load_rows(VX_b + offs_n[:, None] * stride_vn + tl.arange(0, DV)[None, :], offs_n, Nk, MASKED)
    # log2 domain: x = scale * log2(e) * s - m, one FFMA per score (qk_scale > 0, so max commutes with it).
    if FIXED_MAX:  # nothing to rescale (`_scaled` ignores alpha)
        m_new, alpha = m_i, None
    else:  # E's sums are rescaled as their products' accumulators (`_scaled`)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    if not FIXED_MAX:
        acc = acc * alpha[:, None]
    # 3xTF32 (fp32 inputs with E): P as an fp16 hi / lo pair, about 22 significant bits (`_p16`).
    SPLIT_P: tl.constexpr = SCALED and DOT_PRECISION == "tf32x3"
    if KEEP_AS_SCALE:  # P~'s 16-bit operand: P's times `_bit_scale`'s 0 or 2 (exact)
        z = keep.to(vx.dtype, bitcast=True)
        p_hi, p_lo = _p16(p, vx.dtype, SPLIT_P)
        pd_hi, pd_lo = p_hi.to(vx.dtype) * z, p_lo.to(vx.dtype) * z
    else:
        p_drop = tl.where(keep, p, zero) if DROP else p
        if SPLIT_P:  # P~'s pair: P's, selected (one split, not two)
            p_hi, p_lo = _p16(p, vx.dtype, SPLIT_P)
            pd_hi = tl.where(keep, p_hi, zero) if DROP else p_hi
            pd_lo = tl.where(keep, p_lo, zero) if DROP else p_lo
        else:
            pd_hi, pd_lo = _p16(p_drop, vx.dtype, SPLIT_P)
    if VALUE_MMA:
        # `zero` is a runtime 0.0: the select stays in fp32 instead of being pushed past the fp16 rounding.
        acc = _dot_p(pd_hi, pd_lo, vx, acc, SPLIT_P)
        if DROP and not (SCALED and DQ_IN_FWD):
            acc = tl.dot(p.to(vx.dtype), ones, acc)
    else:  # fp32 inputs at 3xTF32 without E: exact fp32 row reductions (an fp32 P operand needs a register shuffle)
        offs_v = tl.arange(0, DV)
        for c in tl.static_range(C):
            v_c = tl.sum(tl.where(offs_v[None, :] == c, vx, 0.0), 1)
            acc += tl.where(offs_v[None, :] == c, tl.sum(p_drop * v_c[None, :], 1)[:, None], 0.0)
        acc += tl.where(offs_v[None, :] == L_COL, tl.sum(p, 1)[:, None], 0.0)
    if DQ_IN_FWD:  # the B operands: v * k as hi and lo (VK_bh's first two D columns) and the key tile
        vk_rows = VK_bh + offs_n[:, None] * stride_vkn + tl.arange(0, HEAD_DIM)[None, :]
        # B's hi against P's hi and lo, B's lo against P's hi (lo x lo dropped, as in _mma)
        ea = _dot_p(pd_hi, pd_lo, _load_rows(vk_rows, offs_n, Nk, MASKED), _scaled(ea, alpha, FIXED_MAX), SPLIT_P)
        ea = tl.dot(pd_hi.to(vx.dtype), _load_rows(vk_rows + HEAD_DIM, offs_n, Nk, MASKED), ea)
        if SCALED:  # fp32 keys: their fp16 hi and lo, VK_bh's last two D columns
            if not SPLIT_P:  # (rounded here, not above: ptxas then spills the TF32 forward at D = 32)
                p_hi, p_lo = _p16(p, vx.dtype, SPLIT_P)
            if DROP:
                acc = _dot_p(p_hi, p_lo, ones, acc, SPLIT_P)
            eb = _dot_p(p_hi, p_lo, _load_rows(vk_rows + 2 * HEAD_DIM, offs_n, Nk, MASKED),
                        _scaled(eb, alpha, FIXED_MAX), SPLIT_P)
            eb = tl.dot(p_hi.to(vx.dtype), _load_rows(vk_rows + 3 * HEAD_DIM, offs_n, Nk, MASKED), eb)
        else:
            if D_CHUNK != HEAD_DIM:
                k = _load_rows(k_rows + tl.arange(0, HEAD_DIM)[None, :] * stride_kd, offs_n, Nk, MASKED)
            eb = tl.dot(p.to(vx.dtype), k, _scaled(eb, alpha, FIXED_MAX))
    return acc, m_new, ea, eb


@triton.jit
def _fwd_kernel(Q, K, VX, VK, O, LSE, E, SCALES, SEED,
                stride_qb, stride_qn, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn,
                stride_vkb, stride_vkn, stride_vkh,
                H, Nq, Nk, qk_scale, drop_threshold, drop_scale, zero,
                HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr,
                DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, DQ_IN_FWD: tl.constexpr,
                KEEP_AS_SCALE: tl.constexpr, RESCALE_PER_STEP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr):
    """One program per (query tile, b*H + h): streams over the key tiles with an online softmax. With DQ_IN_FWD
    (C = 1) it also writes E (B*H*Nq, D) fp32, from which the backward's dq is one elementwise product; VK is
    then v * k (B, Nk, H, 2D) as [hi, lo]. A 16-bit VX with fp32 inputs (TF32; 3xTF32 with E) holds the value's
    fp16 hi / lo scaled by 1 / SCALES[0], and VK v * k and k as fp16 [hi, lo] pairs (4D), v * k scaled by
    1 / (SCALES[0] SCALES[1]) and k by 1 / SCALES[1] (kernels.ops.forward_operands). KEEP_AS_SCALE
    (kernels.configs.drops_by_multiplier): 1-bit dropout by packed multipliers. RESCALE_PER_STEP
    (kernels.configs.rescale_per_step): the main loop steps CALL_COLUMNS keys and rescales once per step."""
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
    # The denominator column: VX's first "1" column 2C without dropout; with dropout, a zero column of VX
    # (2C + 2) fed by the undropped P.
    L_COL: tl.constexpr = 2 * C + 2 if DROP_BITS > 0 else 2 * C
    VALUE_MMA: tl.constexpr = VX.dtype.element_ty != tl.float32
    SCALED: tl.constexpr = VALUE_MMA and Q.dtype.element_ty == tl.float32
    # KEEP_AS_SCALE (kernels.configs.drops_by_multiplier): P~ = P times `_bit_scale` (two weights per packed
    # multiply), so the products with P~ carry 1 / (1 - p)
    kept_scale = 1.0 if KEEP_AS_SCALE else drop_scale
    ones = tl.zeros([BLOCK_N, DV], dtype=VX.dtype.element_ty) + (offs_v[None, :] == L_COL).to(VX.dtype.element_ty)
    seed = tl.load(SEED) if DROP_BITS > 0 else 0
    if DQ_IN_FWD:
        e_shape: tl.constexpr = [BLOCK_M, HEAD_DIM]
    else:  # placeholders the loop carries unchanged
        e_shape: tl.constexpr = [1, 1]
    state = (tl.zeros([BLOCK_M, DV], dtype=tl.float32), tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
             tl.zeros(e_shape, dtype=tl.float32), tl.zeros(e_shape, dtype=tl.float32))
    VK_bh = VK + b * stride_vkb + h * stride_vkh
    ctx = (q, q_rows, K_bh, VX_b, VK_bh, offs_m, ones, Nq, Nk, stride_qd, stride_kn, stride_kd, stride_vn, stride_vkn,
           qk_scale, zero)
    meta: tl.constexpr = (HEAD_DIM, C, DV, L_COL, DROP_BITS > 0, VALUE_MMA, DOT_PRECISION, BLOCK_M, BLOCK_N, D_CHUNK,
                          DQ_IN_FWD, SCALED, KEEP_AS_SCALE)
    acc, m_i, ea, eb = _key_loop(state, _fwd_tile, ctx, meta, seed, bh, start_m, Nk, drop_threshold, BLOCK_M,
                                 BLOCK_N, DROP_BITS, True, KEEP_AS_SCALE, _step_max if RESCALE_PER_STEP else None)

    l_i = tl.sum(tl.where(offs_v[None, :] == L_COL, acc, 0.0), 1)
    if SCALED:  # channel c: the sum of its hi and lo columns c and C + c, unscaled
        acc_v = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
        for c in tl.static_range(C):
            v_c = tl.sum(tl.where((offs_v[None, :] == c) | (offs_v[None, :] == C + c), acc, 0.0), 1)
            acc_v = tl.where(offs_v[None, :] == c, v_c[:, None], acc_v)
        acc = acc_v * tl.load(SCALES)
    o = acc * (kept_scale / l_i)[:, None]
    row = bh.to(tl.int64) * Nq + offs_m
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=offs_m < Nq)  # lse of the log2-scaled scores
    tl.store(O + row[:, None] * C + offs_v[None, :], o, mask=(offs_m[:, None] < Nq) & (offs_v[None, :] < C))
    if DQ_IN_FWD:  # E = (ea / (1 - p) - o eb) / l
        o_0 = tl.sum(tl.where(offs_v[None, :] == 0, o, 0.0), 1)
        if SCALED:  # ea's v k carries the value's scale and the keys', eb's k the keys'
            ea = ea * tl.load(SCALES)
        e = (ea * kept_scale - eb * o_0[:, None]) * (1.0 / l_i)[:, None]
        if SCALED:
            e = e * tl.load(SCALES + 1)
        offs_d = tl.arange(0, HEAD_DIM)
        tl.store(E + row[:, None] * HEAD_DIM + offs_d[None, :], e, mask=offs_m[:, None] < Nq)


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
def _dot_pairs(a_hi, a_lo, b_hi, b_lo, acc):
    """acc + a @ b for fp16 [hi, lo] pairs: b's hi against a's hi and lo, b's lo against a's hi (lo x lo dropped,
    as `_mma` at 3xTF32)."""
    acc = tl.dot(a_hi, b_hi, acc)
    acc = tl.dot(a_lo, b_hi, acc)
    return tl.dot(a_hi, b_lo, acc)


@triton.jit
def _pair_scores(q, k, q_rows, k_rows, q_mask, k_mask, stride_qd, stride_kd, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr):
    """q k^T [BLOCK_M, BLOCK_N] in fp32 from fp16 [hi, lo] pairs (hi in the rows' first HEAD_DIM columns, lo in the
    next): the resident pairs q and k given, or with D_CHUNK < HEAD_DIM read D_CHUNK columns at a time, as
    `_scores`."""
    if D_CHUNK == HEAD_DIM:
        q_hi, q_lo = q
        k_hi, k_lo = k
        return _dot_pairs(q_hi, q_lo, tl.trans(k_hi), tl.trans(k_lo), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in tl.static_range(0, HEAD_DIM, D_CHUNK):
            q_c = q_rows + (d0 + tl.arange(0, D_CHUNK))[None, :] * stride_qd
            k_c = k_rows + (d0 + tl.arange(0, D_CHUNK))[None, :] * stride_kd
            s = _dot_pairs(tl.load(q_c, mask=q_mask, other=0.0), tl.load(q_c + HEAD_DIM * stride_qd, mask=q_mask,
                                                                         other=0.0),
                           tl.trans(tl.load(k_c, mask=k_mask, other=0.0)),
                           tl.trans(tl.load(k_c + HEAD_DIM * stride_kd, mask=k_mask, other=0.0)), s)
        return s


@triton.jit
def _dkdv_sub(dk, dv, k, vx, sub: tl.constexpr, ctx, META: tl.constexpr):
    """One query tile x key sub-tile `sub` of the program: dv += P~^T DOD[:, :DVW], and dk += dS^T q (`_dkdv_ds`)
    or in RANK_ONE form (C = 1) its two sums: dk = (P~^T [dO' q], P^T [-Delta q]) with the per-query operands DKF
    gives as [hi, lo] pairs, both sums in one product [P^T [dO' q | -Delta q]] without dropout (P~ = P); the store
    combines them (`_store_dkdv`). The transposed operands pass through shared memory: the tile rows are queries, so
    that the dropout streams match the forward's. ctx and META as _dkdv_rows packs them. PAIRS (fp32 at 3xTF32): q
    and k are fp16 [hi, lo] pairs and the scores their product (`_pair_scores`); dv and dk take P~ and dS as fp16
    pairs too (`_p16`), against dO''s and q's, so that every product reads its transposed operand from shared memory
    as 16-bit MMAs can and TF32 MMAs cannot (they read P~^T and dS^T back into registers). At TF32 with q's fp16 copy
    (ROUNDED) P~ and dS are rounded to fp16 for dv and dk, for the same reason."""
    q, q_split, dod, dod_v, lse2, neg_delta, q_rows, q_mask, K_bh, Nk, stride_qd, stride_kn, stride_kd, \
        qk_scale, zero, r0, r1, r2, r3, seed, bh, start_m, start_n, drop_threshold, dkf = ctx
    DROP_BITS: tl.constexpr = META[0]
    DOT_PRECISION: tl.constexpr = META[1]
    BLOCK_M: tl.constexpr = META[2]
    BLOCK_N: tl.constexpr = META[3]
    HEAD_DIM: tl.constexpr = META[4]
    D_CHUNK: tl.constexpr = META[5]
    PAIRS: tl.constexpr = META[6]
    RANK_ONE: tl.constexpr = META[7]
    keep = _sub_keep(r0, r1, r2, r3, seed, bh, start_m, start_n, sub, drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS)
    offs_n = start_n + sub * BLOCK_N + tl.arange(0, BLOCK_N)
    if PAIRS:
        s = _pair_scores(q, k, q_rows, K_bh + offs_n[:, None] * stride_kn, q_mask, offs_n[:, None] < Nk, stride_qd,
                         stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK)
    else:
        s = _scores(q, k, q_rows, K_bh + offs_n[:, None] * stride_kn, q_mask, offs_n[:, None] < Nk, stride_qd,
                    stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, DOT_PRECISION)
    if RANK_ONE:
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p_t = tl.trans(p.to(dod_v.dtype))
        dk_kept, dk_all = dk
        if DROP_BITS > 0:
            dkf_kept, dkf_all = dkf
            p_drop_t = tl.trans(tl.where(keep, p, zero).to(dod_v.dtype))
            dk = (tl.dot(p_drop_t, dkf_kept, dk_kept), tl.dot(p_t, dkf_all, dk_all))
            dv = tl.dot(p_drop_t, dod_v, dv)
        else:
            dk = (tl.dot(p_t, dkf, dk_kept), dk_all)
            dv = tl.dot(p_t, dod_v, dv)
    else:
        dk, dv = _dkdv_ds(dk, dv, s, vx, keep, ctx, META)
    return dk, dv


@triton.jit
def _dkdv_ds(dk, dv, s, vx, keep, ctx, META: tl.constexpr):
    """`_dkdv_sub`'s products through dS = P (dP - Delta) from its scores s and keep decisions."""
    _, q_split, dod, dod_v, lse2, neg_delta, _, _, _, _, _, _, _, qk_scale, zero, _, _, _, _, _, _, _, _, _, _ = ctx
    DROP_BITS: tl.constexpr = META[0]
    DOT_PRECISION: tl.constexpr = META[1]
    BLOCK_M: tl.constexpr = META[2]
    BLOCK_N: tl.constexpr = META[3]
    PAIRS: tl.constexpr = META[6]
    dpd = _mma(dod, tl.trans(vx), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, SPLIT_A=False)
    p, p_drop, ds = _ds_tile(s, lse2, dpd, neg_delta, keep, qk_scale, zero, DROP_BITS > 0)
    if PAIRS:  # dv's B operand holds dO''s pair already (its hi and lo columns)
        p_hi, p_lo = _p16(p_drop, tl.float16, True)
        dv = _dot_p(tl.trans(p_hi.to(tl.float16)), tl.trans(p_lo.to(tl.float16)), dod_v, dv, True)
        ds_hi, ds_lo = _p16(ds, tl.float16, True)
        q_hi, q_lo = q_split
        dk = _dot_pairs(tl.trans(ds_hi.to(tl.float16)), tl.trans(ds_lo.to(tl.float16)), q_hi, q_lo, dk)
    else:
        dv = _mma(tl.trans(p_drop.to(dod_v.dtype)), dod_v, dv, DOT_PRECISION, SPLIT_B=False)
        dk = _mma(tl.trans(ds.to(q_split.dtype)), q_split, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _sub_keep(r0, r1, r2, r3, seed, bh, start_m, start_n, sub: tl.constexpr, drop_threshold,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP_BITS: tl.constexpr, AS_SCALE: tl.constexpr = False):
    """Keep decisions of sub-tile `sub` of a main-loop step whose keys start at start_n; with 1-bit decisions
    the step computed the words r0..r3 of call start_n // CALL_COLUMNS once, and its sub-tiles stay in it.
    AS_SCALE: 1-bit decisions as `_bit_scale`'s multipliers."""
    if DROP_BITS == 1:
        first = (start_n // SUB_TILE) % 4 + sub * (BLOCK_N // SUB_TILE)
        if AS_SCALE:
            return _bit_scale(r0, r1, r2, r3, first, BLOCK_M, BLOCK_N)
        else:
            return _bit_keep(r0, r1, r2, r3, first, BLOCK_M, BLOCK_N)
    elif DROP_BITS > 0:
        return _slice_keep(seed, bh, start_m, start_n + sub * BLOCK_N, drop_threshold, BLOCK_M, BLOCK_N)
    else:
        return 0


@triton.jit
def _dkdv_rows(dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3, k0, vx0, k1, vx1, k2, vx2, k3, vx3,
               Q_bh, Q16_bh, DOD, LSE, NEGD, row0, start_m, start_n, d0, seed, bh, Nq, stride_qn, stride_qd,
               stride_q16n, K_bh, Nk, stride_kn, stride_kd, qk_scale, drop_threshold, zero,
               HEAD_DIM: tl.constexpr, DV: tl.constexpr, DVW: tl.constexpr, DROP_BITS: tl.constexpr,
               SUB: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr, D_SPLIT: tl.constexpr, PAIRS: tl.constexpr,
               ROUNDED: tl.constexpr, DKF, RANK_ONE: tl.constexpr):
    """One query tile against the program's SUB key sub-tiles (slots 0 .. SUB-1; the others pass through)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row = row0 + offs_m
    # Query rows past Nq read as 0 (q, DOD, DKF, lse, -Delta): P = 1 but dP - Delta = 0 and DKF's rows 0, so they add
    # nothing.
    q_rows = Q_bh + offs_m[:, None] * stride_qn
    q_mask = offs_m[:, None] < Nq
    if D_CHUNK == HEAD_DIM:
        q = _load_rows(q_rows + tl.arange(0, HEAD_DIM)[None, :] * stride_qd, offs_m, Nq, MASKED)
        if PAIRS:  # q's fp16 hi and lo: the rows' first and last HEAD_DIM columns
            q = (q, _load_rows(q_rows + (HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :] * stride_qd, offs_m, Nq, MASKED))
    else:
        q = 0
    if PAIRS and (D_SPLIT != HEAD_DIM or D_CHUNK != HEAD_DIM):
        q_split = q_rows + (d0 + tl.arange(0, D_SPLIT))[None, :] * stride_qd
        q_split = (_load_rows(q_split, offs_m, Nq, MASKED), _load_rows(q_split + HEAD_DIM * stride_qd, offs_m, Nq,
                                                                       MASKED))
    elif ROUNDED:  # q's fp16 copy (Q16) for dk
        q_split = _load_rows(Q16_bh + offs_m[:, None] * stride_q16n + (d0 + tl.arange(0, D_SPLIT))[None, :], offs_m,
                             Nq, MASKED)
    elif D_SPLIT == HEAD_DIM and D_CHUNK == HEAD_DIM:
        q_split = q
    else:
        q_split = _load_rows(q_rows + (d0 + tl.arange(0, D_SPLIT))[None, :] * stride_qd, offs_m, Nq, MASKED)
    dod = _load_rows(DOD + row[:, None] * DV + tl.arange(0, DV)[None, :], offs_m, Nq, MASKED)
    dod_v = _load_rows(DOD + row[:, None] * DV + tl.arange(0, DVW)[None, :], offs_m, Nq, MASKED)
    if PAIRS or ROUNDED:  # dO' hi and lo in fp16
        dod_v = dod_v.to(tl.float16)
    if MASKED:
        lse2 = tl.load(LSE + row, mask=offs_m < Nq, other=0.0)
        neg_delta = tl.load(NEGD + row, mask=offs_m < Nq, other=0.0)
    else:
        lse2 = tl.load(LSE + row)
        neg_delta = tl.load(NEGD + row)
    # one Philox call per stream serves the SUB sub-tiles
    r0, r1, r2, r3 = _call_words(seed, bh, start_m, start_n, BLOCK_M, DROP_BITS)
    if RANK_ONE:  # DKF's parts [dO' q hi, lo, -Delta q hi, lo]: two and two, or all four (D_SPLIT = HEAD_DIM)
        dkf_rows = DKF + row[:, None] * (4 * HEAD_DIM)
        if DROP_BITS > 0:
            dkf = (_load_rows(dkf_rows + tl.arange(0, 2 * HEAD_DIM)[None, :], offs_m, Nq, MASKED),
                   _load_rows(dkf_rows + (2 * HEAD_DIM + tl.arange(0, 2 * HEAD_DIM))[None, :], offs_m, Nq, MASKED))
        else:
            dkf = _load_rows(dkf_rows + tl.arange(0, 4 * HEAD_DIM)[None, :], offs_m, Nq, MASKED)
    else:
        dkf = 0
    ctx = (q, q_split, dod, dod_v, lse2, neg_delta, q_rows, q_mask, K_bh, Nk, stride_qd, stride_kn, stride_kd,
           qk_scale, zero, r0, r1, r2, r3, seed, bh, start_m, start_n, drop_threshold, dkf)
    meta: tl.constexpr = (DROP_BITS, DOT_PRECISION, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, PAIRS, RANK_ONE)
    dk0, dv0 = _dkdv_sub(dk0, dv0, k0, vx0, 0, ctx, meta)
    if SUB > 1:
        dk1, dv1 = _dkdv_sub(dk1, dv1, k1, vx1, 1, ctx, meta)
    if SUB > 2:
        dk2, dv2 = _dkdv_sub(dk2, dv2, k2, vx2, 2, ctx, meta)
        dk3, dv3 = _dkdv_sub(dk3, dv3, k3, vx3, 3, ctx, meta)
    return dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3


@triton.jit
def _key_tile(K_bh, VX_b, start_n, Nk, stride_kn, stride_kd, stride_vn,
              HEAD_DIM: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr):
    """The resident k (PAIRS: its fp16 [hi, lo] pair) and VX rows of a key sub-tile; keys past Nk read as 0 (their
    dk / dv rows are never stored and touch no other row)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_rows = K_bh + offs_n[:, None] * stride_kn + tl.arange(0, HEAD_DIM)[None, :] * stride_kd
    k = tl.load(k_rows, mask=offs_n[:, None] < Nk, other=0.0)
    if PAIRS:
        k = (k, tl.load(k_rows + HEAD_DIM * stride_kd, mask=offs_n[:, None] < Nk, other=0.0))
    vx = tl.load(VX_b + offs_n[:, None] * stride_vn + tl.arange(0, DV)[None, :], mask=offs_n[:, None] < Nk, other=0.0)
    return k, vx


@triton.jit
def _pair_sum(acc, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """The [BLOCK_N, 2 WIDTH] accumulator of a [hi | lo] pair's products -> hi + lo, [BLOCK_N, WIDTH]."""
    hi, lo = tl.split(tl.permute(tl.reshape(acc, [BLOCK_N, 2, WIDTH]), (0, 2, 1)))
    return hi + lo


@triton.jit
def _store_dkdv(dk, dv, vx, DK_bh, DV_OUT, SCALES, bh, start_n, d0, Nk, scale, stride_dkn, stride_dkd,
                C: tl.constexpr, DVW: tl.constexpr, BLOCK_N: tl.constexpr, D_SPLIT: tl.constexpr,
                COPIES: tl.constexpr, RANK_ONE: tl.constexpr, DROP: tl.constexpr):
    """dk columns d0 .. d0 + D_SPLIT times scale; dv (fp32, this head's) by the first column split only. COPIES:
    first undo the fp16 copies' scales: dv's SCALES[0], dk's as three powers of two of about equal exponents (their
    product, or any one first, may leave fp32's range where the accumulator and dk do not). RANK_ONE: dk is the
    pair of `_dkdv_sub`'s sums, each [hi | lo] columns, and dk = (v (sum over kept) + (sum over all)) SCALES[0] (DKF's
    inverse scale), v VX's column 0."""
    if COPIES:
        dk = dk * tl.load(SCALES + 1) * tl.load(SCALES + 2) * tl.load(SCALES + 3)
        dv = dv * tl.load(SCALES)
    if RANK_ONE:
        dk_kept, dk_all = dk
        if DROP:
            kept, every = _pair_sum(dk_kept, BLOCK_N, D_SPLIT), _pair_sum(dk_all, BLOCK_N, D_SPLIT)
        else:  # one accumulator, [kept hi | kept lo | all hi | all lo]: (key, column, sum, half)
            hi, lo = tl.split(tl.permute(tl.reshape(dk_kept, [BLOCK_N, 2, 2, D_SPLIT]), (0, 3, 1, 2)))
            kept, every = tl.split(hi + lo)
        v = tl.sum(tl.where(tl.arange(0, vx.shape[1])[None, :] == 0, vx.to(tl.float32), 0.0), 1)
        dk = (kept * v[:, None] + every) * tl.load(SCALES)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    tl.store(DK_bh + offs_n[:, None] * stride_dkn + (d0 + tl.arange(0, D_SPLIT))[None, :] * stride_dkd,
             (dk * scale).to(DK_bh.dtype.element_ty), mask=offs_n[:, None] < Nk)
    # dv channel c: the sum of its hi and lo dO columns, c and C + c.
    col = tl.arange(0, DVW)
    offs_c = tl.arange(0, DVW // 2)
    pick = (col[:, None] == offs_c[None, :]) | (col[:, None] == C + offs_c[None, :])
    dv = tl.sum(dv[:, :, None] * pick[None, :, :].to(tl.float32), 1)
    tl.store(DV_OUT + (bh.to(tl.int64) * Nk + offs_n)[:, None] * C + offs_c[None, :], dv,
             mask=(offs_n[:, None] < Nk) & (offs_c[None, :] < C) & (d0 == 0))


@triton.jit
def _bwd_dkdv_kernel(Q, K, VX, DOD, LSE, NEGD, DK, DV_OUT, SEED, SCALES, Q16,
                     stride_qb, stride_qn, stride_qh, stride_qd,
                     stride_q16b, stride_q16n, stride_q16h,
                     stride_kb, stride_kn, stride_kh, stride_kd,
                     stride_vb, stride_vn,
                     stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                     H, Nq, Nk, qk_scale, scale, drop_threshold, zero, DKF,
                     HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr, DVW: tl.constexpr,
                     DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_TILES: tl.constexpr,
                     D_CHUNK: tl.constexpr, D_SPLIT: tl.constexpr, RANK_ONE: tl.constexpr):
    """One program per (KEY_TILES key sub-tiles, b*H + h): loops over the query tiles, accumulates dk and this
    head's dv. KEY_TILES * BLOCK_N divides CALL_COLUMNS: with 1-bit dropout one Philox call per stream then
    serves all the program's sub-tiles (all its words when KEY_TILES * BLOCK_N == CALL_COLUMNS). fp32 inputs take
    dv and dk as 16-bit products of scaled fp16 copies (kernels.ops.backward_operands): at 3xTF32 (PAIRS) Q and K
    are q's and k's [hi, lo] pairs (B, N, H, 2D) and the scores their product, at TF32 (ROUNDED) Q16 is q rounded
    to fp16 for dk; dv is SCALES[0], dk SCALES[1] SCALES[2] SCALES[3] and the pairs' scores SCALES[4] times what the
    products give. Otherwise Q16 is Q. RANK_ONE (16 bits, C = 1: kernels.configs.rank_one_dkdv): dk from its rank-one
    form (`_dkdv_sub`), DKF (B*H*Nq, 4D) the per-query [dO' q hi, lo, -Delta q hi, lo] times 1 / SCALES[0]
    (kernels.ops.dk_factors); otherwise DKF is unused."""
    SUB: tl.constexpr = KEY_TILES
    PAIRS: tl.constexpr = DOT_PRECISION == "tf32x3" and Q.dtype.element_ty == tl.float16
    ROUNDED: tl.constexpr = Q.dtype.element_ty == tl.float32 and Q16.dtype.element_ty == tl.float16
    tl.static_assert(not RANK_ONE or (D_SPLIT == HEAD_DIM and not PAIRS and Q.dtype.element_ty != tl.float32),
                     "the rank-one form takes 16-bit inputs and all of dk's columns in one program")
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    d0 = tl.program_id(2) * D_SPLIT  # this program's D_SPLIT columns of dk (each split recomputes P)
    b = bh // H
    h = bh % H
    start_n = pid_n * SUB * BLOCK_N
    K_bh = K + b * stride_kb + h * stride_kh
    VX_b = VX + b * stride_vb
    k0, vx0 = _key_tile(K_bh, VX_b, start_n, Nk, stride_kn, stride_kd, stride_vn, HEAD_DIM, DV, BLOCK_N, PAIRS)
    if RANK_ONE:  # the sums over kept and over all weights, [hi | lo] each; one accumulator for both without dropout
        if DROP_BITS > 0:
            dk0 = (tl.zeros([BLOCK_N, 2 * D_SPLIT], dtype=tl.float32),
                   tl.zeros([BLOCK_N, 2 * D_SPLIT], dtype=tl.float32))
        else:
            dk0 = (tl.zeros([BLOCK_N, 4 * D_SPLIT], dtype=tl.float32), tl.zeros([1, 1], dtype=tl.float32))
    else:
        dk0 = tl.zeros([BLOCK_N, D_SPLIT], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, DVW], dtype=tl.float32)
    # Unused slots are placeholders that the loop carries unchanged (and the compiler drops).
    k1, vx1, k2, vx2, k3, vx3 = k0, vx0, k0, vx0, k0, vx0
    dk1, dv1, dk2, dv2, dk3, dv3 = dk0, dv0, dk0, dv0, dk0, dv0
    if SUB > 1:
        k1, vx1 = _key_tile(K_bh, VX_b, start_n + BLOCK_N, Nk, stride_kn, stride_kd, stride_vn, HEAD_DIM, DV, BLOCK_N,
                            PAIRS)
    if SUB > 2:
        k2, vx2 = _key_tile(K_bh, VX_b, start_n + 2 * BLOCK_N, Nk, stride_kn, stride_kd, stride_vn, HEAD_DIM, DV,
                            BLOCK_N, PAIRS)
        k3, vx3 = _key_tile(K_bh, VX_b, start_n + 3 * BLOCK_N, Nk, stride_kn, stride_kd, stride_vn, HEAD_DIM, DV,
                            BLOCK_N, PAIRS)
    Q_bh = Q + b * stride_qb + h * stride_qh
    Q16_bh = Q16 + b * stride_q16b + h * stride_q16h
    row0 = bh.to(tl.int64) * Nq
    if PAIRS:
        qk_scale *= tl.load(SCALES + 4)
    seed = tl.load(SEED) if DROP_BITS > 0 else 0
    n_full = Nq // BLOCK_M * BLOCK_M
    for start_m in range(0, n_full, BLOCK_M):
        dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3 = _dkdv_rows(
            dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3, k0, vx0, k1, vx1, k2, vx2, k3, vx3, Q_bh, Q16_bh, DOD, LSE, NEGD,
            row0, start_m, start_n, d0, seed, bh, Nq, stride_qn, stride_qd, stride_q16n, K_bh, Nk, stride_kn,
            stride_kd, qk_scale, drop_threshold, zero, HEAD_DIM, DV, DVW, DROP_BITS, SUB, False, DOT_PRECISION,
            BLOCK_M, BLOCK_N, D_CHUNK, D_SPLIT, PAIRS, ROUNDED, DKF, RANK_ONE)
    if n_full < Nq:  # the last, partial query tile: the only one with masked loads
        dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3 = _dkdv_rows(
            dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3, k0, vx0, k1, vx1, k2, vx2, k3, vx3, Q_bh, Q16_bh, DOD, LSE, NEGD,
            row0, n_full, start_n, d0, seed, bh, Nq, stride_qn, stride_qd, stride_q16n, K_bh, Nk, stride_kn,
            stride_kd, qk_scale, drop_threshold, zero, HEAD_DIM, DV, DVW, DROP_BITS, SUB, True, DOT_PRECISION,
            BLOCK_M, BLOCK_N, D_CHUNK, D_SPLIT, PAIRS, ROUNDED, DKF, RANK_ONE)

    DK_bh = DK + b * stride_dkb + h * stride_dkh
    COPIES: tl.constexpr = PAIRS or ROUNDED
    DROP: tl.constexpr = DROP_BITS > 0
    _store_dkdv(dk0, dv0, vx0, DK_bh, DV_OUT, SCALES, bh, start_n, d0, Nk, scale, stride_dkn, stride_dkd, C, DVW,
                BLOCK_N, D_SPLIT, COPIES, RANK_ONE, DROP)
    if SUB > 1:
        _store_dkdv(dk1, dv1, vx1, DK_bh, DV_OUT, SCALES, bh, start_n + BLOCK_N, d0, Nk, scale, stride_dkn, stride_dkd,
                    C, DVW, BLOCK_N, D_SPLIT, COPIES, RANK_ONE, DROP)
    if SUB > 2:
        _store_dkdv(dk2, dv2, vx2, DK_bh, DV_OUT, SCALES, bh, start_n + 2 * BLOCK_N, d0, Nk, scale, stride_dkn,
                    stride_dkd, C, DVW, BLOCK_N, D_SPLIT, COPIES, RANK_ONE, DROP)
        _store_dkdv(dk3, dv3, vx3, DK_bh, DV_OUT, SCALES, bh, start_n + 3 * BLOCK_N, d0, Nk, scale, stride_dkn,
                    stride_dkd, C, DVW, BLOCK_N, D_SPLIT, COPIES, RANK_ONE, DROP)


@triton.jit
def _dq_tile(dq, ctx, start_n, keep, META: tl.constexpr, MASKED: tl.constexpr):
    """One key tile: dq[:, d0 : d0 + D_SPLIT] += dS k[:, d0 : d0 + D_SPLIT]; ctx and META as _bwd_dq_kernel
    packs them."""
    q, q_rows, K_bh, VX_b, dod, lse2, neg_delta, offs_m, d0, Nq, Nk, stride_qd, stride_kn, stride_kd, stride_vn, \
        qk_scale, zero = ctx
    HEAD_DIM: tl.constexpr = META[0]
    DV: tl.constexpr = META[1]
    DROP: tl.constexpr = META[2]
    DOT_PRECISION: tl.constexpr = META[3]
    BLOCK_M: tl.constexpr = META[4]
    BLOCK_N: tl.constexpr = META[5]
    D_CHUNK: tl.constexpr = META[6]
    D_SPLIT: tl.constexpr = META[7]
    offs_n, k_rows, k, s = _key_scores(q, q_rows, K_bh, offs_m, start_n, Nq, Nk, stride_qd, stride_kn, stride_kd,
                                       HEAD_DIM, MASKED, DOT_PRECISION, BLOCK_M, BLOCK_N, D_CHUNK)
    if D_SPLIT == HEAD_DIM and D_CHUNK == HEAD_DIM:
        k_split = k
    else:
        k_split = _load_rows(k_rows + (d0 + tl.arange(0, D_SPLIT))[None, :] * stride_kd, offs_n, Nk, MASKED)
    vx = _load_rows(VX_b + offs_n[:, None] * stride_vn + tl.arange(0, DV)[None, :], offs_n, Nk, MASKED)
    dpd = _mma(dod, tl.trans(vx), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, SPLIT_A=False)
    p, p_drop, ds = _ds_tile(s, lse2, dpd, neg_delta, keep, qk_scale, zero, DROP)
    return _mma(ds.to(k_split.dtype), k_split, dq, DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(Q, K, VX, DOD, LSE, NEGD, DQ, SEED,
                   stride_qb, stride_qn, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn,
                   stride_dqb, stride_dqn, stride_dqh, stride_dqd,
                   H, Nq, Nk, qk_scale, scale, drop_threshold, zero,
                   HEAD_DIM: tl.constexpr, C: tl.constexpr, DV: tl.constexpr,
                   DROP_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, SHARE_CALLS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr, D_SPLIT: tl.constexpr):
    """One program per (query tile, b*H + h, D_SPLIT columns of dq): loops over the key tiles, accumulates
    its dq columns (D_SPLIT < D bounds the accumulator; each split recomputes P). SHARE_CALLS: `shares_calls`."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    d0 = tl.program_id(2) * D_SPLIT
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = bh.to(tl.int64) * Nq + offs_m
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    if D_CHUNK == HEAD_DIM:  # the q tile stays resident
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < Nq, other=0.0)
    else:
        q = 0
    dod = tl.load(DOD + row[:, None] * DV + tl.arange(0, DV)[None, :], mask=offs_m[:, None] < Nq, other=0.0)
    lse2 = tl.load(LSE + row, mask=offs_m < Nq, other=0.0)
    neg_delta = tl.load(NEGD + row, mask=offs_m < Nq, other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    VX_b = VX + b * stride_vb
    seed = tl.load(SEED) if DROP_BITS > 0 else 0
    ctx = (q, q_rows, K_bh, VX_b, dod, lse2, neg_delta, offs_m, d0, Nq, Nk, stride_qd, stride_kn, stride_kd,
           stride_vn, qk_scale, zero)
    meta: tl.constexpr = (HEAD_DIM, DV, DROP_BITS > 0, DOT_PRECISION, BLOCK_M, BLOCK_N, D_CHUNK, D_SPLIT)
    dq = _key_loop(tl.zeros([BLOCK_M, D_SPLIT], dtype=tl.float32), _dq_tile, ctx, meta, seed, bh, start_m, Nk,
                   drop_threshold, BLOCK_M, BLOCK_N, DROP_BITS, SHARE_CALLS)
    dq = dq * scale
    offs_split = d0 + tl.arange(0, D_SPLIT)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_split[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < Nq)
