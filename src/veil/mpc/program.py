"""Compile a (public) veil graph into the servers' program: instructions, material plan, cost.

Every tensor carries a static *scale* (fractional bits): inputs and activations have ``f``, a
product of two ``f``-scale values has ``2f`` until truncated. Truncation is lazy: it is fused into
the next ReLU (one opening serves the comparison and the truncation), skipped at the outputs (the
user decodes at ``2f``), and only run on its own (``trunc_a``, 1 round) before another product.
Max pooling runs at whatever scale it gets. Scales being static, the dealer can plan the exact
material of a query from the public graph and the batch size alone. When the input reaches the first
linear/conv layer through shape ops only, the user masks that layer's input itself (``direct``).

Each op is compiled by its entry in :data:`veil.mpc.compilers.COMPILERS` (:data:`MPC_OPS` is its key
set); a new op is one compiler function added there. ``softmax`` on a graph output is applied by the
user after reconstruction (public post-processing of the logits it is entitled to).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Graph
from veil.mpc.compilers import COMPILERS, DIRECT_INPUT, MPC_OPS, Builder, Instr, ServerState, fixed_spec
from veil.mpc.compilers.public import compile_public, public_inputs
from veil.mpc.compilers.shape import apply_shape_op
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import products
from veil.mpc.kernels.base import Cost
from veil.mpc.material import SizeSide
from veil.mpc.rewrite import pool_before_relu
from veil.plain.executor import trace_shapes

__all__ = ["MPC_OPS", "COMPILERS", "Program", "ServerState", "Instr", "compile_program", "fixed_spec", "apply_prefix",
           "DIRECT_INPUT", "LOW_LATENCY_ELEMENTS", "SEGMENT_BYTES", "state_of", "user_inputs"]

# A query's program runs in segments of at most this much dealer material (one server's view, bytes):
# the dealer makes a segment's material only when the previous segment's online part is done, so memory
# holds one segment, not the whole model (the user chooses; every party reads it from the query).
SEGMENT_BYTES = 256 * 2**20

# Comparison layers up to this many elements (per query) use the 3-round protocol: one round less for
# about 90 words of dealer material per element instead of ~8 (worth it where latency dominates).
LOW_LATENCY_ELEMENTS = 2048


@dataclass
class Program:
    graph: Graph
    batch: int
    fp: FixedPoint
    instrs: list[Instr]
    scale: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    post: dict[str, tuple[str, Any]]  # output -> ("softmax", axis) applied by the user
    final: dict[str, str]  # graph output -> tensor the servers reveal
    direct: dict[str, Any] | None = None  # first layer masked by the user itself (see compile_program)
    _sizes: list[int] | None = None  # material bytes per instruction (material_sizes)

    @property
    def cost(self) -> Cost:
        total = Cost()
        for i in self.instrs:
            total = total + i.cost
        return total

    def material_sizes(self) -> list[int]:
        """Bytes of one server's material per instruction (from the public shapes; nothing is drawn)."""
        if self._sizes is None:
            side = SizeSide()
            sizes = []
            for ins in self.instrs:
                before = side.nbytes
                for key, maker in ins.materials:
                    maker(side, key, {})
                sizes.append(side.nbytes - before)
            self._sizes = sizes
        return self._sizes

    def segments(self, budget: int | None) -> list[tuple[int, int]]:
        """Split the instructions into consecutive ranges ``[lo, hi)`` whose material (one server's
        view) stays within ``budget`` bytes where possible (an instruction larger than the budget
        is a segment of its own); ``None`` or 0: one segment. Every party computes the same ranges
        from the public program and the user's budget."""
        n = len(self.instrs)
        if not budget:
            return [(0, n)]
        out, lo, acc = [], 0, 0
        for i, size in enumerate(self.material_sizes()):
            if size and acc and acc + size > budget:
                out.append((lo, i))
                lo, acc = i, 0
            acc += size
        out.append((lo, n))
        return out

    def materials(self, side: Any, query: str, fixed: dict[str, Any], lo: int = 0, hi: int | None = None) -> dict[str, Any]:
        """Run the material plan of instructions ``lo..hi`` on a side (dealer: full values +
        corrections; server: its shares)."""
        return {key: maker(side, f"{query}/{key}", fixed) for ins in self.instrs[lo:hi] for key, maker in ins.materials}

    def precompute(self, st: ServerState, side: Any, query: str, lo: int = 0, hi: int | None = None) -> dict[str, Any]:
        """Offline, before the dealer's message arrives: ``A_i op F`` for every fixed product
        (``A_i`` is drawn from the dealer seed, so the servers need not wait for the dealer). A group
        of layers reading one input (``prepare`` a tuple of names) shares ``A``: one value per layer."""
        out: dict[str, Any] = {}
        for ins in self.instrs[lo:hi]:
            if ins.prepare is not None:
                key = f"{ins.name}/aw"
                a = side.prefetch(f"{query}/{key}/A", self.shapes[ins.inputs[0]])
                if isinstance(ins.prepare, tuple):
                    out[key] = [st.fixed[n].apply(a, st.fixed[n].f_limbs) for n in ins.prepare]
                else:
                    fw = st.fixed[ins.prepare]
                    out[key] = fw.apply(a, fw.f_limbs)
        return out

    def prepare(self, st: ServerState, store: Any, early: dict[str, Any] | None = None, lo: int = 0,
                hi: int | None = None) -> None:
        """Offline precomputation on a server (fixed products: ``P_i = A_i op F + C_i``)."""
        for ins in self.instrs[lo:hi]:
            if ins.prepare is None:
                continue
            key = f"{ins.name}/aw"
            if isinstance(ins.prepare, tuple):
                fws = [st.fixed[n] for n in ins.prepare]
                afs = early[key] if early is not None and key in early else None
                store.transform(key, partial(_prepare_group, fws, afs))
            elif early is not None and key in early:
                store.transform(key, partial(_prepare_early, early[key]))
            else:
                store.transform(key, partial(products.prepare_aw, st.fixed[ins.prepare]))

    def run(self, st: ServerState, inputs: dict[str, np.ndarray], store: Any) -> dict[str, np.ndarray]:
        env = dict(inputs)
        self.run_range(st, env, store)
        return {o: env[t] for o, t in self.final.items()}

    def run_range(self, st: ServerState, env: dict[str, np.ndarray], store: Any, lo: int = 0, hi: int | None = None) -> None:
        """Run instructions ``lo..hi`` on ``env`` (tensors by name, updated in place)."""
        for ins in self.instrs[lo:hi]:
            ins.run(st, env, store)


