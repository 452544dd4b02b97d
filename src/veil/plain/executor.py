"""The plain executor: runs any veil graph with NumPy. The oracle every mode is tested against."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from veil.errors import InputDtypeError, InputError, InputShapeError
from veil.graph.ir import Graph, Node
from veil.plain import kernels as K

__all__ = ["run_plain", "run_node", "check_inputs", "trace_shapes", "PLAIN_OPS"]

OpFn = Callable[[Node, list[np.ndarray]], np.ndarray]


def _linear(n: Node, xs: list[np.ndarray]) -> np.ndarray:
    y = xs[0] @ n.params["W"].T.astype(xs[0].dtype)
    return y + n.params["b"].astype(y.dtype) if "b" in n.params else y


def _conv(n: Node, xs: list[np.ndarray]) -> np.ndarray:
    dt = xs[0].dtype
    b = n.params.get("b")
    return K.conv2d(xs[0], n.params["W"].astype(dt), None if b is None else b.astype(dt), n.attrs["strides"],
                    n.attrs["pads"], group=int(n.attrs.get("group", 1)))


def _argmax(n: Node, xs: list[np.ndarray]) -> np.ndarray:
    y = np.argmax(xs[0], axis=n.attrs["axis"]).astype(np.int64)
    return np.expand_dims(y, n.attrs["axis"]) if n.attrs["keepdims"] else y


_OPS: dict[str, OpFn] = {
    "linear": _linear,
    "matmul": lambda n, xs: xs[0] @ xs[1],
    "conv2d": _conv,
    "relu": lambda n, xs: np.maximum(xs[0], 0),
    "maxpool": lambda n, xs: K.maxpool(xs[0], n.attrs["kernel"], n.attrs["strides"], n.attrs["pads"]),
    "avgpool": lambda n, xs: K.avgpool(xs[0], n.attrs["kernel"], n.attrs["strides"], n.attrs["pads"],
                                       n.attrs["count_include_pad"]).astype(xs[0].dtype),
    "global_avgpool": lambda n, xs: xs[0].mean(axis=(2, 3), keepdims=True),
    "flatten": lambda n, xs: K.flatten(xs[0], n.attrs["axis"]),
    "reshape": lambda n, xs: K.onnx_reshape(xs[0], n.attrs["shape"]),
    "transpose": lambda n, xs: np.transpose(xs[0], n.attrs["perm"]),
    "unsqueeze": lambda n, xs: np.expand_dims(xs[0], tuple(n.attrs["axes"])),
    "squeeze": lambda n, xs: np.squeeze(xs[0], tuple(n.attrs["axes"])),
    "concat": lambda n, xs: np.concatenate(xs, axis=n.attrs["axis"]),
    "slice": lambda n, xs: K.onnx_slice(xs[0], n.attrs["starts"], n.attrs["ends"], n.attrs["axes"], n.attrs["steps"]),
    "gather": lambda n, xs: np.take(xs[0], n.attrs["indices"], axis=n.attrs["axis"]),
    "reduce_mean": lambda n, xs: xs[0].mean(axis=tuple(n.attrs["axes"]), keepdims=n.attrs["keepdims"]),
    "reduce_sum": lambda n, xs: xs[0].sum(axis=tuple(n.attrs["axes"]), keepdims=n.attrs["keepdims"]),
    "add": lambda n, xs: xs[0] + xs[1],
    "sub": lambda n, xs: xs[0] - xs[1],
    "mul": lambda n, xs: xs[0] * xs[1],
    "add_const": lambda n, xs: xs[0] + n.params["c"].astype(xs[0].dtype),
    "mul_const": lambda n, xs: xs[0] * n.params["c"].astype(xs[0].dtype),
    "softmax": lambda n, xs: K.softmax(xs[0], n.attrs["axis"], n.params.get("mask")),
    "argmax": _argmax,
    "layernorm": lambda n, xs: K.layernorm(xs[0], n.params["gamma"].astype(xs[0].dtype),
                                           n.params["beta"].astype(xs[0].dtype), n.attrs["eps"]),
    "rmsnorm": lambda n, xs: K.rmsnorm(xs[0], n.params["gamma"].astype(xs[0].dtype), n.attrs["eps"]),
    "gelu": lambda n, xs: K.gelu(xs[0]),
    "gelu_tanh": lambda n, xs: K.gelu_tanh(xs[0]),
    "silu": lambda n, xs: K.silu(xs[0]),
    "reciprocal": lambda n, xs: 1.0 / xs[0],
    "sqrt": lambda n, xs: np.sqrt(xs[0]),
    "rsqrt": lambda n, xs: 1.0 / np.sqrt(xs[0]),
    "embedding": lambda n, xs: n.params["table"][np.asarray(xs[0], np.int64)],
    "erf": lambda n, xs: K.erf(xs[0]),
    "tanh": lambda n, xs: np.tanh(xs[0]),
    "sigmoid": lambda n, xs: K.sigmoid(xs[0]),
}
PLAIN_OPS: frozenset[str] = frozenset(_OPS)


def run_node(node: Node, inputs: list[np.ndarray]) -> np.ndarray:
    """One node on NumPy arrays (its inputs in order)."""
    return np.asarray(_OPS[node.op](node, inputs))


def check_inputs(graph: Graph, inputs: np.ndarray | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate inputs against the graph's declared inputs; return them as a name -> array dict.

    A bare array is accepted for a single-input graph. Float inputs of another float precision are
    cast to the declared dtype; anything else of the wrong dtype or shape is an :class:`InputError`
    naming both the given and the expected shape or dtype.
    """
    if not isinstance(inputs, Mapping):
        if len(graph.inputs) != 1:
            raise InputError(f"the model has {len(graph.inputs)} inputs {[s.name for s in graph.inputs]}: pass a dict")
        inputs = {graph.inputs[0].name: inputs}
    missing = [s.name for s in graph.inputs if s.name not in inputs]
    extra = [k for k in inputs if k not in {s.name for s in graph.inputs}]
    if missing or extra:
        raise InputError(f"inputs do not match the model: missing {missing}, unexpected {extra}; expected {[s.name for s in graph.inputs]}")
    out: dict[str, np.ndarray] = {}
    for spec in graph.inputs:
        raw = inputs[spec.name]
        if not isinstance(raw, np.ndarray):
            if hasattr(raw, "detach"):  # torch tensor
                raw = raw.detach().cpu().numpy()
            else:
                raise InputError(f"input {spec.name!r} is a {type(raw).__name__}; expected a numpy array")
        want = np.dtype(spec.dtype)
        if raw.dtype != want:
            if not (np.issubdtype(raw.dtype, np.floating) and np.issubdtype(want, np.floating)):
                raise InputDtypeError(spec.name, str(raw.dtype), str(want))
        if len(raw.shape) != len(spec.shape) or any(e is not None and e != g for g, e in zip(raw.shape, spec.shape, strict=False)):
            raise InputShapeError(spec.name, raw.shape, spec.shape)
        if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
            raise InputError(f"input {spec.name!r} contains NaN or infinite values")
        out[spec.name] = raw.astype(want, copy=False)
    return out


