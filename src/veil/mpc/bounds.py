"""Static range analysis: the largest input magnitude for which no secret value can overflow.

The owner propagates affine bounds ``|t| <= g * X + h`` (``X = max |input|``) through the graph with
its real weights: ``linear``/``conv2d`` multiply by the layer's infinity norm (largest absolute row
sum) and add the largest bias; ``relu``, pooling and reshapes do not increase bounds; ``add`` sums
them. Every tensor must stay below ``2^(61 - 2f)`` (one bit of headroom under the ``2^62`` limit of
:mod:`veil.mpc.fixedpoint` for the differences taken by comparisons), giving ``input_limit``. The owner
publishes only this one number (a bound on the network's gain); the user checks its input against
it before sending anything. Tensors produced by ``mul`` of two activations are not covered (their
bound is not affine) and are reported in ``uncovered``.
"""

from __future__ import annotations

import numpy as np

from veil.graph.ir import Graph
from veil.mpc.fixedpoint import FixedPoint

__all__ = ["input_limit"]


def _inf_norm(w: np.ndarray) -> float:
    return float(np.abs(w.reshape(w.shape[0], -1)).sum(axis=1).max()) if w.size else 0.0


def input_limit(graph: Graph, fp: FixedPoint) -> tuple[float, list[str]]:
    """(largest safe ``max |input|``, tensors whose bound is not covered)."""
    gh: dict[str, tuple[float, float]] = {s.name: (1.0, 0.0) for s in graph.inputs}
    uncovered: list[str] = []
    for n in graph.nodes:
        ins = [gh.get(i, (np.inf, np.inf)) for i in n.inputs]
        g, h = ins[0]
        if n.op in ("linear", "conv2d"):
            k = _inf_norm(np.asarray(n.params["W"], np.float64))
            b = float(np.abs(n.params["b"]).max()) if "b" in n.params and n.params["b"].size else 0.0
            g, h = k * g, k * h + b
        elif n.op in ("add", "sub"):
            g, h = ins[0][0] + ins[1][0], ins[0][1] + ins[1][1]
        elif n.op == "add_const":
            h = h + float(np.abs(n.params["c"]).max())
        elif n.op == "mul_const":
            c = float(np.abs(n.params["c"]).max())
            g, h = g * c, h * c
        elif n.op in ("mul", "matmul"):
            g, h = 0.0, 0.0
            uncovered.append(n.output)
        elif n.op in ("softmax", "argmax"):
            g, h = 0.0, 1.0
        gh[n.output] = (g, h)
    lim = fp.max_abs() / 2
    best = np.inf
    for g, h in gh.values():
        if g > 0:
            best = min(best, (lim - h) / g)
        elif h >= lim:
            best = 0.0
    return float(max(best, 0.0)), uncovered
