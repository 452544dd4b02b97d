"""Exact comparison: the sign of secret values, and a secret bit times secret values (ReLU, max).

``select_a(x, ys)`` returns ``ys * [x >= 0]`` for every element (``relu_a(x) = select_a(x, x)``,
``max(a, b) = b + select_a(a - b, a - b)``); optionally the selected value is ``trunc(x)``, fusing
the truncation of a product into the comparison's single opening. Protocol (dealer-assisted bit
decomposition in the style of ABY3's / Escudero et al.'s masked-opening comparison; the AND gates
are Beaver AND triples, Beaver CRYPTO'91):

1. Offline the dealer shares ``r`` arithmetically and its 64 bits as bit-sliced XOR shares, 120
   AND triples (rows of packed bits), a random bit ``t`` in both binary and arithmetic form,
   a random ``u`` and ``u * t``.
2. Open ``c = x + r`` (round 1; uniform, so it reveals nothing). Then ``x = c - r`` and
   ``msb(x) = c_63 XOR r_63 XOR borrow`` where ``borrow = [c mod 2^63 < r mod 2^63]``.
3. Borrow tree: per bit, generate ``g = NOT c_j AND r_j`` and propagate ``p = NOT(c_j XOR r_j)``
   are local (``c`` is public). Six levels combine neighbour groups, ``G = G_hi XOR (P_hi AND G_lo)``,
   ``P = P_hi AND P_lo``: one batched Beaver AND per level (rounds 2-7), 2k-1 gates for k pairs.
   The opening of ``d = y - u`` (the value to multiply, masked) rides along with level 1.
4. ``b = NOT msb(x)`` in XOR shares; open ``e = b XOR t`` (round 8, one bit per element).
5. ``y * b = y * t`` if ``e = 0`` else ``y - y * t``, with ``y * t = d * [t] + [u * t]``: local.

Rounds: 8 per call, whatever the number of elements (all elements of a layer go in one call).
Bytes per server and element: 8 (c) + 30 (AND openings) + 8 * width (d) + 1/8 (e).
All values must satisfy ``|x| < 2^63`` (``< 2^62`` with truncation): see :mod:`veil.mpc.fixedpoint`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.mpc.dealer import AND_ROWS, packed_len
from veil.mpc.kernels.arith import trunc_from_open
from veil.mpc.kernels.base import Cost, Ctx, arr, lst
from veil.mpc.sharing import bitslice, unslice_row

__all__ = ["and_bb", "select_a", "select_a_cost", "relu_a", "msb_bits"]

_OFF = np.uint64(1 << 62)


def _and_finish(party: int, d: np.ndarray, e: np.ndarray, trip: tuple[np.ndarray, ...]) -> np.ndarray:
    a, b, c = trip
    z = (d & b) ^ (e & a) ^ c
    if party == 0:
        z ^= d & e
    return z


def and_bb(ctx: Ctx, x: np.ndarray, y: np.ndarray, trip: tuple[np.ndarray, ...], extra: Any = None) -> tuple[np.ndarray, Any]:
    """AND of XOR-shared packed bit rows with a Beaver triple: one round. ``extra`` (an array) is
    sent along in the same message; the peer's ``extra`` is returned."""
    a, b, _ = trip
    mine = np.concatenate([x ^ a, y ^ b])
    msg: Any = mine if extra is None else [mine, extra]
    theirs = ctx.exchange(msg)
    other_extra = None
    if extra is not None:
        theirs, other_extra = theirs
    both = mine ^ theirs
    k = x.shape[0]
    return _and_finish(ctx.party, both[:k], both[k:], trip), other_extra


def msb_bits(ctx: Ctx, c: np.ndarray, mat: dict[str, Any], extra: Any = None) -> tuple[np.ndarray, Any]:
    """XOR shares (one packed row) of ``msb(c - r)``; steps 2-3. ``extra`` rides with level 1."""
    cb = bitslice(c)  # (64, nb) public
    rb = mat["rb"]
    p0 = ctx.party == 0
    g = ~cb[:63] & rb[:63]
    p = rb[:63] ^ ~cb[:63] if p0 else rb[:63].copy()
    nb = cb.shape[1]
    g = np.concatenate([g, np.zeros((1, nb), np.uint8)])  # padding group: g = 0, p = 1
    p = np.concatenate([p, np.full((1, nb), 0xFF if p0 else 0, np.uint8)])
    got = None
    for lvl, trip in enumerate(mat["ands"]):
        lo_g, hi_g, lo_p, hi_p = g[0::2], g[1::2], p[0::2], p[1::2]
        k = lo_g.shape[0]
        x = np.concatenate([hi_p, hi_p[1:]])
        y = np.concatenate([lo_g, lo_p[1:]])
        z, o = and_bb(ctx, x, y, trip, extra if lvl == 0 else None)
        if lvl == 0:
            got = o
        g = hi_g ^ z[:k]
        p = np.concatenate([np.zeros((1, nb), np.uint8), z[k:]])  # P of the lowest group is never used
    borrow = g[0]
    s = rb[63] ^ borrow
    if p0:
        s ^= cb[63]
    return s, got


def select_a(ctx: Ctx, x: np.ndarray, ys: np.ndarray | None, mat: dict[str, Any], trunc: bool = False) -> np.ndarray:
    """``ys * [x >= 0]`` element-wise. ``x``: shares (n,); ``ys``: shares (width, n), or ``None`` with
    ``trunc=True`` to select ``trunc(x)`` (then returns (1, n)). 8 rounds."""
    n = x.shape[0]
    c = ctx.open(x + mat["r"])  # round 1
    if trunc:
        ys = trunc_from_open(ctx.party, c + _OFF, mat["tt"], mat["tu"], ctx.fp.frac_bits)[None, :]
    assert ys is not None
    d_mine = ys - mat["u"]
    s, d_theirs = msb_bits(ctx, c, mat, extra=d_mine)  # rounds 2-7
    d = d_mine + d_theirs
    b = s ^ mat["t"]
    if ctx.party == 0:
        b = ~b  # b = NOT msb
    e = unslice_row(ctx.open_bits(b), n).astype(bool)  # round 8
    yt = d * mat["tA"][None, :] + mat["w"]
    return np.where(e[None, :], ys - yt, yt)


def relu_a(ctx: Ctx, x: np.ndarray, mat: dict[str, Any], trunc: bool = False) -> np.ndarray:
    """ReLU of shares ``x`` (any shape), fused with a truncation when ``trunc``."""
    flat = x.reshape(-1)
    out = select_a(ctx, flat, None if trunc else flat[None, :], mat, trunc)
    return out.reshape(x.shape)


def select_a_cost(n: int, width: int = 1) -> Cost:
    nb = packed_len(n)
    cost = Cost().send(arr("uint64", (n,)), "masked value c")
    for lvl, rows in enumerate(AND_ROWS):
        bits = arr("uint8", (2 * rows, nb))
        cost.send(lst(bits, arr("uint64", (width, n))) if lvl == 0 else bits, f"AND level {lvl + 1}")
    return cost.send(arr("uint8", (nb,)), "masked bit e")
