"""Public inputs: tensors the user sends in the clear to both servers (never to the dealer).

A graph declares them in ``graph.meta["public_inputs"]`` as ``{input name: max |value|}`` (e.g. MiniLM's
attention bias and pooling weights, derived from the padding mask, which the padded shapes reveal
anyway). The user checks its public values against the declared bound before sending anything; the
range analysis (:mod:`veil.mpc.bounds`) uses the bound. Since the dealer's material depends only on
shapes, one compiled program serves every value of the public inputs.

Compilation: a node all of whose inputs are public is evaluated in the clear by both servers with
the plain executor's kernel (float64, no communication). ``add``/``sub``/``mul`` of a secret tensor and
a public one are local: the public operand is encoded at the secret's scale and added by server0
(``add_ap``), or encoded at scale f and multiplied share-wise (``mul_ap``, output scale 2f). Any other
op reading a public tensor together with a secret one is refused at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Graph, Node
from veil.mpc.compilers.base import Builder, refuse
from veil.mpc.kernels import arith
from veil.plain.executor import run_node

__all__ = ["public_inputs", "compile_public"]


def public_inputs(graph: Graph) -> dict[str, float]:
    """``{name: declared max |value|}`` of the graph's public inputs (empty for most graphs)."""
    pub: Mapping[str, Any] = graph.meta.get("public_inputs") or {}
    return {str(k): float(v) for k, v in pub.items()}


def _add_public(scale: int, sign_x: int, sign_p: int, st: Any, x: np.ndarray, p: np.ndarray) -> np.ndarray:
    xs = x if sign_x > 0 else np.uint64(0) - x
    c = st.ctx.fp.encode(sign_p * np.asarray(p, np.float64), scale=scale, what="public input")
    return arith.add_ap(st.ctx, xs, c)  # broadcasts on both servers


def _mul_public(st: Any, x: np.ndarray, p: np.ndarray) -> np.ndarray:
    return arith.mul_ap(x, st.ctx.fp.encode(np.asarray(p, np.float64), what="public input"))


def compile_public(b: Builder, node: Node, src: list[str], public: set[str]) -> bool:
    """Compile ``node`` if it reads a public tensor (adding its output to ``public`` when it is public
    too); False when it reads none (the caller compiles it as usual)."""
    pub = [i in public for i in src]
    if not any(pub):
        return False
    if all(pub):
        b.emit(node.name, partial(_run_clear, node, tuple(src)))
        public.add(node.output)
        return True
    if node.op in ("add", "sub") and len(src) == 2:
        x, p = (src[0], src[1]) if pub[1] else (src[1], src[0])
        sign_x = -1 if node.op == "sub" and pub[0] else 1
        sign_p = -1 if node.op == "sub" and pub[1] else 1
        s = b.scale[x]
        b.local(node, partial(_add_public, s, sign_x, sign_p), s, x, p)
        return True
    if node.op == "mul" and len(src) == 2:
        x, p = (src[0], src[1]) if pub[1] else (src[1], src[0])
        b.local(node, _mul_public, 2 * b.f, b.at_f(x, node.name), p)
        return True
    raise refuse(node, f"{node.op} of a secret tensor and a public input; with public inputs mpc runs add, sub and "
                       "mul (and any op on public values only)")


def _run_clear(node: Node, ins: tuple[str, ...], st: Any, env: dict[str, np.ndarray], store: Any) -> None:
    env[node.output] = np.asarray(run_node(node, [np.asarray(env[i], np.float64) for i in ins]), np.float64)
