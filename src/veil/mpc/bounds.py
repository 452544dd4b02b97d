"""Static range analysis: the largest input magnitude for which no secret value can overflow.

The owner propagates sound bounds ``|t| <= B_t(X)`` (``X = max |input|`` over the float inputs the user
sends) through the graph with its real weights: ``linear``/``conv2d`` multiply by the layer's infinity
norm (largest absolute row sum) and add the largest bias; ``mul`` of two activations multiplies their
bounds, ``matmul`` too, times the inner dimension; ``relu``, pooling and shape ops do not increase
bounds; ``add`` sums them; ``softmax``, ``sigmoid``, ``tanh``, ``erf`` are at most 1; LayerNorm and
RMSNorm at most ``sqrt(n) max|gamma| + max|beta|``; an embedding at most its table's largest entry.
Alongside the element bound each tensor carries a bound of the L2 norm of its vectors along the last
axis (``|W h|_j <= |W_j|_2 |h|_2``, ``|W h|_2 <= |W|_2 |h|_2``): after a normalisation layer it is
``sqrt(n)`` times smaller than the element bound suggests, which keeps transformer bounds useful; a
product of softmax rows with V is bounded by V's bound (a convex combination).
Every bound is non-decreasing in X, so the largest admissible X is found by bisection.

Constraints (f fractional bits, every secret value below 2^62 at its scale):
* every tensor below ``2^(61 - 2f)`` (a product with an f-scale weight or activation, with one bit of
  headroom for the differences taken by comparisons);
* inputs of ``gelu``/``gelu_tanh``/``silu`` below ``2^(61 - f - coef_scale(f))`` (their outer segment
  ``x`` is carried at the coefficient scale);
* inputs of ``layernorm`` below ``2^(61 - 3f)`` with row L2 norms ``R^2 < 2^(61 - 2f + 4)`` (the centred
  row at scale 3f, the sum of squares at ``2f - 4``); of ``rmsnorm`` with ``R^2 < 2^(61 - 2f)``;
* inputs of ``reciprocal`` below 2^24, ``rsqrt`` 2^30, ``sqrt`` 2^26 (the top of their normalisation ranges).

Lower ends (:func:`lower_bounds`, :func:`kernel_low_bits`): ``reciprocal`` and ``rsqrt`` are only right on
inputs inside their normalisation range ``[2^lo, 2^hi)``. From the public graph alone (every party gets
the same answer) a lower bound is proven for tensors built by exact non-negative operations: squares
``mul(a, a)``, ``relu``, products and sums of non-negative tensors, ``add_const`` of a positive constant
(an eps), ``mul_const`` by non-negative constants, sums, means, pooling and shape ops. The kernel's range
then starts at ``2^floor(log2 L)``, but never below the kernel's lowest start: 2^-12 for ``reciprocal``,
2^-16 for ``rsqrt``/``sqrt`` (nor below ``2^-f``, the smallest positive fixed-point value). A ``reciprocal``
or ``rsqrt`` whose input is not proven at least that (e.g. a plain sum of squares: it can be 0, where 1/x
has no finite value), or a ``sqrt`` whose input is not proven non-negative (sqrt(0) = 0 is right), is
refused when the program is compiled, which the owner does before sending anything.

The owner publishes only ``input_limit`` (a bound on the network's gain); the user checks its input
against it before sending anything. Integer inputs (token ids) do not take part: the user checks them
against the vocabulary instead. Decoder state fed back between steps (``graph.meta["state"]``) takes
the bound of the output it comes from (iterated to a fixed point, else X).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from veil.graph.ir import Graph, Node
from veil.mpc.compilers.public import public_inputs
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels.nonlinear import NORM_SQUARE_DROP, coef_scale

__all__ = ["input_limit", "tensor_bounds", "lower_bounds", "kernel_low_bits", "FLOORED_OPS"]


def _inf_norm(w: np.ndarray) -> float:
    return float(np.abs(w.reshape(w.shape[0], -1)).sum(axis=1).max()) if w.size else 0.0


def _amax(v: np.ndarray | None) -> float:
    return float(np.abs(np.asarray(v, np.float64)).max()) if v is not None and np.size(v) else 0.0


_NORMS: dict[int, tuple[np.ndarray, tuple[float, float, float]]] = {}


def _norms_of(w: np.ndarray) -> tuple[float, float, float]:
    """(infinity norm, largest row L2 norm, spectral norm) of a weight as a matrix (out, in)."""
    hit = _NORMS.get(id(w))
    if hit is None or hit[0] is not w:
        m = np.asarray(w, np.float64).reshape(w.shape[0], -1)
        spec = float(np.linalg.norm(m, 2)) if m.size else 0.0
        vals = (_inf_norm(m), float(np.sqrt((m * m).sum(axis=1)).max()) if m.size else 0.0, spec)
        if len(_NORMS) > 4096:
            _NORMS.clear()
        hit = (w, vals)
        _NORMS[id(w)] = hit
    return hit[1]


def _l2(v: np.ndarray | None) -> float:
    return float(np.sqrt((np.asarray(v, np.float64) ** 2).sum())) if v is not None and np.size(v) else 0.0


Bound = tuple[float, float]  # (max |element|, max L2 norm of a vector along the last axis)


def _node_bound(n: Node, ins: list[Bound], shapes: dict[str, tuple[int, ...]], softmax_last: set[str]) -> Bound:
    """Sound bounds of a node's output from its inputs' bounds."""
    x, r = ins[0] if ins else (0.0, 0.0)
    op = n.op
    last = shapes[n.output][-1] if shapes.get(n.output) else 1
    root = float(np.sqrt(last))
    if op == "linear":
        inf, row, spec = _norms_of(n.params["W"])
        b = n.params.get("b")
        e = min(inf * x, row * r) + _amax(b)
        return e, min(e * root, spec * r + _l2(b))
    if op == "conv2d":
        return _norms_of(n.params["W"])[0] * x + _amax(n.params.get("b")), np.inf
    if op in ("add", "sub"):
        return ins[0][0] + ins[1][0], ins[0][1] + ins[1][1]
    if op == "add_const":
        c = np.asarray(n.params["c"], np.float64)
        return x + _amax(c), r + (_l2(c) if c.ndim and c.shape[-1] == last and c.size == last else _amax(c) * root)
    if op == "mul_const":
        return x * _amax(n.params["c"]), r * _amax(n.params["c"])
    if op == "mul":
        e = ins[0][0] * ins[1][0]
        return e, min(ins[0][0] * ins[1][1], ins[1][0] * ins[0][1], e * root)
    if op == "matmul":
        k = shapes[n.inputs[0]][-1]
        if n.inputs[0] in softmax_last:  # rows of probabilities: a convex combination of b's rows
            e = ins[1][0]
        else:
            e = min(k * ins[0][0] * ins[1][0], ins[0][1] * ins[1][0] * np.sqrt(k))
        return e, e * root
    if op in ("softmax", "sigmoid", "tanh", "erf"):
        return 1.0, (1.0 if op == "softmax" and n.output in softmax_last else root)
    if op == "argmax":
        e = float(max(shapes[n.inputs[0]]))
        return e, e * root
    if op in ("layernorm", "rmsnorm"):
        k = shapes[n.inputs[0]][-1]
        g, beta = n.params["gamma"], n.params.get("beta")
        return float(np.sqrt(k)) * _amax(g) + _amax(beta), float(np.sqrt(k)) * _amax(g) + _l2(beta)
    if op == "embedding":
        t = np.asarray(n.params["table"], np.float64)
        return _amax(t), float(np.sqrt((t * t).sum(axis=-1)).max()) if t.size else 0.0
    if op == "reduce_sum":
        e = x * int(np.prod([shapes[n.inputs[0]][a] for a in n.attrs["axes"]]))
        return e, e * root
    if op in ("reciprocal", "rsqrt"):
        return 2.0**8, 2.0**8 * root
    if op == "sqrt":
        return float(np.sqrt(x)), float(np.sqrt(x)) * root
    if op in ("relu", "gelu", "gelu_tanh", "silu"):  # |g(x)| <= |x| element-wise
        return x, r
    e = max(i[0] for i in ins) if ins else 0.0  # pooling, shape ops, reduce_mean, concat
    if op in ("unsqueeze", "squeeze", "gather") or (op == "slice" and last == shapes[n.inputs[0]][-1]):
        return e, min(r, e * root) if shapes[n.inputs[0]][-1] == last else e * root
    return e, e * root


FLOORED_OPS = ("reciprocal", "rsqrt", "sqrt")
FLOOR_TOPS = {"reciprocal": 24, "rsqrt": 30, "sqrt": 26}  # log2 of the top of each kernel's range (hi)
# log2 of the lowest start of each kernel's range that keeps its stated error (tests/test_mpc_kernel_ranges.py:
# the reciprocal's normaliser overflows from lo = -15 on; rsqrt/sqrt hold 5e-3 relative down to 2^-16)
FLOOR_BOTTOMS = {"reciprocal": -12, "rsqrt": -16, "sqrt": -16}

_SAME_BOUND = frozenset({"reshape", "transpose", "flatten", "unsqueeze", "squeeze", "slice", "gather", "maxpool", "avgpool",
                         "global_avgpool", "reduce_mean"})


def lower_bounds(graph: Graph) -> dict[str, float]:
    """``{tensor: L}`` with every element of the tensor proven ``>= L >= 0``, from the graph's public
    structure and constants only (no secret weight is read); tensors without a proof are absent."""
    lo: dict[str, float] = {}
    for n in graph.nodes:
        ins = [lo.get(i) for i in n.inputs]
        known = bool(ins) and all(v is not None for v in ins)
        vals = [float(v) for v in ins if v is not None]
        c = np.asarray(n.params.get("c", 0.0), np.float64)
        out: float | None = None
        if n.op == "mul" and len(n.inputs) == 2 and n.inputs[0] == n.inputs[1]:
            out = vals[0] ** 2 if known else 0.0
        elif n.op == "relu":
            out = vals[0] if known else 0.0
        elif not known:
            out = None
        elif n.op == "mul":
            out = vals[0] * vals[1]
        elif n.op in ("add", "concat"):
            out = sum(vals) if n.op == "add" else min(vals)
        elif n.op == "add_const":
            out = vals[0] + float(c.min()) if c.size else vals[0]
        elif n.op == "mul_const":
            out = vals[0] * float(c.min()) if c.size else vals[0]
        elif n.op in _SAME_BOUND or n.op == "reduce_sum":  # a sum of non-negative terms is at least any one
            out = vals[0]
        elif n.op in ("sqrt", "rsqrt", "reciprocal"):
            out = 0.0
        if out is not None and out >= 0.0:
            lo[n.output] = out
    return lo


def kernel_low_bits(graph: Graph, node: Node, f: int, lower: dict[str, float] | None = None) -> int:
    """``lo`` of the ``reciprocal``/``rsqrt``/``sqrt`` kernel range ``[2^lo, 2^hi)`` for ``node``: from the
    proven lower bound of its input, at least ``-f``. Raises :class:`~veil.errors.UnsupportedOpError`
    (naming the node, the op and the bound) when the input is not proven inside the range. ``lower``:
    :func:`lower_bounds` of ``graph`` if the caller has it (the compiler computes it once per graph)."""
    from veil.mpc.compilers.base import refuse

    low = (lower_bounds(graph) if lower is None else lower).get(node.inputs[0])
    bits = max(FLOOR_BOTTOMS[node.op], -f)
    floor = 2.0**bits
    if node.op == "sqrt":
        if low is None:
            raise refuse(node, "sqrt needs an input proven non-negative (the kernel is wrong on negative values); "
                               "none is proven here: apply it to a square, a sum of squares or a relu")
        return min(max(int(np.floor(np.log2(low))) if low > 0 else bits, bits), FLOOR_TOPS[node.op] - 1)
    if low is None or low < floor:
        proven = "no lower bound is proven" if low is None else f"it is only proven >= {low:.3g}"
        raise refuse(node, f"{node.op} is right only on inputs >= 2^{bits} = {floor:.3g} (the bottom of its range at "
                           f"f={f}), and {proven}; below that it would be wrong, silently. Add a positive constant of at "
                           f"least {floor:.3g} (an eps) to its input, e.g. x / sqrt(sum(x^2) + eps)")
    return min(max(int(np.floor(np.log2(low))), bits), FLOOR_TOPS[node.op] - 1)


def _input_caps(n: Node, fp: FixedPoint, shapes: dict[str, tuple[int, ...]]) -> list[float]:
    """Extra limits on the node's first input (see the module docstring)."""
    f = fp.frac_bits
    if n.op in ("gelu", "gelu_tanh", "silu"):
        return [2.0 ** (61 - f - coef_scale(f))]
    if n.op in ("layernorm", "rmsnorm"):
        return [2.0 ** (61 - 3 * f)]
    return [2.0 ** FLOOR_TOPS[n.op]] if n.op in FLOOR_TOPS else []


