"""``relu``, ``maxpool``, ``argmax``: exact comparisons (:mod:`veil.mpc.kernels.compare`).

ReLU of a product (scale 2f) is fused with its truncation (one opening serves both). Max pooling and
arg-max are tournaments of comparisons, one call per level; layers of at most ``low_latency``
comparisons use the 3-round protocol.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc.compilers.base import Builder, ServerState
from veil.mpc.kernels import compare, pool
from veil.mpc.kernels.base import Cost

__all__ = ["compile_relu", "compile_tournament"]


def _run_relu(t: str, key: str, tr: bool, out: str, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    env[out] = compare.relu_a(st.ctx, env[t], store.take(key), trunc=tr)


def _mk_cmp(fn: Any, n: int, width: int, f: int | None, side: Any, lab: str, fx: dict[str, Any]) -> Any:
    return fn(side, lab, n, width, f)


def compile_relu(b: Builder, node: Node, src: list[str]) -> None:
    t = src[0]
    tr = b.scale[t] == 2 * b.f
    n = b.n_of(t)
    key = f"{node.name}/cmp"
    b.emit(node.name, partial(_run_relu, t, key, tr, node.output),
           [(key, partial(_mk_cmp, b.cmp_material(n), n, 1, b.f if tr else None))], b.cmp_cost(n)(n))
    b.scale[node.output] = b.f if tr else b.scale[t]


def _run_tournament(t: str, keys: list[str], node: Node, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    ms = [store.take(kk) for kk in keys]
    a = node.attrs
    if node.op == "maxpool":
        env[node.output] = pool.maxpool_a(st.ctx, env[t], a["kernel"], a["strides"], a["pads"], ms)
    else:
        i = pool.argmax_a(st.ctx, env[t], a["axis"], ms)
        env[node.output] = np.expand_dims(i, a["axis"]) if a["keepdims"] else i


def compile_tournament(b: Builder, node: Node, src: list[str]) -> None:
    """``maxpool`` and ``argmax``."""
    t = src[0]
    if node.op == "maxpool":
        k = int(np.prod(node.attrs["kernel"]))
        n_out, width = b.n_of(node.output), 1
    else:
        ax = node.attrs["axis"] % len(b.shapes[t])
        k = b.shapes[t][ax]
        n_out, width = b.n_of(t) // k, 2
    sizes = pool.tournament_sizes(k)
    keys = [f"{node.name}/cmp{lvl}" for lvl in range(len(sizes))]
    mats = [(kk, partial(_mk_cmp, b.cmp_material(n_out * p), n_out * p, width, None)) for kk, p in zip(keys, sizes, strict=True)]
    cost = Cost()
    for q in sizes:
        cost = cost + b.cmp_cost(n_out * q)(n_out * q, width=width)
    b.emit(node.name, partial(_run_tournament, t, keys, node), mats, cost)
    b.scale[node.output] = b.scale[t] if node.op == "maxpool" else 0