def _prepare_early(af: np.ndarray, item: dict[str, Any]) -> dict[str, Any]:
    return {"A": item["A"], "P": af + item["C"]}


def _prepare_group(fws: list[Any], afs: list[np.ndarray] | None, item: dict[str, Any]) -> dict[str, Any]:
    if afs is None:
        afs = [fw.apply(item["A"], fw.f_limbs) for fw in fws]
    return {"A": item["A"], "P": [af + c for af, c in zip(afs, item["C"], strict=True)]}


def compile_program(graph: Graph, batch: int, fp: FixedPoint, low_latency: int | None = None) -> Program:
    """Compile ``graph`` for ``batch`` samples: each node goes through its compiler in
    :data:`veil.mpc.compilers.COMPILERS`. Comparison layers of at most ``low_latency`` elements (default
    :data:`LOW_LATENCY_ELEMENTS`, read at call time; every party must use the same value) use the
    3-round protocol (:mod:`veil.mpc.kernels.select3`), larger ones the 4-round one."""
    graph.require_ops(MPC_OPS, where="mpc mode")
    graph = pool_before_relu(graph)
    b = Builder(graph, batch, fp, trace_shapes(graph, batch),
                LOW_LATENCY_ELEMENTS if low_latency is None else low_latency)
    b.direct = _direct_first_layer(graph)
    skip = {n.name for n in b.direct["prefix"]} if b.direct else set()
    public = set(public_inputs(graph))  # sent in the clear by the user (compilers/public.py)
    for node in graph.nodes:
        if node.name in skip:  # shape ops the user applies to its own input before masking it
            b.scale[node.output] = b.f
            continue
        if node.name in b.done:  # compiled early with a sibling (fixed products sharing an input)
            continue
        src = [b.alias.get(i, i) for i in node.inputs]
        if public and compile_public(b, node, src, public):
            continue
        COMPILERS[node.op](b, node, src)
    final = {o: b.alias.get(o, o) for o in graph.outputs}
    for o in state_of(graph).values():  # state kept on the servers is fed back as an input: scale f
        final[o] = b.at_f(final[o], f"state:{o}")
    return Program(graph, batch, fp, b.instrs, b.scale, b.shapes, b.post, final, b.direct)


def state_of(graph: Graph) -> dict[str, str]:
    """``{input: output}`` of the secret state a multi-step session keeps on the servers
    (``graph.meta["state"]``, e.g. a decoder's key/value cache); only pairs present in this graph."""
    st = graph.meta.get("state", {}) or {}
    outs = set(graph.outputs)
    return {i: o for i, o in st.items() if o in outs}


def user_inputs(graph: Graph) -> list[Any]:
    """The inputs the user secret-shares (every input neither fed from the servers' state nor public)."""
    st = graph.meta.get("state", {}) or {}
    pub = public_inputs(graph)
    return [s for s in graph.inputs if s.name not in st and s.name not in pub]


def _direct_first_layer(graph: Graph) -> dict[str, Any] | None:
    """If the single input reaches a linear/conv layer through shape ops only (flatten, reshape,
    transpose), the user can mask that layer's input itself: the dealer gives it the mask ``A`` (offline)
    and it sends ``E = X - A`` to both servers, saving the servers' first opening (one round)."""
    if len(graph.inputs) != 1 or graph.inputs[0].dtype.startswith("int"):
        return None
    t, prefix = graph.inputs[0].name, []
    for node in graph.nodes:
        if node.inputs != (t,) or len(graph.consumers(t)) != 1 or t in graph.outputs:
            return None
        if node.op in ("flatten", "reshape", "transpose"):
            prefix.append(node)
            t = node.output
            continue
        if node.op in ("linear", "conv2d"):
            return {"prefix": prefix, "node": node.name, "tensor": t}
        return None
    return None


def apply_prefix(prog: Program, x: np.ndarray) -> np.ndarray:
    """The user's side of the direct first layer: the shape ops before it, on its own input."""
    assert prog.direct is not None
    for node in prog.direct["prefix"]:
        x = apply_shape_op(node, x)
    return x
