"""veil's model graph: a small, typed, topologically ordered list of ops with their weights.

Every protection mode runs this graph; the plain executor (:mod:`veil.plain`) is the oracle.

Op vocabulary (``Node.op``), with the meaning of ``params`` and ``attrs``:

=================  ===============================================================================
op                 semantics
=================  ===============================================================================
linear             ``y = x @ W.T + b`` on the last axis; params ``W`` (out, in), optional ``b`` (out,)
matmul             ``y = a @ b`` of two activations (numpy rules: batch dims broadcast)
conv2d             NCHW convolution, dilation 1; params ``W`` (O, I/group, kh, kw), optional ``b``;
                   attrs ``strides`` (sh, sw), ``pads`` (top, left, bottom, right), ``group``
                   (optional, default 1; group == channels is a depthwise convolution)
relu               ``max(x, 0)``
maxpool            attrs ``kernel`` (kh, kw), ``strides``, ``pads`` (padding is -inf)
avgpool            attrs ``kernel``, ``strides``, ``pads``, ``count_include_pad`` (bool)
global_avgpool     mean over H, W keeping dims (N, C, 1, 1)
flatten            attrs ``axis``: reshape to (prod(shape[:axis]), prod(shape[axis:]))
reshape            attrs ``shape``: ONNX semantics (0 copies the input dim, -1 is inferred)
transpose          attrs ``perm``
unsqueeze          attrs ``axes`` (non-negative, in the output's rank)
squeeze            attrs ``axes`` (non-negative, in the input's rank)
concat             attrs ``axis`` (non-negative); one or more activations
slice              attrs ``starts``, ``ends``, ``axes`` (non-negative), ``steps``: ONNX Slice, clamped
gather             attrs ``axis`` (non-negative), ``indices`` (public int64 array): ``np.take``
add, sub, mul      element-wise on two activations (numpy broadcasting)
add_const          ``x + c``; params ``c`` (broadcastable, public)
mul_const          ``x * c``; params ``c`` (broadcastable, public)
reduce_mean        attrs ``axes`` (non-negative), ``keepdims`` (bool)
reduce_sum         attrs ``axes`` (non-negative), ``keepdims`` (bool)
softmax            attrs ``axis`` (non-negative); optional params ``mask``: a public additive constant
                   broadcastable to x (0 or finite, ``-inf`` excludes an entry); ``softmax(x + mask)``
argmax             attrs ``axis``, ``keepdims`` (bool); output dtype int64
layernorm          over the last axis; params ``gamma``, ``beta``; attrs ``eps``
rmsnorm            over the last axis: ``x / sqrt(mean(x^2) + eps) * gamma``; params ``gamma``; attrs ``eps``
gelu               exact (erf) GELU: ``x/2 (1 + erf(x/sqrt 2))``
gelu_tanh          ``x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
silu               ``x * sigmoid(x)``
erf, tanh, sigmoid element-wise
reciprocal         ``1 / x``
sqrt, rsqrt        ``sqrt(x)``, ``1 / sqrt(x)``
embedding          input: integer ids; params ``table`` (V, D); ``y = table[ids]`` of shape ids.shape + (D,)
=================  ===============================================================================

``graph.meta["state"]`` (optional) maps input names to output names whose values of one call are the
inputs of the next (a decoder's key/value cache, see :mod:`veil.models.llama`).

Modes may support a subset; each checks the graph at load time (:func:`Graph.require_ops`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veil.errors import UnsupportedOpError

__all__ = ["Node", "TensorSpec", "Graph", "OPS"]

OPS: frozenset[str] = frozenset(
    {
        "linear", "matmul", "conv2d", "relu", "maxpool", "avgpool", "global_avgpool", "flatten",
        "reshape", "transpose", "unsqueeze", "squeeze", "concat", "slice", "gather", "add", "sub", "mul",
        "add_const", "mul_const", "reduce_mean", "reduce_sum", "softmax", "argmax", "layernorm", "rmsnorm",
        "gelu", "gelu_tanh", "silu", "erf", "tanh", "sigmoid", "reciprocal", "sqrt", "rsqrt", "embedding",
    }
)


@dataclass(frozen=True)
class TensorSpec:
    """A declared graph input: name, shape (``None`` for a symbolic dim such as the batch) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def concrete(self, batch: int = 1) -> tuple[int, ...]:
        """The shape with every symbolic dim replaced by ``batch``."""
        return tuple(batch if d is None else d for d in self.shape)


@dataclass
class Node:
    """One op. ``inputs`` and ``output`` are tensor names; weights live in ``params``."""

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise UnsupportedOpError(self.name, self.op, OPS, where="veil's graph")
        self.inputs = tuple(self.inputs)

    def __repr__(self) -> str:  # never print weight values
        ps = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.params.items())
        return f"Node({self.name!r}, {self.op}, in={list(self.inputs)}, out={self.output!r}, params=[{ps}], attrs={self.attrs})"


@dataclass
class Graph:
    """A model as veil runs it. Nodes are in topological order."""

    nodes: list[Node]
    inputs: list[TensorSpec]
    outputs: list[str]
    name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ops(self) -> set[str]:
        return {n.op for n in self.nodes}

    def require_ops(self, supported: Iterable[str], where: str) -> None:
        """Raise :class:`UnsupportedOpError` for the first node a mode cannot run."""
        sup = set(supported)
        for n in self.nodes:
            if n.op not in sup:
                raise UnsupportedOpError(n.name, n.op, sup, where=where)

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    def num_params(self) -> int:
        return int(sum(p.size for n in self.nodes for p in n.params.values()))

    def summary(self) -> str:
        lines = [f"graph {self.name!r}: {len(self.nodes)} nodes, {self.num_params():,} parameters"]
        for spec in self.inputs:
            lines.append(f"  input  {spec.name} {spec.shape} {spec.dtype}")
        for n in self.nodes:
            lines.append(f"  {n.op:<15} {n.name}")
        lines.append(f"  output {', '.join(self.outputs)}")
        return "\n".join(lines)
