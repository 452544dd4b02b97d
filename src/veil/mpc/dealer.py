"""The dealer's material kinds (offline phase), each a function of a side (:mod:`veil.mpc.material`).

Run with a :class:`~veil.mpc.material.DealerSide` it produces the full values and server1's
corrections; run with a :class:`~veil.mpc.material.ServerSide` it yields one server's shares. What
each server receives from the dealer per element (server0 receives nothing but its seed):

===============  ==================================================  ===========================
kind             contents                                            sent to server1
===============  ==================================================  ===========================
fixed_product    ``A`` (mask of a layer input), ``C = op(A, B)``      8 bytes per output element
                 for the layer's fixed weight mask ``B``
trunc            ``r``, ``(r mod 2^63) >> f``, ``r >> 63``            16 bytes per element
compare          ``r``, its top bit, borrow lookup tables for 16     ~61 bytes per element
                 groups of 4 bits (256 bits), mask products for two  (+16 with truncation)
                 one-round levels (103 bits), a random bit ``t``
                 (binary and arithmetic), ``u*t``
beaver           ``a``, ``b``, ``c = op(a, b)``                       8 bytes per element of c
===============  ==================================================  ===========================

The dealer never sees inputs, weights or activations: only shapes and its own randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from veil.mpc.sharing import bitslice, unslice_row

__all__ = ["fixed_product", "fixed_products", "trunc", "compare", "beaver", "TREE", "GROUPS", "M63", "packed_len", "borrow_tables",
           "product_subsets", "monomials", "ARITH_MONOS", "all_subsets", "compare3"]

M63 = np.uint64((1 << 63) - 1)
# The low 63 bits are compared in 16 groups of 4 bits (the top group has 3) by dealer lookup tables;
# the 16 group results are combined 4 at a time in two rounds. A level is (variables, combos,
# monomials): the monomials (products of variables, by index) are evaluated in one round.
GROUPS = 16
# level 1, variables G0 G1 G2 P0 P1 P2 P3 of 4 adjacent groups: P3G2, P3P2G1, P3P2P1G0, P3P2P1P0
# level 2, variables G0 G1 G2 P1 P2 P3 (no P needed at the top): P3G2, P3P2G1, P3P2P1G0
TREE: tuple[tuple[int, int, tuple[tuple[int, ...], ...]], ...] = (
    (7, 4, ((6, 2), (6, 5, 1), (6, 5, 4, 0), (6, 5, 4, 3))),
    (6, 1, ((5, 2), (5, 4, 1), (5, 4, 3, 0))),
)


def product_subsets(monos: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    """Every subset of at least two variables of some monomial (the dealer shares their mask products)."""
    out: set[tuple[int, ...]] = set()
    for t in monos:
        for bits in range(1, 1 << len(t)):
            u = tuple(sorted(t[i] for i in range(len(t)) if bits >> i & 1))
            if len(u) >= 2:
                out.add(u)
    return sorted(out)

Shape = tuple[int, ...]


def packed_len(n: int) -> int:
    return (n + 7) // 8


def monomials(side: Any, label: str, nvars: int, monos: tuple[tuple[int, ...], ...], shape: Shape) -> dict[str, Any]:
    """Material to evaluate products of XOR-shared bits in one round: a random mask per variable
    and the XOR shares of the product of the masks of every subset that a monomial needs."""
    a = [side.rand_bits(f"{label}/a{v}", shape) for v in range(nvars)]

    def prod(u: tuple[int, ...]) -> np.ndarray:
        r = a[u[0]].copy()
        for i in u[1:]:
            r &= a[i]
        return r

    prods = {u: side.share_bits(f"{label}/p{'.'.join(map(str, u))}", lambda u=u: prod(u), shape)
             for u in product_subsets(monos)}
    return {"a": a, "prods": prods}


def borrow_tables(r: np.ndarray) -> np.ndarray:
    """Dealer-side lookup tables of the borrow of ``c - r`` for every 4-bit group of the low 63 bits.

    For group ``k`` (bits 4k..4k+3; the top group has bits 60..62) and each possible public nibble
    ``u`` of ``c``: the generate bit ``G_u = [u < r_k]``, where ``r_k`` is the group's nibble of ``r``.
    (The propagate bit ``[u == r_k] = G_{u-1} XOR G_u`` with ``G_{-1} = 1`` follows locally.)
    Returned bit-sliced: (16 values, 16 groups, packed elements)."""
    n = r.shape[0]
    shifts = (np.arange(GROUPS, dtype=np.uint64) * np.uint64(4))[:, None]
    widths = np.full((GROUPS, 1), 15, np.uint64)
    widths[-1] = 7
    nib = ((r[None, :] >> shifts) & widths).astype(np.uint8)  # (16, n)
    out = np.empty((16, GROUPS, packed_len(n)), np.uint8)
    for u in range(16):
        out[u] = np.packbits(nib > u, axis=-1, bitorder="little")
    return out


def fixed_product(side: Any, label: str, a_shape: Shape, out_shape: Shape,
                  op: Callable[[np.ndarray, np.ndarray], np.ndarray], mask: Any) -> dict[str, np.ndarray]:
    """Mask ``A`` of a layer input and ``C = op(A, B)`` with the layer's fixed weight mask ``B``."""
    a = side.rand(f"{label}/A", a_shape)
    c = side.share(f"{label}/C", lambda: op(a, mask), out_shape)
    return {"A": a, "C": c}


