"""``mul`` and ``matmul`` of two activations: Beaver triples (1 round); operands at scale f first."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc import dealer as D
from veil.mpc import ring
from veil.mpc.compilers.base import Builder, ServerState, refuse
from veil.mpc.kernels import products

__all__ = ["compile_mul", "compile_matmul"]


def _run_mul(xs: list[str], key: str, out: str, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    env[out] = products.mul_aa(st.ctx, env[xs[0]], env[xs[1]], store.take(key))


def _run_matmul(xs: list[str], key: str, out: str, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    env[out] = products.matmul_aa(st.ctx, env[xs[0]], env[xs[1]], store.take(key))


def _mk_beaver(sa: tuple[int, ...], sb: tuple[int, ...], sc: tuple[int, ...], op: Any, side: Any, lab: str,
               fx: dict[str, Any]) -> Any:
    return D.beaver(side, lab, sa, sb, sc, op)


def compile_mul(b: Builder, node: Node, src: list[str]) -> None:
    xs = [b.at_f(i, node.name) for i in src]
    key = f"{node.name}/beaver"
    sa, sb, sc = b.shapes[xs[0]], b.shapes[xs[1]], b.shapes[node.output]
    b.emit(node.name, partial(_run_mul, xs, key, node.output), [(key, partial(_mk_beaver, sa, sb, sc, np.multiply))],
           products.beaver_cost(sa, sb))
    b.scale[node.output] = 2 * b.f


def compile_matmul(b: Builder, node: Node, src: list[str]) -> None:
    """Matrix product of two activations, with batch dims (numpy broadcasting): attention's
    ``Q K^T`` and ``P V``. One Beaver triple per batch element (``c = a @ b`` batched)."""
    xs = [b.at_f(i, node.name) for i in src]
    sa, sb, sc = b.shapes[xs[0]], b.shapes[xs[1]], b.shapes[node.output]
    if len(sa) < 2 or len(sb) < 2:
        raise refuse(node, f"matmul of two secret tensors needs operands of rank >= 2, got {sa} and {sb}")
    key = f"{node.name}/beaver"
    b.emit(node.name, partial(_run_matmul, xs, key, node.output), [(key, partial(_mk_beaver, sa, sb, sc, ring.bmatmul))],
           products.beaver_cost(sa, sb))
    b.scale[node.output] = 2 * b.f
