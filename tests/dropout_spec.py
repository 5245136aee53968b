"""The dropout decisions as docs/kernels.md ("Dropout: the RNG scheme") specifies them, on an independent NumPy
Philox-4x32-10 written from Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011): the reference
of tests/test_dropout_rng.py, which checks it against the Random123 known-answer vectors, and a fast keep mask for
the other kernel tests (the interpreter runs `dropout_keep_mask` slowly)."""

from __future__ import annotations

import numpy as np

# Salmon et al. 2011, Philox-4x32: round multipliers and Weyl key increments.
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)
# Random123's known-answer vectors for philox4x32-10: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_10(counter: tuple[np.ndarray, ...], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox-4x32 with 10 rounds on uint32 counter arrays (broadcast), key (k0, k1); returns 4 uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint64) & MASK32 for x in counter]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        prod0 = c[0] * np.uint64(PHILOX_M[0])  # 32 x 32 -> 64 bits, exact in uint64
        prod1 = c[2] * np.uint64(PHILOX_M[1])
        c = [((prod1 >> np.uint64(32)) ^ c[1] ^ k0) & MASK32, prod1 & MASK32,
             ((prod0 >> np.uint64(32)) ^ c[3] ^ k1) & MASK32, prod0 & MASK32]
        k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & MASK32, (k1 + np.uint64(PHILOX_W[1])) & MASK32
    return [x.astype(np.uint32) for x in c]


def specified_keep(seed: int, batch: int, heads: int, n_query: int, n_key: int, dropout_p: float) -> np.ndarray:
    """The keep decisions (batch, heads, n_query, n_key) as docs/kernels.md specifies them."""
    bits = 1 if dropout_p == 0.5 else 16
    threshold = min(round(dropout_p * 2**bits), 2**bits - 1)
    key = (seed % 2**64 & 0xFFFFFFFF, seed % 2**64 >> 32)
    i = np.arange(n_query)[:, None]
    j = np.arange(n_key)[None, :]
    pair, r = (i // 16) * 8 + i % 8, (i // 8) % 2
    q, e, c, k = (j // 2) % 4, j % 2, (j // 8) % 8, (j // 64) % 4
    out = np.empty((batch * heads, n_query, n_key), dtype=bool)
    for bh in range(batch * heads):
        if bits == 1:  # bit 4c + k of word 2r + e of call (pair, j // 256, bh, q)
            words = philox4x32_10((pair, j // 256, bh, q), key)
            word = np.choose(2 * r + e, words)
            out[bh] = (word >> (4 * c + k).astype(np.uint32)) & 1 == 1
        else:  # 16-bit slice e of word c % 4 of call (pair, 4 (j // 64) + 2r + c // 4, bh, q)
            words = philox4x32_10((pair, 4 * (j // 64) + 2 * r + c // 4, bh, q), key)
            word = np.choose(c % 4 + 0 * r, words)
            out[bh] = (word >> (16 * e).astype(np.uint32)) & 0xFFFF >= threshold
    return out.reshape(batch, heads, n_query, n_key)