def tensor_bounds(graph: Graph, x: float, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """``B_t(x)`` (max |element|) for every tensor."""
    return {k: v[0] for k, v in _bounds(graph, x, shapes).items()}


def _bounds(graph: Graph, x: float, shapes: dict[str, tuple[int, ...]]) -> dict[str, Bound]:
    state = dict(graph.meta.get("state", {}) or {})
    fed: dict[str, Bound] = {i: (0.0, 0.0) for i in state}
    smax = {n.output for n in graph.nodes if n.op == "softmax" and n.attrs["axis"] in (-1, len(shapes[n.output]) - 1)}
    public = public_inputs(graph)

    def one_pass() -> dict[str, Bound]:
        b: dict[str, Bound] = {}
        for s in graph.inputs:
            root = float(np.sqrt(s.shape[-1])) if s.shape and s.shape[-1] else 1.0
            if s.name in fed:
                b[s.name] = fed[s.name]
            elif s.name in public:  # sent in the clear, within the bound the model declares (the user checks)
                v = public[s.name]
                b[s.name] = (v, v * root)
            else:
                v = 0.0 if s.dtype.startswith("int") else x
                b[s.name] = (v, v * root)
        for n in graph.nodes:
            b[n.output] = _node_bound(n, [b.get(i, (np.inf, np.inf)) for i in n.inputs], shapes, smax)
        return b

    b = one_pass()
    for _ in range(3 if state else 0):
        new = {i: b.get(o, (x, np.inf)) for i, o in state.items()}
        if all(new[i][0] <= fed[i][0] and new[i][1] <= fed[i][1] for i in new):
            break
        fed.update({i: (max(fed[i][0], new[i][0]), max(fed[i][1], new[i][1])) for i in new})
        b = one_pass()
    return b


def _violation(graph: Graph, fp: FixedPoint, shapes: dict[str, tuple[int, ...]]) -> Callable[[float], bool]:
    lim = fp.max_abs() / 2

    def bad(x: float) -> bool:
        bb = _bounds(graph, x, shapes)
        if any(v[0] >= lim for v in bb.values()):
            return True
        for n in graph.nodes:
            caps = _input_caps(n, fp, shapes)
            if caps and bb[n.inputs[0]][0] >= min(caps):
                return True
            if n.op in ("layernorm", "rmsnorm"):  # the row's sum of squares (centring only shrinks it)
                drop = NORM_SQUARE_DROP if n.op == "layernorm" else 0
                if bb[n.inputs[0]][1] ** 2 >= 2.0 ** (61 - 2 * (fp.frac_bits - drop)):
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
