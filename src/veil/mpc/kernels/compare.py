"""Exact comparison: the sign of secret values, and a secret bit times secret values (ReLU, max).

``select_a(x, ys)`` returns ``ys * [x >= 0]`` for every element (``relu_a(x) = select_a(x, x)``,
``max(a, b) = b + select_a(a - b, a - b)``); optionally the selected value is ``trunc(x)``, fusing
the truncation of a product into the comparison's single opening. Protocol (dealer-assisted bit
decomposition with a masked opening, as in ABY3 / Escudero et al. CRYPTO'20, with one-round
multi-input AND gates from dealer mask products, cf. Damgard et al.'s "unbounded fan-in"
multiplication and the one-time truth tables of Ishai et al. TCC'13):

1. Offline the dealer shares ``r`` arithmetically, its top bit ``r_63``, lookup tables of the
   borrow of every 4-bit group (step 3), masks and mask products for two tree levels (step 4), a
   random bit ``t`` in both binary and arithmetic form, a random ``u`` and ``u * t``.
2. Open ``c = x + r`` (round 1; uniform, so it reveals nothing). Then ``x = c - r`` and
   ``msb(x) = c_63 XOR r_63 XOR borrow`` where ``borrow = [c mod 2^63 < r mod 2^63]``.
3. The low 63 bits form 16 groups of 4 bits (the top one 3 bits). For group k the dealer tabulated,
   for each of the 16 possible public nibbles ``u`` of ``c``, the group's borrow generate
   ``G_u = [u < r_k]`` as XOR shares (256 bits per element); the propagate ``P_u = [u == r_k]`` is
   ``G_{u-1} XOR G_u``. Each server selects the entries of the actual nibble locally (public
   selectors ANDed with shares: no communication).
4. Two rounds combine 4 adjacent groups at a time: ``G = G3 ^ P3 G2 ^ P3 P2 G1 ^ P3 P2 P1 G0`` (the
   terms are mutually exclusive) and ``P = P3 P2 P1 P0``, each product of up to four shared bits in
   one round (:func:`monomials_bb`: open every variable masked once, the products follow from the
   dealer's mask products). 16 groups -> 4 -> 1 (rounds 2-3). The opening of ``d = y - u`` (the value
   to multiply, masked) rides along with round 2.
5. ``b = NOT msb(x)`` in XOR shares; open ``e = b XOR t`` (round 4, one bit per element).
6. ``y * b = y * t`` if ``e = 0`` else ``y - y * t``, with ``y * t = d * [t] + [u * t]``: local.

Rounds: 4 per call, whatever the number of elements (all elements of a layer go in one call).
Bytes per server and element: 8 (c) + 34/8 (tree openings) + 8 * width (d) + 1/8 (e).
All values must satisfy ``|x| < 2^63`` (``< 2^62`` with truncation): see :mod:`veil.mpc.fixedpoint`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from veil.mpc.dealer import GROUPS, TREE, packed_len
from veil.mpc.kernels.arith import trunc_from_open
from veil.mpc.kernels.base import Cost, Ctx, arr, lst
from veil.mpc.sharing import bitslice

__all__ = ["minterms", "and_bb", "monomials_bb", "group_borrows", "select_a", "select_a_cost", "relu_a", "msb_bits"]

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


def monomials_bb(ctx: Ctx, xs: list[np.ndarray], monos: tuple[tuple[int, ...], ...], mat: dict[str, Any],
                 extra: Any = None) -> tuple[list[np.ndarray], Any]:
    """Products of several XOR-shared bits in one round: open ``D_i = x_i XOR a_i``, then
    ``prod_{i in T} x_i = XOR_{U subset of T} (prod_{i in T minus U} D_i) AND a_U`` with the dealer's
    shares of the mask products ``a_U`` (``a_{}`` = 1 is public: party 0 adds that term)."""
    a, prods = mat["a"], mat["prods"]
    mine = np.stack([x ^ m for x, m in zip(xs, a, strict=True)])
    theirs = ctx.exchange(mine if extra is None else [mine, extra])
    other_extra = None
    if extra is not None:
        theirs, other_extra = theirs
    d = mine ^ theirs
    pubs: dict[tuple[int, ...], np.ndarray] = {}

    def pub(rest: tuple[int, ...]) -> np.ndarray:  # AND of the public D_i, i in rest (cached)
        if rest not in pubs:
            pubs[rest] = d[rest[0]] if len(rest) == 1 else pub(rest[:-1]) & d[rest[-1]]
        return pubs[rest]

    outs = []
    for t in monos:
        acc: np.ndarray | None = None
        for u, rest in _splits(t):
            if not u:
                if ctx.party != 0:
                    continue
                term = pub(rest).copy()
            else:
                sh = a[u[0]] if len(u) == 1 else prods[u]
                term = sh.copy() if not rest else pub(rest) & sh
            if acc is None:
                acc = term
            else:
                acc ^= term
        assert acc is not None
        outs.append(acc)
    return outs, other_extra


@cache
def _splits(t: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Every split of a monomial's variables into (masked part U, public part T minus U), both sorted."""
    out = []
    for bits in range(1 << len(t)):
        u = tuple(sorted(t[i] for i in range(len(t)) if bits >> i & 1))
        rest = tuple(sorted(t[i] for i in range(len(t)) if not bits >> i & 1))
        out.append((u, rest))
    return tuple(out)


