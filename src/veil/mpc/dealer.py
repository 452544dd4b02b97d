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
compare          ``r``, bits of ``r`` (bit-sliced), 120 AND triples   ~39 bytes per element
                 for the borrow tree, a random bit ``t`` (binary and  (+16 with truncation)
                 arithmetic), ``u``, ``u * t``
beaver           ``a``, ``b``, ``c = op(a, b)``                       8 bytes per element of c
===============  ==================================================  ===========================

The dealer never sees inputs, weights or activations: only shapes and its own randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from veil.mpc.sharing import bitslice, unslice_row

__all__ = ["fixed_product", "trunc", "compare", "beaver", "AND_ROWS", "M63", "packed_len"]

M63 = np.uint64((1 << 63) - 1)
# AND gates (rows of packed bits) per level of the 64-row borrow tree: 2k-1 for k pairs.
AND_ROWS: tuple[int, ...] = (63, 31, 15, 7, 3, 1)

Shape = tuple[int, ...]


def packed_len(n: int) -> int:
    return (n + 7) // 8


def fixed_product(side: Any, label: str, a_shape: Shape, out_shape: Shape,
                  op: Callable[[np.ndarray, np.ndarray], np.ndarray], mask: Any) -> dict[str, np.ndarray]:
    """Mask ``A`` of a layer input and ``C = op(A, B)`` with the layer's fixed weight mask ``B``."""
    a = side.rand(f"{label}/A", a_shape)
    c = side.share(f"{label}/C", lambda: op(a, mask), out_shape)
    return {"A": a, "C": c}


def trunc(side: Any, label: str, n: int, f: int) -> dict[str, np.ndarray]:
    """Truncation pair: ``r`` uniform, shares of ``(r mod 2^63) >> f`` and of the bit ``r >> 63``."""
    r = side.rand(f"{label}/r", (n,))
    t = side.share(f"{label}/t", lambda: (r & M63) >> np.uint64(f), (n,))
    u = side.share(f"{label}/u", lambda: r >> np.uint64(63), (n,))
    return {"r": r, "t": t, "u": u}


def compare(side: Any, label: str, n: int, width: int = 1, f: int | None = None) -> dict[str, Any]:
    """Material for one vectorised comparison of ``n`` elements followed by a bit-times-value product
    of ``width`` values per element (and, when ``f`` is given, a truncation of the compared value)."""
    nb = packed_len(n)
    r = side.rand(f"{label}/r", (n,))
    out: dict[str, Any] = {"r": r, "rb": side.share_bits(f"{label}/rb", lambda: bitslice(r), (64, nb))}
    ands = []
    for lvl, rows in enumerate(AND_ROWS):
        a = side.rand_bits(f"{label}/and{lvl}/a", (rows, nb))
        b = side.rand_bits(f"{label}/and{lvl}/b", (rows, nb))
        c = side.share_bits(f"{label}/and{lvl}/c", lambda a=a, b=b: a & b, (rows, nb))
        ands.append((a, b, c))
    out["ands"] = ands
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
