"""More local ops on shares: ``unsqueeze``, ``squeeze``, ``concat``, ``slice``, ``gather`` (public
indices), ``reduce_sum`` (scale unchanged) and ``reduce_mean`` (times the public 1/count: scale 2f).
``concat`` brings its inputs to a common scale first (exact upscaling, or truncation to f)."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc.compilers.base import Builder
from veil.mpc.kernels import arith
from veil.plain import kernels as PK

__all__ = ["compile_tensor_op", "compile_concat", "compile_reduce"]


def _apply(node: Node, st: Any, v: np.ndarray) -> np.ndarray:
    a = node.attrs
    if node.op == "unsqueeze":
        return np.expand_dims(v, tuple(a["axes"]))
    if node.op == "squeeze":
        return np.squeeze(v, tuple(a["axes"]))
    if node.op == "slice":
        return np.ascontiguousarray(PK.onnx_slice(v, a["starts"], a["ends"], a["axes"], a["steps"]))
    return np.take(v, np.asarray(a["indices"], np.int64), axis=a["axis"])  # gather


def compile_tensor_op(b: Builder, node: Node, src: list[str]) -> None:
    b.local(node, partial(_apply, node), b.scale[src[0]], src[0])


def _concat(axis: int, ups: list[int], st: Any, *vs: np.ndarray) -> np.ndarray:
    return np.concatenate([arith.upscale_a(v, u) for v, u in zip(vs, ups, strict=True)], axis=axis)


def compile_concat(b: Builder, node: Node, src: list[str]) -> None:
    scales = {b.scale[i] for i in src}
    xs = src if len(scales) == 1 or max(scales) <= b.f else [b.at_f(i, node.name) for i in src]
    s = max(b.scale[i] for i in xs)
    b.local(node, partial(_concat, int(node.attrs["axis"]), [s - b.scale[i] for i in xs]), s, *xs)


def _reduce(axes: tuple[int, ...], keep: bool, inv: np.ndarray | None, st: Any, v: np.ndarray) -> np.ndarray:
    out = v.sum(axis=axes, keepdims=keep)
    return out if inv is None else arith.mul_ap(out, inv)


def compile_reduce(b: Builder, node: Node, src: list[str]) -> None:
    axes = tuple(int(a) for a in node.attrs["axes"])
    keep = bool(node.attrs["keepdims"])
    if node.op == "reduce_sum":
        b.local(node, partial(_reduce, axes, keep, None), b.scale[src[0]], src[0])
        return
    x = b.at_f(src[0], node.name)
    cnt = int(np.prod([b.shapes[x][a] for a in axes]))
    b.local(node, partial(_reduce, axes, keep, b.fp.encode(np.array(1.0 / cnt))), 2 * b.f, x)
