"""Local element-wise ops: ``add``, ``sub`` (aligning scales by exact upscaling), ``add_const``,
``mul_const`` (public constants encoded at the tensor's scale / at f)."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc.compilers.base import Builder
from veil.mpc.kernels import arith

__all__ = ["compile_add_sub", "compile_add_const", "compile_mul_const"]


def _add_sub(ups: list[int], sub: bool, st: Any, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u, v = arith.upscale_a(u, ups[0]), arith.upscale_a(v, ups[1])
    return u - v if sub else u + v


def compile_add_sub(b: Builder, node: Node, src: list[str]) -> None:
    s = max(b.scale[src[0]], b.scale[src[1]])
    b.local(node, partial(_add_sub, [s - b.scale[i] for i in src], node.op == "sub"), s, *src)


def _add_const(c: np.ndarray, st: Any, v: np.ndarray) -> np.ndarray:
    return arith.add_ap(st.ctx, v, c)


def compile_add_const(b: Builder, node: Node, src: list[str]) -> None:
    s = b.scale[src[0]]
    b.local(node, partial(_add_const, b.fp.encode(node.params["c"], scale=s)), s, src[0])


def _mul_const(c: np.ndarray, st: Any, v: np.ndarray) -> np.ndarray:
    return arith.mul_ap(v, c)


def compile_mul_const(b: Builder, node: Node, src: list[str]) -> None:
    x = b.at_f(src[0], node.name)
    b.local(node, partial(_mul_const, b.fp.encode(node.params["c"])), 2 * b.f, x)
