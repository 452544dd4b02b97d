"""Non-linear ops as compound kernels (:mod:`veil.mpc.kernels.nonlinear`): ``gelu``, ``gelu_tanh``,
``sigmoid``, ``tanh``, ``silu``, ``erf`` (piecewise polynomials), ``reciprocal``, ``rsqrt``, ``sqrt``,
``softmax`` inside the graph (with its public mask), ``layernorm``, ``rmsnorm`` (secret gamma/beta).

Each is planned by a dry run of its kernel on the public shapes (:func:`veil.mpc.kernels.steps.plan`):
the plan gives the dealer's material and the declared cost. Inputs are brought to scale f; outputs
have scale f.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc.compilers.base import Builder, ServerState
from veil.mpc.debug import stop_point
from veil.mpc.kernels import nonlinear as NL
from veil.mpc.kernels.steps import Runner, plan, steps_cost, steps_material

__all__ = ["compile_kernel", "compile_elementwise", "compile_softmax", "compile_norm", "PIECEWISE_OPS"]

PIECEWISE_OPS = ("gelu", "gelu_tanh", "sigmoid", "tanh", "silu", "erf")


def _run_kernel(fn: Callable[..., np.ndarray], ins: tuple[str, ...], params: tuple[str, ...], key: str,
                steps: list[Any], out: str, st: ServerState, env: dict[str, np.ndarray], store: Any) -> None:
    stop_point(f"server{st.ctx.party}", key)  # test hook (veil.mpc.debug), inert unless its variable is set
    run = Runner(st.ctx, store.take(key), steps)
    env[out] = fn(run, *[env[i] for i in ins], *[st.params[p] for p in params])
    run.finish()


def _mk_steps(steps: list[Any], low: int, side: Any, lab: str, fx: dict[str, Any]) -> Any:
    return steps_material(side, lab, steps, low)


def compile_kernel(b: Builder, node: Node, fn: Callable[..., np.ndarray], ins: list[str],
                   params: tuple[str, ...] = (), out_scale: int | None = None) -> None:
    """Emit ``fn(run, *inputs, *secret param shares)`` as one instruction; inputs at scale f."""
    xs = tuple(b.at_f(i, node.name) for i in ins)
    pshapes = [tuple(node.params[p.split("/")[-1]].shape) for p in params]
    steps = plan(fn, b.fp, *[b.shapes[x] for x in xs], *pshapes)
    key = f"{node.name}/k"
    b.emit(node.name, partial(_run_kernel, fn, xs, params, key, steps, node.output),
           [(key, partial(_mk_steps, steps, b.low_latency))], steps_cost(steps, b.low_latency))
    b.scale[node.output] = b.f if out_scale is None else out_scale


def _piecewise(spec: NL.Piecewise, run: Runner, x: np.ndarray) -> np.ndarray:
    return NL.piecewise_a(run, x, spec)


_SPECIAL: dict[str, Callable[..., np.ndarray]] = {"reciprocal": NL.reciprocal_a, "rsqrt": NL.rsqrt_a, "sqrt": NL.sqrt_a}


def compile_elementwise(b: Builder, node: Node, src: list[str]) -> None:
    if node.op in _SPECIAL:  # range [2^lo, 2^hi) from the input's proven lower bound, or refused (bounds.py)
        from veil.mpc.bounds import FLOOR_TOPS, kernel_low_bits

        fn: Callable[..., np.ndarray] = partial(_SPECIAL[node.op], lo=kernel_low_bits(b.graph, node, b.f, b.lower_bounds()),
                                                hi=FLOOR_TOPS[node.op])
    else:
        fn = partial(_piecewise, NL.FUNCTIONS[node.op])
    compile_kernel(b, node, fn, [src[0]])


def _softmax(axis: int, keep: np.ndarray | None, add: np.ndarray | None, run: Runner, x: np.ndarray) -> np.ndarray:
    if add is not None:
        x = x + run.public(np.broadcast_to(add, x.shape))
    return NL.softmax_a(run, x, axis, keep)


def compile_softmax(b: Builder, node: Node, src: list[str]) -> None:
    """Softmax on a graph output with no mask stays with the user (the servers reveal the logits);
    anywhere else it runs under mpc. Mask entries at or below -1e4 are excluded exactly; other finite
    entries are added to the input (public)."""
    mask = node.params.get("mask")
    if mask is None and node.output in b.graph.outputs and not b.graph.consumers(node.output):
        b.alias[node.output] = src[0]
        b.post[node.output] = ("softmax", node.attrs["axis"])
        return
    keep = add = None
    if mask is not None:
        m = np.asarray(mask, np.float64)
        keep = m > -1e4
        fin = np.where(keep, m, 0.0)
        add = b.fp.encode(fin) if np.any(fin != 0) else None
        if keep.all():
            keep = None
    compile_kernel(b, node, partial(_softmax, int(node.attrs["axis"]), keep, add), [src[0]])


def _norm(eps: float, centre: bool, run: Runner, x: np.ndarray, gamma: np.ndarray,
          beta: np.ndarray | None = None) -> np.ndarray:
    return NL.layernorm_a(run, x, gamma, beta, eps, centre)


def compile_norm(b: Builder, node: Node, src: list[str]) -> None:
    """``layernorm`` (secret gamma, beta) and ``rmsnorm`` (secret gamma) over the last axis."""
    centre = node.op == "layernorm"
    params = (f"{node.name}/gamma", f"{node.name}/beta") if centre else (f"{node.name}/gamma",)
    compile_kernel(b, node, partial(_norm, float(node.attrs["eps"]), centre), [src[0]], params)
