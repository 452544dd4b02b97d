"""Output shape of every veil op from its input shapes, without computing anything.

Used by the importer to know static shapes while it converts (a symbolic batch dim is carried as
:data:`veil.graph.fold.SYMBOLIC`, an ordinary integer here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from veil.graph.ir import Node
from veil.plain.kernels import conv_out_hw

__all__ = ["node_shape"]

Shape = tuple[int, ...]

_SAME = {"relu", "softmax", "layernorm", "rmsnorm", "gelu", "gelu_tanh", "silu", "erf", "tanh", "sigmoid",
         "reciprocal", "sqrt", "rsqrt"}


def _reshape(src: Shape, target: Sequence[int]) -> Shape:
    out = [src[i] if d == 0 else int(d) for i, d in enumerate(target)]
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=object))
        total = int(np.prod(src, dtype=object))
        out[out.index(-1)] = total // known if known else 0
    return tuple(out)


def node_shape(n: Node, ins: Sequence[Shape]) -> Shape:
    """The output shape of ``n`` given its inputs' shapes."""
    op, a = n.op, n.attrs
    x = tuple(ins[0]) if ins else ()
    if op in _SAME:
        if op == "softmax" and "mask" in n.params:
            return tuple(np.broadcast_shapes(x, n.params["mask"].shape))
        return x
    if op in ("add", "sub", "mul"):
        return tuple(np.broadcast_shapes(x, tuple(ins[1])))
    if op in ("add_const", "mul_const"):
        return tuple(np.broadcast_shapes(x, n.params["c"].shape))
    if op == "linear":
        return x[:-1] + (int(n.params["W"].shape[0]),)
    if op == "matmul":
        b = tuple(ins[1])
        batch = tuple(np.broadcast_shapes(x[:-2], b[:-2]))
        return batch + (x[-2], b[-1])
    if op == "embedding":
        return x + (int(n.params["table"].shape[1]),)
    if op == "conv2d":
        w = n.params["W"]
        oh, ow = conv_out_hw(x[2], x[3], w.shape[2:], a["strides"], a["pads"])
        return (x[0], int(w.shape[0]), oh, ow)
    if op in ("maxpool", "avgpool"):
        oh, ow = conv_out_hw(x[2], x[3], a["kernel"], a["strides"], a["pads"])
        return (x[0], x[1], oh, ow)
    if op == "global_avgpool":
        return x[:2] + (1, 1)
    if op == "flatten":
        ax = a["axis"] % len(x) if x else 0
        return (int(np.prod(x[:ax], dtype=object)), int(np.prod(x[ax:], dtype=object)))
    if op == "reshape":
        return _reshape(x, a["shape"])
    if op == "transpose":
        return tuple(x[p] for p in a["perm"])
    if op == "unsqueeze":
        out = list(x)
        for ax in sorted(a["axes"]):
            out.insert(ax, 1)
        return tuple(out)
    if op == "squeeze":
        return tuple(d for i, d in enumerate(x) if i not in set(a["axes"]))
    if op == "concat":
        ax = a["axis"]
        return x[:ax] + (sum(s[ax] for s in ins),) + x[ax + 1:]
    if op == "slice":
        out = list(x)
        for s, e, ax, st in zip(a["starts"], a["ends"], a["axes"], a["steps"], strict=True):
            out[ax] = len(range(*slice(s, e, st).indices(x[ax])))
        return tuple(out)
    if op == "gather":
        ax = a["axis"]
        return x[:ax] + tuple(np.shape(a["indices"])) + x[ax + 1:]
    if op in ("reduce_mean", "reduce_sum"):
        axes = set(a["axes"])
        if a["keepdims"]:
            return tuple(1 if i in axes else d for i, d in enumerate(x))
        return tuple(d for i, d in enumerate(x) if i not in axes)
    if op == "argmax":
        ax = a["axis"] % len(x)
        return tuple(1 if i == ax else d for i, d in enumerate(x)) if a["keepdims"] else x[:ax] + x[ax + 1:]
    raise KeyError(op)