def run_plain(graph: Graph, inputs: np.ndarray | Mapping[str, Any], dtype: Any = None,
              keep: bool = False) -> dict[str, np.ndarray]:
    """Run ``graph`` on ``inputs`` with NumPy; return ``{output_name: array}``.

    ``dtype`` (e.g. ``np.float64``) overrides the compute precision; ``keep=True`` returns every
    intermediate tensor as well (useful to compare modes layer by layer).
    """
    env: dict[str, np.ndarray] = dict(check_inputs(graph, inputs))
    if dtype is not None:  # the compute precision of float tensors; integer inputs (token ids) stay integers
        env = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in env.items()}
    for node in graph.nodes:
        fn = _OPS[node.op]
        env[node.output] = np.asarray(fn(node, [env[i] for i in node.inputs]))
    if keep:
        return env
    return {o: env[o] for o in graph.outputs}


def trace_shapes(graph: Graph, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor for a given batch size (by running the graph on zeros)."""
    zeros = {s.name: np.zeros(s.concrete(batch), np.dtype(s.dtype)) for s in graph.inputs}
    with np.errstate(all="ignore"):  # zeros through reciprocal/rsqrt: only shapes matter here
        env = run_plain(graph, zeros, keep=True)
    return {k: tuple(v.shape) for k, v in env.items()}
