"""The public description of a model: its architecture without the secret weights.

The owner sends it to every party: the servers and the dealer need shapes and attributes, the
user needs the input specification and the input range. Secret: ``W`` and ``b`` of ``linear`` and
``conv2d``, the ``table`` of ``embedding``, ``gamma``/``beta`` of ``layernorm`` and ``rmsnorm`` (shared
between the servers). Public: the graph structure, every shape, attributes, and
the constants of ``add_const`` / ``mul_const`` (treated as architecture, e.g. input normalisation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.graph.ir import Graph, Node, TensorSpec
from veil.mpc.compilers.public import public_inputs

__all__ = ["SECRET_PARAMS", "to_public", "from_public", "secret_params"]

SECRET_PARAMS = {"linear": ("W", "b"), "conv2d": ("W", "b"), "embedding": ("table",), "layernorm": ("gamma", "beta"),
                 "rmsnorm": ("gamma",)}


def secret_params(graph: Graph) -> dict[str, np.ndarray]:
    """``{"node/param": array}`` of every secret weight."""
    out = {}
    for n in graph.nodes:
        for p in SECRET_PARAMS.get(n.op, ()):
            if p in n.params:
                out[f"{n.name}/{p}"] = np.asarray(n.params[p], np.float64)
    return out


def to_public(graph: Graph) -> dict[str, Any]:
    nodes = []
    for n in graph.nodes:
        secret = SECRET_PARAMS.get(n.op, ())
        nodes.append({
            "name": n.name, "op": n.op, "inputs": list(n.inputs), "output": n.output,
            "attrs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in n.attrs.items()},
            "shapes": {k: list(v.shape) for k, v in n.params.items() if k in secret},
            "public": {k: np.asarray(v, np.float64) for k, v in n.params.items() if k not in secret},
        })
    return {"name": graph.name, "nodes": nodes, "outputs": list(graph.outputs),
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in graph.inputs],
            "state": dict(graph.meta.get("state", {}) or {}),
            "public_inputs": public_inputs(graph)}


def from_public(desc: dict[str, Any]) -> Graph:
    """A graph with zero placeholders for the secret weights (shapes only)."""
    nodes = []
    for d in desc["nodes"]:
        params = {k: np.zeros(tuple(s), np.float32) for k, s in d["shapes"].items()}
        params.update({k: np.asarray(v) for k, v in d["public"].items()})
        attrs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["attrs"].items()}
        nodes.append(Node(d["name"], d["op"], tuple(d["inputs"]), d["output"], params, attrs))
    inputs = [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in desc["inputs"]]
    return Graph(nodes, inputs, list(desc["outputs"]), desc["name"], meta={"state": dict(desc.get("state", {})),
                                                                   "public_inputs": dict(desc.get("public_inputs", {}))})
