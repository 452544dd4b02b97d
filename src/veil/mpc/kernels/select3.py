"""A 3-round variant of :func:`~veil.mpc.kernels.compare.select_a` for small layers.

Steps 1-4 of :mod:`veil.mpc.kernels.compare` up to the last tree level are unchanged (open ``c``;
local group lookups; one-round 4-way combine 16 -> 4 groups, with ``d = y - u`` riding along). The
last level and the bit-times-value product are then done in *one* round instead of two:

1. open the last level's 7 variables masked once, ``D_i = x_i XOR a_i`` (round 3);
2. over the integers ``x_i = D_i + (1 - 2 D_i) a_i``, so every monomial of
   ``borrow = G3 + P3 G2 + P3 P2 G1 + P3 P2 P1 G0`` (exclusive terms: XOR is the integer sum) is
   ``sum_U (prod_{T minus U} D_i)(prod_U (1 - 2 D_i)) a_U``, linear in the dealer's arithmetic shares
   of the mask products ``a_U``;
3. ``w = r63 XOR borrow = r63 + borrow - 2 r63 borrow`` (shares of ``a_U r63`` from the dealer),
   ``b = NOT msb = w if c63 else 1 - w``;
4. ``y * w = d * w + u * w`` with the dealer's shares of ``u a_U``, ``u a_U r63`` and ``u r63``:
   local, so ``y * b`` needs no further round.

Cost: 3 rounds; the same online bytes as the 4-round protocol (the 1/8-byte ``e`` opening is
replaced by 7/8 byte of masked variables); offline about 90 words per element instead of ~8, which
is why the program uses it only for layers of at most ``low_latency_elements`` comparisons.
(Arithmetic shares of mask products in the spirit of the preprocessing of Damgard et al. and of
Ishai et al.'s one-time truth tables, TCC'13.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.mpc.dealer import ARITH_MONOS, TREE, all_subsets, packed_len
from veil.mpc.kernels.arith import trunc_from_open
from veil.mpc.kernels.base import Cost, Ctx, arr, lst
from veil.mpc.kernels.compare import group_borrows, monomials_bb
from veil.mpc.sharing import bitslice, unslice_row

__all__ = ["select3_a", "select3_a_cost"]

_OFF = np.uint64(1 << 62)
_SUBS = all_subsets(ARITH_MONOS)


def _coefficients(d: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Public per-element coefficients: constant term and one per subset U (uint64, mod 2^64)."""
    n = d[0].shape[0]
    one = np.ones(n, np.uint64)
    sign: list[np.ndarray] = [one - np.uint64(2) * di for di in d]  # 1 - 2 D_i
    const = np.zeros(n, np.uint64)
    coef = {u: np.zeros(n, np.uint64) for u in _SUBS}
    for t in ARITH_MONOS:
        for bits in range(1 << len(t)):
            u = tuple(sorted(t[i] for i in range(len(t)) if bits >> i & 1))
            c = one.copy()
            for i in t:
                c *= sign[i] if i in u else d[i]
            if u:
                coef[u] += c
            else:
                const += c
    return const, np.stack([coef[u] for u in _SUBS])


def select3_a(ctx: Ctx, x: np.ndarray | None, ys: np.ndarray | None, mat: dict[str, Any], trunc: bool = False,
              opened: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``ys * [x >= 0]`` (as :func:`~veil.mpc.kernels.compare.select_a`) in 3 rounds."""
    p0 = ctx.party == 0
    if opened is None:
        assert x is not None
        c = ctx.open(x + mat["r"])  # round 1
    else:
        c = opened[0]
    n = c.shape[0]
    if trunc:
        ys = trunc_from_open(ctx.party, c + _OFF, mat["tt"], mat["tu"], ctx.fp.frac_bits)[None, :]
    assert ys is not None
    cb = bitslice(c) if opened is None else opened[1]
    g, p = group_borrows(ctx, cb, mat, None if opened is None else opened[2])
    gs, ps = [g[i::4] for i in range(4)], [p[i::4] for i in range(4)]
    d_mine = ys - mat["u"]
    terms, d_theirs = monomials_bb(ctx, [gs[0], gs[1], gs[2], ps[0], ps[1], ps[2], ps[3]], TREE[0][2],
                                   mat["level1"], extra=d_mine)  # round 2
    dval = d_mine + d_theirs
    g4 = gs[3] ^ terms[0] ^ terms[1] ^ terms[2]  # (4, nb)
    p4 = terms[3]
    xs = [g4[0], g4[1], g4[2], g4[3], p4[1], p4[2], p4[3]]
    mine = np.stack([xv ^ a[0] for xv, a in zip(xs, mat["a2"], strict=True)])
    dbits = mine ^ ctx.exchange(mine)  # round 3
    const, coef = _coefficients([unslice_row(row, n) for row in dbits])
    r63, ur63 = mat["r63"], mat["ur63"]
    f_sh = (coef * mat["fA"]).sum(axis=0) + (const if p0 else np.uint64(0))  # [borrow]
    rf = const * r63 + (coef * mat["fAR"]).sum(axis=0)  # [r63 * borrow]
    w = r63 + f_sh - np.uint64(2) * rf  # [r63 XOR borrow]
    uf = const * mat["u"] + (coef[:, None, :] * mat["fUA"]).sum(axis=0)  # [u * borrow]
    urf = const * ur63 + (coef[:, None, :] * mat["fUAR"]).sum(axis=0)  # [u * r63 * borrow]
    uw = ur63 + uf - np.uint64(2) * urf
    yw = dval * w[None, :] + uw  # [y * w]
    c63 = (c >> np.uint64(63)).astype(bool)
    return np.where(c63[None, :], yw, ys - yw)  # b = w if c63 else 1 - w


def select3_a_cost(n: int, width: int = 1) -> Cost:
    nb = packed_len(n)
    nv, nc, _ = TREE[0]
    return (Cost().send(arr("uint64", (n,)), "masked value c")
            .send(lst(arr("uint8", (nv, nc, nb)), arr("uint64", (width, n))), "tree level 1, d")
            .send(arr("uint8", (7, nb)), "last level, masked"))
