"""Local arithmetic on shares and the truncation kernel.

* ``add_aa``, ``sub_aa``: share-wise, no communication.
* ``add_ap`` (share + public): party 0 adds the public value. ``mul_ap`` (share x public integer):
  share-wise. ``upscale_a``: multiply by 2^k (exact, local).
* ``trunc_a``: probabilistic truncation by ``f`` bits with a dealer truncation pair.

``trunc_a`` protocol (after Escudero et al., "Improved primitives for MPC over mixed
arithmetic-binary circuits", CRYPTO 2020, Sec. 5; the dealer plays the preprocessing):

1. Offline, the dealer samples ``r`` in Z_2^64 and shares ``r``, ``t = (r mod 2^63) >> f`` and
   ``u = r >> 63`` (server0's shares come from its seed; server1 gets 16 bytes/element).
2. The servers open ``z + r`` (one round, 8 bytes/element each way) and add the public offset
   ``2^62``: ``c = z' + r`` with ``z' = z + 2^62`` in [0, 2^63) whenever ``|z| < 2^62``.
3. With ``c' = c mod 2^63`` and ``b = c_63 XOR u`` (the carry of ``z' + (r mod 2^63)`` into bit 63,
   linear in ``u`` because ``c_63`` is public), ``z' = c' - (r mod 2^63) + 2^63 b`` exactly.
4. Output share: ``(c' >> f) [party 0] - t + 2^(63-f) b - 2^(62-f) [party 0]``.

Result: ``floor(z / 2^f) + delta`` with ``delta`` in {0, 1} and ``P(delta = 1) = frac(z / 2^f)``:
error below one ulp, unbiased (stochastic rounding), and no failure probability as long as
``|z| < 2^62`` (:attr:`FixedPoint.max_abs`). ``c`` is uniform, so it reveals nothing.
Cost: 1 round, one uint64 array of n elements per server.
"""

from __future__ import annotations

import numpy as np

from veil.mpc.dealer import M63
from veil.mpc.kernels.base import Cost, Ctx, arr

__all__ = ["add_ap", "mul_ap", "upscale_a", "trunc_a", "trunc_a_cost", "trunc_from_open"]

_OFF = np.uint64(1 << 62)


def add_ap(ctx: Ctx, x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Share plus public ring value: party 0 adds it."""
    return x + np.asarray(c, np.uint64) if ctx.party == 0 else x + np.zeros_like(np.asarray(c, np.uint64))


def mul_ap(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Share times public ring value (element-wise, broadcasting)."""
    return x * np.asarray(c, np.uint64)


def upscale_a(x: np.ndarray, bits: int) -> np.ndarray:
    return x << np.uint64(bits)


def trunc_from_open(party: int, c: np.ndarray, t: np.ndarray, u: np.ndarray, f: int,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Steps 3-4 of ``trunc_a``, given the opened ``c = z + r + 2^62`` (the offset added publicly);
    written into ``out`` when given (same shape as ``c``)."""
    s = np.uint64(63 - f)
    c63 = c >> np.uint64(63)
    m = np.negative(c63)  # all ones where c63 = 1: (x ^ m) - m = (1 - 2 c63) x
    res = np.left_shift(u, s, out=out)  # party 0 adds c63 << (63 - f) below
    res ^= m
    res -= m
    res -= t
    if party == 0:
        lo = c & M63
        lo >>= np.uint64(f)
        res += lo
        c63 <<= s
        res += c63
        res -= np.uint64(1 << (62 - f))
    return res


def trunc_a(ctx: Ctx, x: np.ndarray, mat: dict[str, np.ndarray]) -> np.ndarray:
    """Truncate shares ``x`` (any shape) by ``ctx.fp.frac_bits``: 1 round."""
    shape = x.shape
    c = ctx.open(x.reshape(-1) + mat["r"]) + _OFF
    return trunc_from_open(ctx.party, c, mat["t"], mat["u"], ctx.fp.frac_bits).reshape(shape)


def trunc_a_cost(n: int) -> Cost:
    return Cost().send(arr("uint64", (n,)), "masked value")
