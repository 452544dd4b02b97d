"""``avgpool`` and ``global_avgpool``: window sums (local) times the public ``1 / count``."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from veil.graph.ir import Node
from veil.mpc.compilers.base import Builder
from veil.mpc.kernels import arith
from veil.plain import kernels as PK

__all__ = ["compile_avgpool"]


def _global_sum(enc: np.ndarray, st: Any, v: np.ndarray) -> np.ndarray:
    return arith.mul_ap(v.sum(axis=(2, 3), keepdims=True), enc)


def _window_sum(a: dict[str, Any], enc: np.ndarray, st: Any, v: np.ndarray) -> np.ndarray:
    return arith.mul_ap(PK.pool_windows(v, a["kernel"], a["strides"], a["pads"], 0).sum(-1), enc)


def compile_avgpool(b: Builder, node: Node, src: list[str]) -> None:
    x = b.at_f(src[0], node.name)
    if node.op == "global_avgpool":
        h, w = b.shapes[x][2:]
        fn = partial(_global_sum, b.fp.encode(np.full((1, 1, 1, 1), 1.0 / (h * w))))
    else:
        a = node.attrs
        ones = np.ones((1, 1) + tuple(b.shapes[x][2:]))
        cnt = PK.pool_windows(ones, a["kernel"], a["strides"], a["pads"], 0).sum(-1)
        if a.get("count_include_pad", False) or not any(a["pads"]):
            cnt = np.full_like(cnt, float(np.prod(a["kernel"])))
        fn = partial(_window_sum, a, b.fp.encode(1.0 / cnt))
    b.local(node, fn, 2 * b.f, x)