def _minterms(cb: np.ndarray) -> np.ndarray:
    """Public selectors: ``m[u, k]`` = packed bits of the elements whose group-k nibble of c is u."""
    rows = cb[:64].copy()
    rows[63] = 0  # the top group holds bits 60..62 only: nibbles >= 8 never occur
    c4 = rows.reshape(GROUPS, 4, -1)
    lits = np.stack([~c4, c4])  # (2, 16, 4, nb): literal for bit value 0 / 1
    idx = np.arange(4)
    m01 = lits[idx & 1, :, 0] & lits[idx >> 1, :, 1]  # (4, 16, nb) by (u0, u1)
    m23 = lits[idx & 1, :, 2] & lits[idx >> 1, :, 3]
    u = np.arange(16)
    return m01[u & 3] & m23[u >> 2]  # (16, 16, nb)


minterms = _minterms


def group_borrows(ctx: Ctx, cb: np.ndarray, mat: dict[str, Any], m: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 (local): XOR shares of generate and propagate of the 16 groups, (16, nb) each. ``m``: the
    minterms of ``cb`` when already known (several thresholds against one opening)."""
    gt = mat["tables"]  # (16 values, 16 groups, nb): shares of G_u = [u < r_k]
    if m is None:
        m = _minterms(cb)
    shape = gt.shape[1:]
    k = gt.shape[-1] // m.shape[-1]  # K thresholds against one opening: m is shared by the K blocks
    if k > 1:
        gt, m = gt.reshape(16, shape[0], k, -1), m[:, :, None, :]
    g = np.bitwise_xor.reduce(gt & m, axis=0)  # select the actual nibble, locally
    # P = [u == r_k] = G_{u-1} ^ G_u selected by m_u: g ^ XOR_u (G_{u-1} & m_u), with G_{-1} = 1 (public)
    p = np.bitwise_xor.reduce(gt[:-1] & m[1:], axis=0)
    p ^= g
    if ctx.party == 0:
        p ^= m[0]
    return g.reshape(shape), p.reshape(shape)


def msb_bits(ctx: Ctx, c: np.ndarray, mat: dict[str, Any], extra: Any = None,
             pre: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, Any]:
    """XOR shares (one packed row) of ``msb(c - r)``; steps 2-3. ``extra`` rides with level 1. ``pre``:
    ``(bitslice(c), minterms)`` when already computed."""
    cb = bitslice(c) if pre is None else pre[0]  # (64, nb) public
    g, p = group_borrows(ctx, cb, mat, None if pre is None else pre[1])
    got = None
    for lvl, level in enumerate(mat["levels"]):
        # combine 4 adjacent groups: G = G3 ^ P3G2 ^ P3P2G1 ^ P3P2P1G0 (terms are exclusive), P = P3P2P1P0
        gs, ps = [g[i::4] for i in range(4)], [p[i::4] for i in range(4)]
        xs = [gs[0], gs[1], gs[2], ps[0], ps[1], ps[2], ps[3]] if lvl == 0 else [gs[0], gs[1], gs[2], ps[1], ps[2], ps[3]]
        terms, o = monomials_bb(ctx, xs, TREE[lvl][2], level, extra if lvl == 0 else None)
        if lvl == 0:
            got = o
        g = gs[3] ^ terms[0] ^ terms[1] ^ terms[2]
        if len(terms) > 3:  # the top level has no P output (and no level after it reads one)
            p = terms[3]
    s = mat["r63"] ^ g[0]
    if ctx.party == 0:
        s ^= cb[-1]  # bit 63 (the last row)
    return s, got


def select_a(ctx: Ctx, x: np.ndarray | None, ys: np.ndarray | None, mat: dict[str, Any], trunc: bool = False,
             opened: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``ys * [x >= 0]`` element-wise. ``x``: shares (n,); ``ys``: shares (width, n), or ``None`` with
    ``trunc=True`` to select ``trunc(x)`` (then returns (1, n)). 4 rounds. ``opened``: ``(c, bitslice(c),
    minterms)`` of an opening already made (then ``x`` is not used and round 1 is skipped); with K thresholds
    against one opening, ``c`` and the top row of ``bitslice(c)`` tiled K times, the minterms not."""
    if "fA" in mat:  # material of the 3-round variant (small layers)
        from veil.mpc.kernels.select3 import select3_a

        return select3_a(ctx, x, ys, mat, trunc, opened)
    if opened is None:
        assert x is not None
        c = ctx.open(x + mat["r"])  # round 1
    else:
        c = opened[0]
    if trunc:
        ys = trunc_from_open(ctx.party, c + _OFF, mat["tt"], mat["tu"], ctx.fp.frac_bits)[None, :]
    assert ys is not None
    n = ys.shape[1]
    d = ys - mat["u"]
    s, d_theirs = msb_bits(ctx, c, mat, extra=d, pre=None if opened is None else (opened[1], opened[2]))  # rounds 2-3
    d += d_theirs
    b = s ^ mat["t"]
    if ctx.party == 0:
        b = ~b  # b = NOT msb
    e = np.unpackbits(ctx.open_bits(b), count=n, bitorder="little").view(bool)  # round 4
    d *= mat["tA"][None, :]
    d += mat["w"]  # shares of y t
    return np.subtract(ys, d, out=d, where=e[None, :])  # y b = y t if e = 0 else y - y t


def relu_a(ctx: Ctx, x: np.ndarray, mat: dict[str, Any], trunc: bool = False) -> np.ndarray:
    """ReLU of shares ``x`` (any shape), fused with a truncation when ``trunc``."""
    flat = x.reshape(-1)
    out = select_a(ctx, flat, None if trunc else flat[None, :], mat, trunc)
    return out.reshape(x.shape)


def select_a_cost(n: int, width: int = 1) -> Cost:
    nb = packed_len(n)
    cost = Cost().send(arr("uint64", (n,)), "masked value c")
    for lvl, (nv, nc, _) in enumerate(TREE):
        bits = arr("uint8", (nv, nc, nb))
        cost.send(lst(bits, arr("uint64", (width, n))) if lvl == 0 else bits, f"tree level {lvl + 1}")
    return cost.send(arr("uint8", (nb,)), "masked bit e")
