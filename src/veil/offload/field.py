"""Arithmetic in the prime field F_p, p = 2^31 - 1, done exactly with float64 BLAS.

Why this field: every product of two field elements fits an int64 (< 2^62), so the enclave can
reduce and combine partial results with plain int64 NumPy; a field element fits a uint32 on the
wire (4 bytes); and 2^31 = 1 (mod p) makes the limb recombination cheap.

Exact matrix products. An accelerator multiplies a uniformly random field matrix ``Z`` (entries
< 2^31) by weights. float64 represents every integer below 2^53 exactly, and a dot product of
integers whose every partial sum stays below 2^53 is exact in any summation order. So ``Z`` is split
into 16-bit limbs ``Z = Z_hi * 2^16 + Z_lo`` (``Z_hi`` < 2^15, ``Z_lo`` < 2^16) and each limb is
multiplied in float64:

* small signed weights (``|W_q| <= 2^WEIGHT_BITS``, Slalom's setting): two products, exact while
  ``K * 2^16 * 2^WEIGHT_BITS < 2^53`` (K = inner dimension);
* full field weights (additive weight shares): both sides are split, four products, exact while
  ``K * 2^32 < 2^53``, i.e. K < 2^21 (:data:`MAX_INNER_FULL`).

The limb logic is written once against a tiny backend interface (NumPy, or torch on CPU/GPU, see
:mod:`veil.offload.backend`). Fixed-point encoding and uniform sampling are pure functions here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "P", "HALF", "LIMB", "WEIGHT_BITS", "MAX_INNER_FULL", "MAX_INNER_SMALL", "to_field", "centered",
    "uniform_field", "mul_small", "mul_full", "limbs_f64", "FieldOps",
]

P: int = 2**31 - 1  #: the field modulus (a Mersenne prime)
HALF: int = (P - 1) // 2  #: field elements above HALF decode as negative numbers
LIMB: int = 16  #: limb width in bits
WEIGHT_BITS: int = 12  #: quantised weights satisfy |W_q| <= 2^WEIGHT_BITS
MAX_INNER_FULL: int = 2 ** (53 - 32)  #: largest exact inner dimension with full field weights (exclusive)
MAX_INNER_SMALL: int = 2 ** (53 - LIMB - WEIGHT_BITS)  #: same with small signed weights (exclusive)


def to_field(a: np.ndarray) -> np.ndarray:
    """Signed integers (int64) -> field elements in [0, p) as int64."""
    return np.mod(a.astype(np.int64, copy=False), P)


def centered(a: np.ndarray) -> np.ndarray:
    """Field elements -> signed integers in (-p/2, p/2] (the inverse of :func:`to_field` on that range)."""
    a = a.astype(np.int64, copy=False)
    return np.where(a > HALF, a - P, a)


def uniform_field(seed: bytes, n: int) -> np.ndarray:
    """``n`` field elements, exactly uniform in [0, p), expanded from a 32-byte seed with AES-256-CTR.

    31-bit words are uniform on [0, 2^31); the single value 2^31 - 1 = p is rejected and redrawn from
    the continuing key stream, so the result is exactly uniform on [0, p). Deterministic in ``seed``.
    """
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    out = np.frombuffer(enc.update(b"\x00" * (4 * n)), dtype="<u4").astype(np.int64) & 0x7FFFFFFF
    bad = np.flatnonzero(out == P)
    while bad.size:  # probability 2^-31 per element
        fresh = np.frombuffer(enc.update(b"\x00" * (4 * bad.size)), dtype="<u4").astype(np.int64) & 0x7FFFFFFF
        out[bad] = fresh
        bad = bad[fresh == P]
    return out


class FieldOps:
    """What the limb arithmetic needs from an array library (NumPy arrays or torch tensors, int64)."""

    name = "abstract"

    def f64(self, t: Any) -> Any:  # int64 -> float64
        raise NotImplementedError

    def i64(self, t: Any) -> Any:  # float64 holding exact integers -> int64
        raise NotImplementedError


Op = Callable[[Any, Any], Any]


def mul_small(ops: FieldOps, z: Any, w_f64: Any, op: Op) -> Any:
    """``op(z, W) mod p`` for field elements ``z`` and small signed weights (already float64).

    ``op`` is bilinear (a matrix product or a convolution) evaluated in float64; two limb products.
    """
    hi = ops.i64(op(ops.f64(z >> LIMB), w_f64)) % P
    lo = ops.i64(op(ops.f64(z & 0xFFFF), w_f64)) % P
    return (hi * (1 << LIMB) + lo) % P


def mul_full(ops: FieldOps, z: Any, w_hi: Any, w_lo: Any, op: Op) -> Any:
    """``op(z, W) mod p`` for field elements on both sides; ``W = w_hi * 2^16 + w_lo`` given as float64
    limbs. Four limb products; 2^32 = 2 (mod p)."""
    z_hi, z_lo = ops.f64(z >> LIMB), ops.f64(z & 0xFFFF)
    hh = ops.i64(op(z_hi, w_hi)) % P
    mid = (ops.i64(op(z_hi, w_lo)) + ops.i64(op(z_lo, w_hi))) % P
    ll = ops.i64(op(z_lo, w_lo)) % P
    return (hh * 2 + mid * (1 << LIMB) + ll) % P


def limbs_f64(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Field elements -> (hi, lo) 16-bit limbs as float64 arrays."""
    w = w.astype(np.int64, copy=False)
    return (w >> LIMB).astype(np.float64), (w & 0xFFFF).astype(np.float64)
