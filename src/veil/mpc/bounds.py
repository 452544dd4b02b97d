"""Static range analysis: the largest input magnitude for which no secret value can overflow.

The owner propagates sound bounds ``|t| <= B_t(X)`` (``X = max |input|`` over the float inputs the user
sends) through the graph with its real weights: ``linear``/``conv2d`` multiply by the layer's infinity
norm (largest absolute row sum) and add the largest bias; ``mul`` of two activations multiplies their
bounds, ``matmul`` too, times the inner dimension; ``relu``, pooling and shape ops do not increase
bounds; ``add`` sums them; ``softmax``, ``sigmoid``, ``tanh``, ``erf`` are at most 1; LayerNorm and
RMSNorm at most ``sqrt(n) max|gamma| + max|beta|``; an embedding at most its table's largest entry.
Every bound is non-decreasing in X, so the largest admissible X is found by bisection.

Constraints (f fractional bits, every secret value below 2^62 at its scale):
* every tensor below ``2^(61 - 2f)`` (a product with an f-scale weight or activation, with one bit of
  headroom for the differences taken by comparisons);
* inputs of ``gelu``/``gelu_tanh``/``silu`` below ``2^(61 - f - coef_scale(f))`` (their outer segment
  ``x`` is carried at the coefficient scale);
* inputs of ``layernorm``/``rmsnorm`` below ``2^(61 - 3f)`` with ``n (2B)^2 < 2^(61 - 2f)`` (the centred
  row at scale 3f, the sum of squares at 2f);
* inputs of ``reciprocal`` below 2^24, ``rsqrt`` 2^30, ``sqrt`` 2^26 (their normalisation ranges; their
  lower ends, 2^-8 and 2^-16, are a documented precondition).

The owner publishes only ``input_limit`` (a bound on the network's gain); the user checks its input
against it before sending anything. Integer inputs (token ids) do not take part: the user checks them
against the vocabulary instead. Decoder state fed back between steps (``graph.meta["state"]``) takes
the bound of the output it comes from (iterated to a fixed point, else X).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from veil.graph.ir import Graph, Node
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels.nonlinear import coef_scale

__all__ = ["input_limit", "tensor_bounds"]


def _inf_norm(w: np.ndarray) -> float:
    return float(np.abs(w.reshape(w.shape[0], -1)).sum(axis=1).max()) if w.size else 0.0


def _amax(v: np.ndarray | None) -> float:
    return float(np.abs(np.asarray(v, np.float64)).max()) if v is not None and np.size(v) else 0.0


_NORMS: dict[int, tuple[np.ndarray, float]] = {}


def _norm_of(w: np.ndarray) -> float:
    hit = _NORMS.get(id(w))
    if hit is None or hit[0] is not w:
        hit = (w, _inf_norm(np.asarray(w, np.float64)))
        _NORMS.clear() if len(_NORMS) > 4096 else None
        _NORMS[id(w)] = hit
    return hit[1]


def _node_bound(n: Node, ins: list[float], shapes: dict[str, tuple[int, ...]]) -> float:
    x = ins[0] if ins else 0.0
    op = n.op
    if op in ("linear", "conv2d"):
        return _norm_of(n.params["W"]) * x + _amax(n.params.get("b"))
    if op in ("add", "sub"):
        return ins[0] + ins[1]
    if op == "add_const":
        return x + _amax(n.params["c"])
    if op == "mul_const":
        return x * _amax(n.params["c"])
    if op == "mul":
        return ins[0] * ins[1]
    if op == "matmul":
        return ins[0] * ins[1] * shapes[n.inputs[0]][-1]
    if op in ("softmax", "sigmoid", "tanh", "erf"):
        return 1.0
    if op == "argmax":
        return float(max(shapes[n.inputs[0]]))
    if op == "layernorm":
        return np.sqrt(shapes[n.inputs[0]][-1]) * _amax(n.params["gamma"]) + _amax(n.params["beta"])
    if op == "rmsnorm":
        return np.sqrt(shapes[n.inputs[0]][-1]) * _amax(n.params["gamma"])
    if op == "embedding":
        return _amax(n.params["table"])
    if op == "reduce_sum":
        return x * int(np.prod([shapes[n.inputs[0]][a] for a in n.attrs["axes"]]))
    if op == "reciprocal":
        return 2.0**8
    if op == "rsqrt":
        return 2.0**8
    if op == "sqrt":
        return float(np.sqrt(x))
    return max(ins) if ins else 0.0  # relu, pooling, gelu/silu (|g(x)| <= |x|), shape ops, reduce_mean


def _input_caps(n: Node, fp: FixedPoint, shapes: dict[str, tuple[int, ...]]) -> list[float]:
    """Extra limits on the node's first input (see the module docstring)."""
    f = fp.frac_bits
    if n.op in ("gelu", "gelu_tanh", "silu"):
        return [2.0 ** (61 - f - coef_scale(f))]
    if n.op in ("layernorm", "rmsnorm"):
        k = shapes[n.inputs[0]][-1]
        return [2.0 ** (61 - 3 * f), np.sqrt(2.0 ** (61 - 2 * f) / k) / 2]
    return [{"reciprocal": 2.0**24, "rsqrt": 2.0**30, "sqrt": 2.0**26}[n.op]] if n.op in ("reciprocal", "rsqrt", "sqrt") else []


def tensor_bounds(graph: Graph, x: float, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """``B_t(x)`` for every tensor."""
    state = dict(graph.meta.get("state", {}) or {})
    fed: dict[str, float] = {i: 0.0 for i in state}

    def one_pass() -> dict[str, float]:
        b: dict[str, float] = {}
        for s in graph.inputs:
            if s.name in fed:
                b[s.name] = fed[s.name]
            else:
                b[s.name] = 0.0 if s.dtype.startswith("int") else x
        for n in graph.nodes:
            b[n.output] = _node_bound(n, [b.get(i, np.inf) for i in n.inputs], shapes)
        return b

    b = one_pass()
    for _ in range(3 if state else 0):
        new = {i: b.get(o, x) for i, o in state.items()}
        if all(new[i] <= fed[i] for i in new):
            break
        fed.update(new)
        b = one_pass()
    else:
        if state and any(b.get(o, x) > fed[i] for i, o in state.items()):
            fed.update({i: max(x, b.get(o, x)) for i, o in state.items()})
            b = one_pass()
    return b


def _violation(graph: Graph, fp: FixedPoint, shapes: dict[str, tuple[int, ...]]) -> Callable[[float], bool]:
    lim = fp.max_abs() / 2

    def bad(x: float) -> bool:
        b = tensor_bounds(graph, x, shapes)
        if any(v >= lim for v in b.values()):
            return True
        for n in graph.nodes:
            caps = _input_caps(n, fp, shapes)
            if caps and b[n.inputs[0]] >= min(caps):
                return True
        return False
    return bad


def input_limit(graph: Graph, fp: FixedPoint) -> tuple[float, list[str]]:
    """(largest safe ``max |input|`` over the user's float inputs, tensors not covered: always empty,
    every op has a sound bound)."""
    from veil.plain.executor import trace_shapes

    shapes = trace_shapes(graph, 1)
    bad = _violation(graph, fp, shapes)
    if bad(0.0):
        return 0.0, []
    lo, hi = 0.0, 2.0**62
    if not bad(hi):
        return hi, []
    for _ in range(200):  # bisection on a log scale, then linear
        mid = np.sqrt(lo * hi) if lo > 0 else hi * 2.0**-80
        if mid <= lo or mid >= hi:
            break
        if bad(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return float(lo), []
