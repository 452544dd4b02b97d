"""``linear`` and ``conv2d``: products with the owner's fixed weight (``linear_aw`` / ``conv_aw``).

The weight is masked once per session; per query the dealer sends ``C = A op B`` and the servers open
``E = X - A`` (1 round). When the program's first layer is masked by the user itself
(``Builder.direct``), the servers receive ``E`` from the user and the layer costs no round.
The output (a product) has scale 2f; the bias share is added at 2f.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc import dealer as D
from veil.mpc.compilers.base import Builder, ServerState, fixed_spec
from veil.mpc.kernels import products

__all__ = ["compile_linear", "DIRECT_INPUT"]

DIRECT_INPUT = "__masked_input__"


def _mk_fixed(b_shapes: dict[str, tuple[int, ...]], x: str, out: str, wop: Any, name: str, side: Any, lab: str,
              fx: dict[str, Any]) -> Any:
    return D.fixed_product(side, lab, b_shapes[x], b_shapes[out], wop, fx.get(name))


def _add_bias(st: ServerState, name: str, z: np.ndarray) -> np.ndarray:
    if name in st.bias:
        b = st.bias[name]
        z = z + (b if z.ndim != 4 else b.reshape(-1, 1, 1))
    return z


def _run_direct(key: str, name: str, out: str, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    fw, mat = st.fixed[name], store.take(key)
    z = fw.apply(env[DIRECT_INPUT], fw.w_limbs) + mat["P"]  # E = X - A came from the user
    env[out] = _add_bias(st, name, z)


def _run_aw(x: str, key: str, name: str, out: str, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    z = products.linear_aw(st.ctx, env[x], st.fixed[name], store.take(key))
    env[out] = _add_bias(st, name, z)


def _mk_group(b_shapes: dict[str, tuple[int, ...]], x: str, outs: list[str], wops: list[Any], names: list[str],
              side: Any, lab: str, fx: dict[str, Any]) -> Any:
    return D.fixed_products(side, lab, b_shapes[x], [(b_shapes[o], w, fx.get(n)) for o, w, n in zip(outs, wops, names, strict=True)])


def _run_group(x: str, key: str, names: list[str], outs: list[str], st: ServerState, env: dict[str, np.ndarray],
               store: Any) -> None:
    mat = store.take(key)
    e = st.ctx.open(env[x] - mat["A"])  # one opening serves every layer reading x
    for name, out, p in zip(names, outs, mat["P"], strict=True):
        fw = st.fixed[name]
        env[out] = _add_bias(st, name, fw.apply(e, fw.w_limbs) + p)


def _siblings(b: Builder, node: Node) -> list[Node]:
    """Other linear layers reading the same tensor, not compiled yet: they share one masked opening."""
    if node.op != "linear":
        return []
    return [n for n in b.graph.consumers(node.inputs[0])
            if n.op == "linear" and n.name != node.name and n.name not in b.done and n.inputs == node.inputs]


def compile_linear(b: Builder, node: Node, src: list[str]) -> None:
    """One fixed product, or, when other linear layers read the same input, all of them with one shared
    input mask ``A`` (one opening of ``E = X - A``, one round, instead of one per layer)."""
    name, key = node.name, f"{node.name}/aw"
    wop = products.weight_op(fixed_spec(node))
    sib = _siblings(b, node) if not (b.direct is not None and name == b.direct["node"]) else []
    if sib:
        group = [node, *sib]
        x = b.at_f(src[0], name)
        names, outs = [n.name for n in group], [n.output for n in group]
        wops = [products.weight_op(None) for _ in group]
        b.emit(name, partial(_run_group, x, key, names, outs), [(key, partial(_mk_group, b.shapes, x, outs, wops, names))],
               products.product_aw_cost(b.shapes[x]), prepare=tuple(names), inputs=(x,))
        for n in group:
            b.scale[n.output] = 2 * b.f
            b.done.add(n.name)
        b.trunc_together([o for o in outs if b.needs_f(o)], name)  # one round for all of them
        return
    if b.direct is not None and name == b.direct["node"]:
        x = b.direct["tensor"]
        b.emit(name, partial(_run_direct, key, name, node.output), [(key, partial(_mk_fixed, b.shapes, x, node.output, wop, name))],
               prepare=name, inputs=(x,))
        b.direct["key"] = key
    else:
        x = b.at_f(src[0], name)
        b.emit(name, partial(_run_aw, x, key, name, node.output),
               [(key, partial(_mk_fixed, b.shapes, x, node.output, wop, name))],
               products.product_aw_cost(b.shapes[x]), prepare=name, inputs=(x,))
    b.scale[node.output] = 2 * b.f
