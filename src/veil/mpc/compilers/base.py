"""What every per-op compiler shares: the instruction type, the server state and the :class:`Builder`.

A compiler is a function ``compile_x(b: Builder, node: Node, src: list[str]) -> None`` registered for
one or more ops in :data:`veil.mpc.compilers.COMPILERS`. It reads the static shapes and scales of its
inputs from the builder, appends :class:`Instr` objects (what each server runs, the dealer material it
consumes, its declared cost) and sets the scale of its output. ``src`` are the node's inputs after
aliasing (an op the user applies after reconstruction aliases its output to its input).

Instructions and material makers are plain functions bound with :func:`functools.partial`, never
closures over loop variables, so a compiler reads top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from veil.errors import UnsupportedOpError
from veil.graph.ir import Graph, Node
from veil.mpc import dealer as D
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import arith, compare, products, select3
from veil.mpc.kernels.base import Cost, Ctx

__all__ = ["Instr", "ServerState", "Builder", "Maker", "Compiler", "fixed_spec", "refuse", "FIXED_OPS", "fixed_matrix"]

Maker = Callable[[Any, str, dict[str, Any]], Any]
RunFn = Callable[["ServerState", dict[str, np.ndarray], Any], None]


@dataclass
class ServerState:
    """One server's long-lived state: context, fixed weights (per linear/conv node), bias shares
    (per node, at scale 2f) and named secret state kept between queries (multi-step sessions)."""

    ctx: Ctx
    fixed: dict[str, products.FixedWeight]
    bias: dict[str, np.ndarray]
    params: dict[str, np.ndarray] = field(default_factory=dict)  # other secret params ("node/gamma")
    state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Instr:
    name: str
    run: RunFn
    materials: list[tuple[str, Maker]] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)
    prepare: str | tuple[str, ...] | None = None  # node name(s) of fixed products to precompute offline
    inputs: tuple[str, ...] = ()  # tensors read (recorded for fixed products)


def fixed_spec(node: Node) -> tuple[Any, ...] | None:
    """The conv descriptor (strides, pads, kernel, out_channels[, group]) of a conv2d node; None for a
    linear (or embedding) node."""
    if node.op != "conv2d":
        return None
    w = node.params["W"]
    spec = (tuple(node.attrs["strides"]), tuple(node.attrs["pads"]), tuple(w.shape[2:]), int(w.shape[0]))
    g = int(node.attrs.get("group", 1))
    return spec if g == 1 else (*spec, g)


Compiler = Callable[["Builder", Node, list[str]], None]

FIXED_OPS = ("linear", "conv2d", "embedding")


def fixed_matrix(node: Node, params: dict[str, np.ndarray]) -> np.ndarray:
    """The fixed weight of a linear/conv/embedding node in the (out, in, ...) layout of
    :class:`~veil.mpc.kernels.products.FixedWeight` (an embedding table transposed), from ``params``
    (real values, encodings or shares alike)."""
    if node.op != "embedding":
        return params["W"]
    return np.ascontiguousarray(params["table"].T)


def _run_local(out: str, fn: Callable[..., np.ndarray], ins: tuple[str, ...], st: ServerState,
               env: dict[str, np.ndarray], store: Any) -> None:
    env[out] = fn(st, *[env[i] for i in ins])


def _run_trunc(t: str, new: str, key: str, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    env[new] = arith.trunc_a(st.ctx, env[t], store.take(key))


def _run_upscale(t: str, new: str, up: int, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    env[new] = arith.upscale_a(env[t], up)


def _mk_trunc(n: int, f: int, side: Any, lab: str, fx: dict[str, Any]) -> Any:
    return D.trunc(side, lab, n, f)


def _run_trunc_many(ts: list[str], news: list[str], key: str, st: ServerState, env: dict[str, np.ndarray],
                    store: Any) -> None:
    flat = np.concatenate([env[t].reshape(-1) for t in ts])
    out = arith.trunc_a(st.ctx, flat, store.take(key))
    i = 0
    for t, new in zip(ts, news, strict=True):
        n = env[t].size
        env[new] = out[i : i + n].reshape(env[t].shape)
        i += n


# ops whose compilers read their (first) input at scale f, and shape ops that pass scale through
NEEDS_F = frozenset({"mul_const", "mul", "matmul", "avgpool", "global_avgpool", "linear", "conv2d", "concat", "layernorm",
                     "rmsnorm", "gelu", "gelu_tanh", "sigmoid", "tanh", "silu", "erf", "reciprocal", "rsqrt", "sqrt",
                     "embedding", "reduce_mean"})
PASS_SCALE = frozenset({"reshape", "transpose", "flatten", "unsqueeze", "squeeze", "slice", "gather"})


class Builder:
    """The compilation state of one graph at one batch size."""

    def __init__(self, graph: Graph, batch: int, fp: FixedPoint, shapes: dict[str, tuple[int, ...]],
                 low_latency: int):
        self.graph, self.batch, self.fp = graph, batch, fp
        self.f = fp.frac_bits
        self.shapes = shapes
        self.low_latency = low_latency
        self.scale: dict[str, int] = {s.name: self.f for s in graph.inputs}
        self.instrs: list[Instr] = []
        self.truncated: dict[str, str] = {}
        self.post: dict[str, tuple[str, Any]] = {}
        self.alias: dict[str, str] = {}
        self.direct: dict[str, Any] | None = None
        self.done: set[str] = set()  # nodes compiled ahead of their turn (with a sibling)
        self._lower: dict[str, float] | None = None  # veil.mpc.bounds.lower_bounds(graph), on first use

    def lower_bounds(self) -> dict[str, float]:
        """The graph's proven lower bounds (:func:`veil.mpc.bounds.lower_bounds`), computed once."""
        if self._lower is None:
            from veil.mpc.bounds import lower_bounds

            self._lower = lower_bounds(self.graph)
        return self._lower

    # --- sizes and comparison protocol choice -------------------------------------------------
    def n_of(self, t: str) -> int:
        return int(np.prod(self.shapes[t], dtype=np.int64))

    def cmp_material(self, n: int) -> Callable[..., Any]:
        """Dealer material of a comparison layer of ``n`` elements (3-round variant when small)."""
        return D.compare3 if n <= self.low_latency else D.compare

    def cmp_cost(self, n: int) -> Callable[..., Cost]:
        return select3.select3_a_cost if n <= self.low_latency else compare.select_a_cost

    # --- emitting ----------------------------------------------------------------------------
    def emit(self, name: str, run: RunFn, materials: Sequence[tuple[str, Maker]] | None = None,
             cost: Cost | None = None, prepare: str | tuple[str, ...] | None = None,
             inputs: tuple[str, ...] = ()) -> None:
        self.instrs.append(Instr(name, run, list(materials or []), cost or Cost(), prepare, inputs))

    def local(self, node: Node, fn: Callable[..., np.ndarray], out_scale: int, *ins: str) -> None:
        """A local instruction ``env[out] = fn(state, *inputs)`` (no communication)."""
        self.emit(node.name, partial(_run_local, node.output, fn, tuple(ins)))
        self.scale[node.output] = out_scale

    def needs_f(self, t: str) -> bool:
        """Every use of ``t`` (through shape ops) reads it at scale f (so truncating it early loses nothing)."""
        if t in self.graph.outputs:
            return False
        cons = self.graph.consumers(t)
        if not cons:
            return False
        for c in cons:
            if c.op in PASS_SCALE:
                if not self.needs_f(c.output):
                    return False
            elif c.op == "softmax":
                if c.output in self.graph.outputs and "mask" not in c.params:
                    return False
            elif c.op not in NEEDS_F:
                return False
        return True

    def trunc_together(self, ts: list[str], node: str) -> None:
        """Truncate several 2f tensors to f in one round; later readers see the truncated tensors."""
        f = self.f
        ts = [t for t in ts if self.scale[t] == 2 * f and t not in self.truncated]
        if len(ts) < 2:
            return
        news = [f"{t}@f" for t in ts]
        n = sum(self.n_of(t) for t in ts)
        key = f"{node}/trunc*"
        self.emit(key, partial(_run_trunc_many, ts, news, key), [(key, partial(_mk_trunc, n, f))], arith.trunc_a_cost(n))
        for t, new in zip(ts, news, strict=True):
            self.shapes[new], self.scale[new], self.truncated[t] = self.shapes[t], f, new
            self.alias[t] = new

    def at_f(self, t: str, node: str) -> str:
        """Tensor name holding ``t`` at scale f (inserting a ``trunc_a`` or a local upscale once)."""
        f = self.f
        if self.scale[t] == f:
            return t
        if t in self.truncated:
            return self.truncated[t]
        new = f"{t}@f"
        if self.scale[t] == 2 * f:
            key = f"{node}/trunc:{t}"
            n = self.n_of(t)
            self.emit(key, partial(_run_trunc, t, new, key), [(key, partial(_mk_trunc, n, f))], arith.trunc_a_cost(n))
        elif self.scale[t] < f:
            self.emit(f"{node}/upscale:{t}", partial(_run_upscale, t, new, f - self.scale[t]))
        else:
            raise AssertionError(f"tensor {t!r} at unexpected scale {self.scale[t]}")
        self.shapes[new], self.scale[new], self.truncated[t] = self.shapes[t], f, new
        return new


def refuse(node: Node, detail: str) -> UnsupportedOpError:
    """The error for a node whose op mpc supports but not with these shapes or attributes."""
    from veil.mpc.compilers import MPC_OPS

    return UnsupportedOpError(node.name, node.op, MPC_OPS, detail, where="mpc mode")
