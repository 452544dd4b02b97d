"""Max pooling and arg-max by tournaments of exact comparisons.

``maxpool_a``: the windows of each output (``kh*kw`` values) are reduced pairwise,
``max(a, b) = b + (a - b) * [a - b >= 0]`` with :func:`~veil.mpc.kernels.compare.select_a`; all pairs
of all windows of a level go in one call, so a k-element window costs ``ceil(log2 k)`` calls of
4 rounds each (2x2 pooling: 8 rounds). Padding is a public very negative value (-2^61 in the ring).

``argmax_a``: the same tournament along the last axis carrying the index: one comparison per pair
selects both the value and the index (``width = 2`` in the bit-times-value step), so the cost is
that of a max. Ties pick the lower index, like ``numpy.argmax``. The output is an arithmetic
share of the integer index (not fixed point).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.mpc.kernels.base import Cost, Ctx
from veil.mpc.kernels.compare import select_a, select_a_cost
from veil.plain import kernels as PK

__all__ = ["maxpool_a", "maxpool_a_cost", "argmax_a", "argmax_a_cost", "tournament_sizes"]

_NEG = np.uint64((1 << 64) - (1 << 61))  # -2^61


def tournament_sizes(k: int) -> list[int]:
    """Number of pairs compared at each level of a k-way tournament."""
    out = []
    while k > 1:
        out.append(k // 2)
        k = k - k // 2
    return out


def _reduce(ctx: Ctx, v: np.ndarray, idx: np.ndarray | None, mats: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray | None]:
    """Tournament over the last axis of v (..., k)."""
    for mat in mats:
        k = v.shape[-1]
        h = k // 2
        a, b = v[..., 0 : 2 * h : 2], v[..., 1 : 2 * h : 2]
        diff = (a - b).reshape(-1)
        ys = [diff]
        if idx is not None:
            ia, ib = idx[..., 0 : 2 * h : 2], idx[..., 1 : 2 * h : 2]
            ys.append((ia - ib).reshape(-1))
        sel = select_a(ctx, diff, np.stack(ys), mat)
        win = b + sel[0].reshape(a.shape)
        v = np.concatenate([win, v[..., 2 * h :]], axis=-1)
        if idx is not None:
            iw = ib + sel[1].reshape(a.shape)
            idx = np.concatenate([iw, idx[..., 2 * h :]], axis=-1)
    return v[..., 0], (None if idx is None else idx[..., 0])


def maxpool_a(ctx: Ctx, x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
              mats: Sequence[dict[str, Any]]) -> np.ndarray:
    pad = _NEG if ctx.party == 0 else np.uint64(0)
    win = PK.pool_windows(x, kernel, strides, pads, pad)  # (N, C, OH, OW, k)
    out, _ = _reduce(ctx, np.ascontiguousarray(win), None, mats)
    return out


def maxpool_a_cost(n_out: int, k: int, cost_fn: Any = select_a_cost) -> Cost:
    cost = Cost()
    for pairs in tournament_sizes(k):
        cost = cost + cost_fn(n_out * pairs)
    return cost


def argmax_a(ctx: Ctx, x: np.ndarray, axis: int, mats: Sequence[dict[str, Any]]) -> np.ndarray:
    """Shares of the index of the maximum along ``axis``."""
    v = np.moveaxis(x, axis, -1)
    k = v.shape[-1]
    pub = np.broadcast_to(np.arange(k, dtype=np.uint64), v.shape)
    idx = pub.copy() if ctx.party == 0 else np.zeros(v.shape, np.uint64)
    _, i = _reduce(ctx, np.ascontiguousarray(v), idx, mats)
    assert i is not None
    return i


def argmax_a_cost(n_out: int, k: int, cost_fn: Any = select_a_cost) -> Cost:
    cost = Cost()
    for pairs in tournament_sizes(k):
        cost = cost + cost_fn(n_out * pairs, width=2)
    return cost
