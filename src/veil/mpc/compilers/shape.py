"""Shape ops on shares: local, no communication, scale unchanged."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc.compilers.base import Builder
from veil.plain import kernels as PK

__all__ = ["compile_shape", "SHAPE_FNS", "apply_shape_op"]


def _flatten(a: dict[str, Any], v: np.ndarray) -> np.ndarray:
    return PK.flatten(v, a["axis"])


def _reshape(a: dict[str, Any], v: np.ndarray) -> np.ndarray:
    return PK.onnx_reshape(v, a["shape"])


def _transpose(a: dict[str, Any], v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(v, a["perm"]))


SHAPE_FNS = {"flatten": _flatten, "reshape": _reshape, "transpose": _transpose}


def apply_shape_op(node: Node, v: np.ndarray) -> np.ndarray:
    """The shape op of ``node`` on an array (shares, or the user's own input)."""
    return SHAPE_FNS[node.op](node.attrs, v)


def _run_shape(node: Node, st: Any, v: np.ndarray) -> np.ndarray:
    return apply_shape_op(node, v)


def compile_shape(b: Builder, node: Node, src: list[str]) -> None:
    b.local(node, partial(_run_shape, node), b.scale[src[0]], src[0])
