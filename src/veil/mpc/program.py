"""Compile a (public) veil graph into the servers' program: instructions, material plan, cost.

Every tensor carries a static *scale* (fractional bits): inputs and activations have ``f``, a
product of two ``f``-scale values has ``2f`` until truncated. Truncation is lazy: it is fused into
the next ReLU (one opening serves the comparison and the truncation), skipped at the outputs (the
user decodes at ``2f``), and only run on its own (``trunc_a``, 1 round) before another product.
Max pooling runs at whatever scale it gets. Scales being static, the dealer can plan the exact
material of a query from the public graph and the batch size alone. When the input reaches the first
linear/conv layer through shape ops only, the user masks that layer's input itself (``direct``).

Supported ops: see :data:`MPC_OPS`. ``softmax`` is only allowed on a graph output: the servers
return its input and the user applies it after reconstruction (softmax is public post-processing
of the logits the user is entitled to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veil.errors import UnsupportedOpError
from veil.graph.ir import Graph, Node
from veil.mpc import dealer as D
from veil.mpc import ring
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import arith, compare, pool, products, select3
from veil.mpc.kernels.base import Cost, Ctx
from veil.mpc.rewrite import pool_before_relu
from veil.plain import kernels as PK
from veil.plain.executor import trace_shapes

__all__ = ["MPC_OPS", "Program", "ServerState", "compile_program", "fixed_spec", "apply_prefix", "DIRECT_INPUT", "LOW_LATENCY_ELEMENTS"]

DIRECT_INPUT = "__masked_input__"
# Comparison layers up to this many elements (per query) use the 3-round protocol: one round less for
# about 90 words of dealer material per element instead of ~8 (worth it where latency dominates).
LOW_LATENCY_ELEMENTS = 2048

MPC_OPS = frozenset({"linear", "conv2d", "relu", "maxpool", "avgpool", "global_avgpool", "flatten", "reshape",
                     "transpose", "add", "sub", "mul", "matmul", "add_const", "mul_const", "argmax", "softmax"})

Maker = Callable[[Any, str, dict[str, Any]], Any]


@dataclass
class ServerState:
    ctx: Ctx
    fixed: dict[str, products.FixedWeight]  # per linear/conv node
    bias: dict[str, np.ndarray]  # per node: this server's share of b at scale 2f


@dataclass
class Instr:
    name: str
    run: Callable[[ServerState, dict[str, np.ndarray], Any], None]
    materials: list[tuple[str, Maker]] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)
    prepare: str | None = None  # node name of a fixed product to precompute offline
    inputs: tuple[str, ...] = ()  # tensors read (recorded for fixed products)


def fixed_spec(node: Node) -> tuple[Any, ...] | None:
    """The conv descriptor (strides, pads, kernel, out_channels) of a conv2d node; None for linear."""
    if node.op == "linear":
        return None
    w = node.params["W"]
    return (tuple(node.attrs["strides"]), tuple(node.attrs["pads"]), tuple(w.shape[2:]), int(w.shape[0]))


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

    @property
    def cost(self) -> Cost:
        total = Cost()
        for i in self.instrs:
            total = total + i.cost
        return total

    def materials(self, side: Any, query: str, fixed: dict[str, Any]) -> dict[str, Any]:
        """Run the material plan on a side (dealer: full values + corrections; server: its shares)."""
        return {key: maker(side, f"{query}/{key}", fixed) for ins in self.instrs for key, maker in ins.materials}

    def precompute(self, st: ServerState, side: Any, query: str) -> dict[str, np.ndarray]:
        """Offline, before the dealer's message arrives: ``A_i op F`` for every fixed product
        (``A_i`` is drawn from the dealer seed, so the servers need not wait for the dealer)."""
        out = {}
        for ins in self.instrs:
            if ins.prepare is not None:
                key = f"{ins.name}/aw"
                a = side.prefetch(f"{query}/{key}/A", self.shapes[ins.inputs[0]])
                fw = st.fixed[ins.prepare]
                out[key] = fw.apply(a, fw.f_limbs)
        return out

    def prepare(self, st: ServerState, store: Any, early: dict[str, np.ndarray] | None = None) -> None:
        """Offline precomputation on a server (fixed products: ``P_i = A_i op F + C_i``)."""
        for ins in self.instrs:
            if ins.prepare is not None:
                fw, key = st.fixed[ins.prepare], f"{ins.name}/aw"
                if early is not None and key in early:
                    store.transform(key, lambda item, af=early[key]: {"A": item["A"], "P": af + item["C"]})
                else:
                    store.transform(key, lambda item, fw=fw: products.prepare_aw(fw, item))

    def run(self, st: ServerState, inputs: dict[str, np.ndarray], store: Any) -> dict[str, np.ndarray]:
        env = dict(inputs)
        for ins in self.instrs:
            ins.run(st, env, store)
        return {o: env[t] for o, t in self.final.items()}


def compile_program(graph: Graph, batch: int, fp: FixedPoint, low_latency: int | None = None) -> Program:
    """Compile ``graph`` for ``batch`` samples. Comparison layers of at most ``low_latency`` elements
    (default :data:`LOW_LATENCY_ELEMENTS`, read at call time; every party must use the same value) use
    the 3-round protocol (:mod:`veil.mpc.kernels.select3`), larger ones the 4-round one."""
    graph.require_ops(MPC_OPS, where="mpc mode")
    if low_latency is None:
        low_latency = LOW_LATENCY_ELEMENTS

    def cmp_material(n: int) -> Callable[..., Any]:
        return D.compare3 if n <= low_latency else D.compare

    def cmp_cost(n: int) -> Callable[..., Cost]:
        return select3.select3_a_cost if n <= low_latency else compare.select_a_cost

    graph = pool_before_relu(graph)
    shapes = trace_shapes(graph, batch)
    f = fp.frac_bits
    scale: dict[str, int] = {s.name: f for s in graph.inputs}
    instrs: list[Instr] = []
    truncated: dict[str, str] = {}
    post: dict[str, tuple[str, Any]] = {}
    alias: dict[str, str] = {}

    def n_of(t: str) -> int:
        return int(np.prod(shapes[t], dtype=np.int64))

    def at_f(t: str, node: str) -> str:
        """Tensor name holding ``t`` at scale f (inserting a trunc_a or a local upscale)."""
        if scale[t] == f:
            return t
        if t in truncated:
            return truncated[t]
        new = f"{t}@f"
        if scale[t] == 2 * f:
            key = f"{node}/trunc:{t}"

            def run_trunc(st: ServerState, env: dict, store: Any, t=t, new=new, key=key) -> None:
                env[new] = arith.trunc_a(st.ctx, env[t], store.take(key))

            def mk_trunc(side: Any, lab: str, fx: dict, n: int = n_of(t)) -> Any:
                return D.trunc(side, lab, n, f)

            instrs.append(Instr(key, run_trunc, [(key, mk_trunc)], arith.trunc_a_cost(n_of(t))))
        else:
            up = f - scale[t]

            def run_upscale(st: ServerState, env: dict, store: Any, t=t, new=new, up=up) -> None:
                env[new] = arith.upscale_a(env[t], up)

            instrs.append(Instr(f"{node}/upscale:{t}", run_upscale))
        shapes[new], scale[new], truncated[t] = shapes[t], f, new
        return new

    def local(node: Node, fn: Callable[..., np.ndarray], out_scale: int, *ins: str) -> None:
        def run(st: ServerState, env: dict, store: Any) -> None:
            env[node.output] = fn(st, *[env[i] for i in ins])

        instrs.append(Instr(node.name, run))
        scale[node.output] = out_scale

    direct = _direct_first_layer(graph)
    skip = {n.name for n in direct["prefix"]} if direct else set()
    for node in graph.nodes:
        op, name = node.op, node.name
        src = [alias.get(i, i) for i in node.inputs]
        if name in skip:  # shape ops the user applies to its own input before masking it
            scale[node.output] = f
            continue
        if direct is not None and name == direct["node"]:
            key, x = f"{name}/aw", direct["tensor"]
            wop = products.weight_op(fixed_spec(node))

            def mk_direct(side: Any, lab: str, fx: dict, x=x, out=node.output, wop=wop, name=name) -> Any:
                return D.fixed_product(side, lab, shapes[x], shapes[out], wop, fx.get(name))

            def run_direct(st: ServerState, env: dict, store: Any, key=key, name=name, out=node.output) -> None:
                fw, mat = st.fixed[name], store.take(key)
                z = fw.apply(env[DIRECT_INPUT], fw.w_limbs) + mat["P"]  # E = X - A came from the user
                if name in st.bias:
                    b = st.bias[name]
                    z = z + (b if z.ndim == 2 else b.reshape(-1, 1, 1))
                env[out] = z

            instrs.append(Instr(name, run_direct, [(key, mk_direct)], Cost(), prepare=name, inputs=(x,)))
            scale[node.output] = 2 * f
            direct["key"] = key
            continue
        if op in ("linear", "conv2d"):
            x = at_f(src[0], name)
            spec = fixed_spec(node)
            key = f"{name}/aw"
            wop = products.weight_op(spec)

            def mk_aw(side: Any, lab: str, fx: dict, x=x, out=node.output, wop=wop, name=name) -> Any:
                return D.fixed_product(side, lab, shapes[x], shapes[out], wop, fx.get(name))

            def run_aw(st: ServerState, env: dict, store: Any, x=x, key=key, name=name, out=node.output) -> None:
                z = products.linear_aw(st.ctx, env[x], st.fixed[name], store.take(key))
                if name in st.bias:
                    b = st.bias[name]
                    z = z + (b if z.ndim == 2 else b.reshape(-1, 1, 1))
                env[out] = z

            instrs.append(Instr(name, run_aw, [(key, mk_aw)], products.product_aw_cost(shapes[x]), prepare=name,
                                inputs=(x,)))
            scale[node.output] = 2 * f
        elif op in ("relu", "maxpool", "argmax"):
            t = src[0]
            if op == "relu":
                tr = scale[t] == 2 * f
                n = n_of(t)
                key = f"{name}/cmp"

                def run_relu(st: ServerState, env: dict, store: Any, t=t, key=key, tr=tr, out=node.output) -> None:
                    env[out] = compare.relu_a(st.ctx, env[t], store.take(key), trunc=tr)

                def mk_relu(side: Any, lab: str, fx: dict, n: int = n, tr: bool = tr) -> Any:
                    return cmp_material(n)(side, lab, n, 1, f if tr else None)
                instrs.append(Instr(name, run_relu, [(key, mk_relu)], cmp_cost(n)(n)))
                scale[node.output] = f if tr else scale[t]
            else:
                if op == "maxpool":
                    k = int(np.prod(node.attrs["kernel"]))
                    n_out, width = n_of(node.output), 1
                else:
                    ax = node.attrs["axis"] % len(shapes[t])
                    k = shapes[t][ax]
                    n_out, width = n_of(t) // k, 2
                keys = [f"{name}/cmp{lvl}" for lvl in range(len(pool.tournament_sizes(k)))]
                mats = [(kk, (lambda side, lab, fx, m=n_out * p, w=width: cmp_material(m)(side, lab, m, w)))
                        for kk, p in zip(keys, pool.tournament_sizes(k), strict=True)]

                def run_tournament(st: ServerState, env: dict, store: Any, t=t, keys=keys, node=node) -> None:
                    ms = [store.take(kk) for kk in keys]
                    if node.op == "maxpool":
                        a = node.attrs
                        env[node.output] = pool.maxpool_a(st.ctx, env[t], a["kernel"], a["strides"], a["pads"], ms)
                    else:
                        i = pool.argmax_a(st.ctx, env[t], node.attrs["axis"], ms)
                        env[node.output] = np.expand_dims(i, node.attrs["axis"]) if node.attrs["keepdims"] else i

                cost = Cost()
                for q in pool.tournament_sizes(k):
                    cost = cost + cmp_cost(n_out * q)(n_out * q, width=width)
                instrs.append(Instr(name, run_tournament, [(kk, m) for kk, m in mats], cost))
                scale[node.output] = scale[t] if op == "maxpool" else 0
        elif op in ("avgpool", "global_avgpool"):
            x = at_f(src[0], name)
            if op == "global_avgpool":
                h, w = shapes[x][2:]
                inv = np.full((1, 1, 1, 1), 1.0 / (h * w))
                def global_sum(st: Any, v: np.ndarray) -> np.ndarray:
                    return (v.sum(axis=(2, 3), keepdims=True))
                window_sum: Callable[[Any, np.ndarray], np.ndarray] = global_sum
            else:
                a = node.attrs
                ones = np.ones((1, 1) + tuple(shapes[x][2:]))
                cnt = PK.pool_windows(ones, a["kernel"], a["strides"], a["pads"], 0).sum(-1)
                if a.get("count_include_pad", False) or not any(a["pads"]):
                    cnt = np.full_like(cnt, float(np.prod(a["kernel"])))
                inv = 1.0 / cnt
                def pooled_sum(st: Any, v: np.ndarray, a: dict[str, Any] = a) -> np.ndarray:
                    return (PK.pool_windows(v, a["kernel"], a["strides"], a["pads"], 0).sum(-1))
                window_sum = pooled_sum
            enc = fp.encode(inv)

            local(node, lambda st, v, fn=window_sum, enc=enc: arith.mul_ap(fn(st, v), enc), 2 * f, x)
        elif op in ("flatten", "reshape", "transpose"):
            a = node.attrs
            fns = {"flatten": lambda st, v, a=a: PK.flatten(v, a["axis"]),
                   "reshape": lambda st, v, a=a: PK.onnx_reshape(v, a["shape"]),
                   "transpose": lambda st, v, a=a: np.ascontiguousarray(np.transpose(v, a["perm"]))}
            local(node, fns[op], scale[src[0]], src[0])
        elif op in ("add", "sub"):
            s = max(scale[src[0]], scale[src[1]])
            ups = [s - scale[i] for i in src]

            def add_sub(st: ServerState, u: np.ndarray, v: np.ndarray, ups=ups, op=op) -> np.ndarray:
                u, v = arith.upscale_a(u, ups[0]), arith.upscale_a(v, ups[1])
                return u + v if op == "add" else u - v

            local(node, add_sub, s, *src)
        elif op == "add_const":
            s = scale[src[0]]
            c = fp.encode(node.params["c"], scale=s)
            local(node, lambda st, v, c=c: arith.add_ap(st.ctx, v, c), s, src[0])
        elif op == "mul_const":
            x = at_f(src[0], name)
            c = fp.encode(node.params["c"])
            local(node, lambda st, v, c=c: arith.mul_ap(v, c), 2 * f, x)
        elif op == "mul":
            xs = [at_f(i, name) for i in src]
            key = f"{name}/beaver"
            sa, sb, sc = shapes[xs[0]], shapes[xs[1]], shapes[node.output]

            def run_mul(st: ServerState, env: dict, store: Any, xs=xs, key=key, out=node.output) -> None:
                env[out] = products.mul_aa(st.ctx, env[xs[0]], env[xs[1]], store.take(key))

            def mk_mul(side: Any, lab: str, fx: dict, sa=sa, sb=sb, sc=sc) -> Any:
                return (D.beaver(side, lab, sa, sb, sc, np.multiply))
            instrs.append(Instr(name, run_mul, [(key, mk_mul)], products.beaver_cost(sa, sb)))
            scale[node.output] = 2 * f
        elif op == "matmul":
            xs = [at_f(i, name) for i in src]
            sa, sb, sc = shapes[xs[0]], shapes[xs[1]], shapes[node.output]
            if len(sa) != 2 or len(sb) != 2:
                raise UnsupportedOpError(name, op, MPC_OPS, f"matmul of two secret tensors is supported for 2-D "
                                         f"operands, got {sa} and {sb}", where="mpc mode")
            key = f"{name}/beaver"

            def run_matmul(st: ServerState, env: dict, store: Any, xs=xs, key=key, out=node.output) -> None:
                env[out] = products.matmul_aa(st.ctx, env[xs[0]], env[xs[1]], store.take(key))

            def mk_matmul(side: Any, lab: str, fx: dict, sa=sa, sb=sb, sc=sc) -> Any:
                return D.beaver(side, lab, sa, sb, sc, ring.matmul)

            instrs.append(Instr(name, run_matmul, [(key, mk_matmul)], products.beaver_cost(sa, sb)))
            scale[node.output] = 2 * f
        elif op == "softmax":
            if node.output not in graph.outputs or graph.consumers(node.output):
                raise UnsupportedOpError(name, op, MPC_OPS, "softmax is only supported as a final output; the user "
                                         "applies it after reconstruction", where="mpc mode")
            alias[node.output] = src[0]
            post[node.output] = ("softmax", node.attrs["axis"])
        else:  # pragma: no cover - guarded by require_ops
            raise UnsupportedOpError(name, op, MPC_OPS, where="mpc mode")
    final = {o: alias.get(o, o) for o in graph.outputs}
    return Program(graph, batch, fp, instrs, scale, shapes, post, final, direct)


def _direct_first_layer(graph: Graph) -> dict[str, Any] | None:
    """If the single input reaches a linear/conv layer through shape ops only (flatten, reshape,
    transpose), the user can mask that layer's input itself: the dealer gives it the mask ``A`` (offline)
    and it sends ``E = X - A`` to both servers, saving the servers' first opening (one round)."""
    if len(graph.inputs) != 1:
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
        a = node.attrs
        if node.op == "flatten":
            x = PK.flatten(x, a["axis"])
        elif node.op == "reshape":
            x = PK.onnx_reshape(x, a["shape"])
        else:
            x = np.ascontiguousarray(np.transpose(x, a["perm"]))
    return x