def fixed_products(side: Any, label: str, a_shape: Shape, outs: list[tuple[Shape, Any, Any]]) -> dict[str, Any]:
    """One input mask ``A`` shared by several layers reading the same input, and ``C_l = op_l(A, B_l)``
    for each (8 bytes per output element of every layer)."""
    a = side.rand(f"{label}/A", a_shape)
    cs = [side.share(f"{label}/C{i}", lambda op=op, mask=mask: op(a, mask), shape) for i, (shape, op, mask) in enumerate(outs)]
    return {"A": a, "C": cs}


def trunc(side: Any, label: str, n: int, f: int) -> dict[str, np.ndarray]:
    """Truncation pair: ``r`` uniform, shares of ``(r mod 2^63) >> f`` and of the bit ``r >> 63``."""
    r = side.rand(f"{label}/r", (n,))
    t = side.share(f"{label}/t", lambda: (r & M63) >> np.uint64(f), (n,))
    u = side.share(f"{label}/u", lambda: r >> np.uint64(63), (n,))
    return {"r": r, "t": t, "u": u}


def _masks(side: Any, label: str, n: int, shifts: Any) -> tuple[np.ndarray, Any, int]:
    """The opening mask ``r0`` (n,) and the comparison masks: ``r0`` itself, or, with public ``shifts``
    (K thresholds compared against one opening), ``r0 + shift_i`` for each (dealer only), K n in all."""
    r0 = side.rand(f"{label}/r", (n,))
    if shifts is None:
        return r0, r0, n
    full = np.concatenate([r0 + np.uint64(s) for s in shifts]) if side.is_dealer else None
    return r0, full, n * len(shifts)


def compare(side: Any, label: str, n: int, width: int = 1, f: int | None = None, shifts: Any = None) -> dict[str, Any]:
    """Material for one vectorised comparison of ``n`` elements followed by a bit-times-value product
    of ``width`` values per element (and, when ``f`` is given, a truncation of the compared value).
    With ``shifts`` (K public thresholds): K n comparisons of ``x - t_i`` against one opening of
    ``x + r0`` (``n`` a multiple of 8)."""
    r0, r, n = _masks(side, label, n, shifts)
    nb = packed_len(n)
    out: dict[str, Any] = {"r": r0, "r63": side.share_bits(f"{label}/r63", lambda: bitslice(r)[63], (nb,)),
                           "tables": side.share_bits(f"{label}/tables", lambda: borrow_tables(r), (16, GROUPS, nb))}
    out["levels"] = [monomials(side, f"{label}/lvl{i}", nv, monos, (nc, nb)) for i, (nv, nc, monos) in enumerate(TREE)]
    t = side.rand_bits(f"{label}/t", (nb,))
    ta = side.share(f"{label}/tA", lambda: unslice_row(t, n), (n,))
    u = side.rand(f"{label}/u", (width, n))
    out.update(t=t, tA=ta, u=u, w=side.share(f"{label}/w", lambda: u * ta, (width, n)))
    if f is not None:
        out["tt"] = side.share(f"{label}/tt", lambda: (r & M63) >> np.uint64(f), (n,))
        out["tu"] = side.share(f"{label}/tu", lambda: r >> np.uint64(63), (n,))
    return out


