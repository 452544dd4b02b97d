"""``embedding``: the user's secret token ids looked up in the owner's secret table.

1. one-hot of the ids (``onehot`` step, 1 round, 8 bytes per id): the dealer shares ``R = (r + k rho)
   << f`` and the one-hot row of ``r mod k`` (k: the vocabulary padded to a power of two); the servers
   open ``ids + R`` (uniform: reveals nothing), and rotate the shared one-hot row by the public
   ``(id + r) mod k`` (local). (The dealer-assisted rotation replaces k comparisons per id.) Ids are
   below the vocabulary size v (the user checks them), so the columns v..k-1 are shares of zero and
   are dropped: the product below runs on (n, v), not (n, k).
2. ``onehot @ table``: the table is a fixed secret weight masked once per session, exactly like a
   ``linear`` layer's (:func:`~veil.mpc.kernels.products.linear_aw`, 1 round, 8 v bytes per id).
Ids must be exact integers (the user's integer inputs are encoded at scale f); output at scale f.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc import dealer as D
from veil.mpc.compilers.base import Builder, ServerState
from veil.mpc.kernels import products
from veil.mpc.kernels.steps import Runner, steps_cost, steps_material

__all__ = ["compile_embedding", "padded_vocab"]


def padded_vocab(v: int) -> int:
    return 1 << max(int(v - 1).bit_length(), 1)


def _run_onehot(ids: str, k: int, v: int, f: int, key: str, steps: list[Any], out: str, st: ServerState,
                env: dict[str, np.ndarray], store: Any) -> None:
    run = Runner(st.ctx, store.take(key), steps)
    env[out] = np.ascontiguousarray(run.onehot(env[ids].reshape(-1), k, f)[:, :v])  # ids < v: the rest is 0
    run.finish()


def _mk_steps(steps: list[Any], low: int, side: Any, lab: str, fx: dict[str, Any]) -> Any:
    return steps_material(side, lab, steps, low)


def _mk_fixed(x_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str, side: Any, lab: str,
              fx: dict[str, Any]) -> Any:
    return D.fixed_product(side, lab, x_shape, out_shape, products.weight_op(None), fx.get(name))


def _run_lookup(x: str, key: str, name: str, out: str, shape: tuple[int, ...], st: ServerState,
                env: dict[str, np.ndarray], store: Any) -> None:
    env[out] = products.linear_aw(st.ctx, env[x], st.fixed[name], store.take(key)).reshape(shape)


def compile_embedding(b: Builder, node: Node, src: list[str]) -> None:
    ids = src[0]
    if b.scale[ids] != b.f:
        ids = b.at_f(ids, node.name)
    v, d = node.params["table"].shape
    k = padded_vocab(int(v))
    n = b.n_of(ids)
    oh = f"{node.output}@onehot"
    steps = [("onehot", n, k, b.f)]
    okey = f"{node.name}/onehot"
    b.emit(okey, partial(_run_onehot, ids, k, int(v), b.f, okey, steps, oh), [(okey, partial(_mk_steps, steps, b.low_latency))],
           steps_cost(steps, b.low_latency))
    b.shapes[oh], b.scale[oh] = (n, int(v)), 0
    key, flat = f"{node.name}/aw", (n, int(d))
    b.emit(node.name, partial(_run_lookup, oh, key, node.name, node.output, b.shapes[node.output]),
           [(key, partial(_mk_fixed, (n, int(v)), flat, node.name))], products.product_aw_cost((n, int(v))), prepare=node.name,
           inputs=(oh,))
    b.scale[node.output] = b.f
