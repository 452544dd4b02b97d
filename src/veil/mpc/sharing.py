"""Pure share/reconstruct functions: additive shares in Z_2^64 and XOR shares of bit vectors.

No parties, no network: these are the algebra the protocols build on, tested on their own.

* arithmetic: ``x = x0 + x1 mod 2^64``, ``x0`` uniform (from a :class:`~veil.mpc.prg.Prg` stream
  or given), so each share alone is uniform and independent of ``x``.
* binary: ``b = b0 XOR b1`` on packed bit arrays (uint8), ``b0`` uniform.
* bit slicing: comparisons work on the bits of many ring elements at once, stored as rows of
  packed bits: row ``j`` holds bit ``j`` of every element (:func:`bitslice`, :func:`unslice_row`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["share", "reconstruct", "share_bits", "reconstruct_bits", "bitslice", "unslice_row", "pack_bits",
           "unpack_bits"]


def share(x: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ring elements ``x`` into (r, x - r): ``r`` must be uniform uint64 of x's shape."""
    x = np.asarray(x, np.uint64)
    return r, x - r


def reconstruct(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    return np.asarray(x0, np.uint64) + np.asarray(x1, np.uint64)


def share_bits(b: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """XOR-share packed bits ``b`` (uint8) with uniform ``r``."""
    return r, np.bitwise_xor(b, r)


def reconstruct_bits(b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    return np.bitwise_xor(b0, b1)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """0/1 array (..., n) -> packed uint8 (..., ceil(n/8)), little bit order."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint8 0/1 array (..., n)."""
    return np.unpackbits(packed, axis=-1, count=n, bitorder="little")


def _transpose8x8(w: np.ndarray) -> np.ndarray:
    """Transpose the 8x8 bit matrix held in each uint64 (byte r, bit c) -> (byte c, bit r)."""
    def swap(x: np.ndarray, shift: int, mask: int) -> np.ndarray:
        t = ((x >> np.uint64(shift)) ^ x) & np.uint64(mask)
        return x ^ t ^ (t << np.uint64(shift))
    w = swap(w, 7, 0x00AA00AA00AA00AA)
    w = swap(w, 14, 0x0000CCCC0000CCCC)
    return swap(w, 28, 0x00000000F0F0F0F0)


def bitslice(x: np.ndarray, nbits: int = 64) -> np.ndarray:
    """uint64 (n,) -> packed rows (nbits, ceil(n/8)): row j holds bit j of every element.

    Groups of 8 elements are handled as 8x8 bit matrices (one per byte position): gather byte k of
    8 elements into a word, transpose its bits, and byte b of the result is the packed row 8k+b.
    """
    x = np.asarray(x, np.uint64).reshape(-1)
    n = x.shape[0]
    nb = (n + 7) // 8
    if n != 8 * nb:
        x = np.concatenate([x, np.zeros(8 * nb - n, np.uint64)])
    by = x.view(np.uint8).reshape(nb, 8, 8)  # (group, element t, byte k)
    w = np.ascontiguousarray(by.transpose(0, 2, 1)).view(np.uint64).reshape(nb, 8)  # word (group, k): byte t
    w = _transpose8x8(w)  # word (group, k): byte b = packed bit 8k+b of the 8 elements
    rows = w.view(np.uint8).reshape(nb, 64)  # (group, 8k + b)
    return np.ascontiguousarray(rows.T[:nbits])


def unslice_row(row: np.ndarray, n: int) -> np.ndarray:
    """One packed row (ceil(n/8),) -> uint64 0/1 per element (n,)."""
    return np.unpackbits(row, count=n, bitorder="little").astype(np.uint64)