def beaver(side: Any, label: str, a_shape: Shape, b_shape: Shape, c_shape: Shape,
           op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """Beaver triple for a bilinear ``op`` (element-wise or matrix product)."""
    a = side.rand(f"{label}/a", a_shape)
    b = side.rand(f"{label}/b", b_shape)
    return {"a": a, "b": b, "c": side.share(f"{label}/c", lambda: op(a, b), c_shape)}


# 3-round comparison: the last level is evaluated arithmetically. Variables G0 G1 G2 G3 P1 P2 P3 of the
# last 4 groups; borrow = G3 + P3G2 + P3P2G1 + P3P2P1G0 (exclusive terms, so XOR = integer sum).
ARITH_MONOS: tuple[tuple[int, ...], ...] = ((3,), (6, 2), (6, 5, 1), (6, 5, 4, 0))


def all_subsets(monos: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    """Every non-empty subset of some monomial's variables."""
    out: set[tuple[int, ...]] = set()
    for t in monos:
        for bits in range(1, 1 << len(t)):
            out.add(tuple(sorted(t[i] for i in range(len(t)) if bits >> i & 1)))
    return sorted(out)


def compare3(side: Any, label: str, n: int, width: int = 1, f: int | None = None, shifts: Any = None) -> dict[str, Any]:
    """Material for the 3-round comparison (:mod:`veil.mpc.kernels.select3`): as :func:`compare` for the
    opening and the first tree level, then for the last level the masks ``a_i`` of its 7 variables and
    arithmetic shares of ``a_U``, ``a_U r63``, ``u a_U``, ``u a_U r63`` for every subset ``U`` a
    monomial needs (22 subsets), and of ``r63``, ``u r63``: about 90 words per element (width 1).
    Heavier offline, one round less online: used for small layers."""
    r0, r, n = _masks(side, label, n, shifts)
    nb = packed_len(n)
    out: dict[str, Any] = {"r": r0, "tables": side.share_bits(f"{label}/tables", lambda: borrow_tables(r), (16, GROUPS, nb))}
    nv, nc, monos = TREE[0]
    out["level1"] = monomials(side, f"{label}/lvl0", nv, monos, (nc, nb))
    a2 = [side.rand_bits(f"{label}/lvl1/a{v}", (1, nb)) for v in range(7)]
    out["a2"] = a2
    subs = all_subsets(ARITH_MONOS)
    u = side.rand(f"{label}/u", (width, n))
    out["u"] = u

    def r63() -> np.ndarray:
        return r >> np.uint64(63)

    def a_u() -> np.ndarray:  # (S, n) products of the (full) mask bits, dealer only
        bits = [unslice_row(a[0], n) for a in a2]
        rows = []
        for sub in subs:
            v = bits[sub[0]].copy()
            for i in sub[1:]:
                v *= bits[i]
            rows.append(v)
        return np.stack(rows)

    s = len(subs)
    out["r63"] = side.share(f"{label}/r63a", r63, (n,))
    out["ur63"] = side.share(f"{label}/ur63", lambda: u * r63(), (width, n))
    out["fA"] = side.share(f"{label}/fA", a_u, (s, n))
    out["fAR"] = side.share(f"{label}/fAR", lambda: a_u() * r63(), (s, n))
    out["fUA"] = side.share(f"{label}/fUA", lambda: a_u()[:, None, :] * u[None], (s, width, n))
    out["fUAR"] = side.share(f"{label}/fUAR", lambda: a_u()[:, None, :] * (u * r63())[None], (s, width, n))
    if f is not None:
        out["tt"] = side.share(f"{label}/tt", lambda: (r & M63) >> np.uint64(f), (n,))
        out["tu"] = side.share(f"{label}/tu", lambda: r >> np.uint64(63), (n,))
    return out
