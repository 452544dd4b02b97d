"""Helpers for the offload-training tests: small graphs built node by node, and a torch mirror of them."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from veil.graph import Graph, Node, TensorSpec
from veil.offload import SimulatedEnclaveRuntime


def runtime(key_file: Any = None) -> SimulatedEnclaveRuntime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SimulatedEnclaveRuntime(hazmat_allow_simulation=True, key_file=key_file)


def small_cnn(seed: int = 0, pool: str = "max", act: str = "relu", head_act: str | None = None) -> Graph:
    """conv(1->3, 3x3, stride 1, pad 1) act pool(2) conv(3->4, 3x3, stride 2, pad 1) act flatten linear(16->5)."""
    g = np.random.default_rng(seed)
    w1, b1 = g.normal(0, 0.4, (3, 1, 3, 3)), g.normal(0, 0.1, 3)
    w2, b2 = g.normal(0, 0.3, (4, 3, 3, 3)), g.normal(0, 0.1, 4)
    w3, b3 = g.normal(0, 0.3, (5, 16)), g.normal(0, 0.1, 5)
    f32 = np.float32
    pool_node = (Node("pool", "maxpool", ("a1",), "p1", {}, {"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 0, 0)})
                 if pool == "max" else
                 Node("pool", "avgpool", ("a1",), "p1", {}, {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1),
                                                             "count_include_pad": pool == "avg_incl"}))
    nodes = [
        Node("c1", "conv2d", ("x",), "h1", {"W": w1.astype(f32), "b": b1.astype(f32)}, {"strides": (1, 1), "pads": (1, 1, 1, 1)}),
        Node("act1", act, ("h1",), "a1"),
        pool_node,
        Node("c2", "conv2d", ("p1",), "h2", {"W": w2.astype(f32), "b": b2.astype(f32)}, {"strides": (2, 2), "pads": (1, 1, 1, 1)}),
        Node("act2", act, ("h2",), "a2"),
        Node("fl", "flatten", ("a2",), "f", {}, {"axis": 1}),
        Node("fc", "linear", ("f",), "logits" if head_act is None else "z", {"W": w3.astype(f32), "b": b3.astype(f32)}),
    ]
    if head_act is not None:
        nodes.append(Node("head", head_act, ("z",), "logits", {}, {"axis": -1} if head_act == "softmax" else {}))
    return Graph(nodes, [TensorSpec("x", (None, 1, 8, 8))], ["logits"], name="small_cnn")


def small_residual(seed: int = 0) -> Graph:
    """Two inputs (one-hot 'cat0' (6) and 'dense' (3)), embeddings summed, a residual unit, global-avgpool-free
    MLP head with sigmoid; plus add_const/mul_const/reshape/tanh/global_avgpool on a side branch that joins."""
    g = np.random.default_rng(seed)
    f32 = np.float32
    e = g.normal(0, 0.5, (4, 6)).astype(f32)
    wd, bd = g.normal(0, 0.5, (4, 3)).astype(f32), g.normal(0, 0.1, 4).astype(f32)
    w1, b1 = g.normal(0, 0.5, (5, 4)).astype(f32), g.normal(0, 0.1, 5).astype(f32)
    w2, b2 = g.normal(0, 0.5, (4, 5)).astype(f32), g.normal(0, 0.1, 4).astype(f32)
    wo, bo = g.normal(0, 0.5, (1, 4)).astype(f32), g.normal(0, 0.1, 1).astype(f32)
    nodes = [
        Node("emb", "linear", ("cat0",), "e0", {"W": e}),
        Node("dense", "linear", ("dense",), "d0", {"W": wd, "b": bd}),
        Node("stack", "add", ("e0", "d0"), "h"),
        Node("r1", "linear", ("h",), "r1", {"W": w1, "b": b1}),
        Node("r1a", "relu", ("r1",), "r1a"),
        Node("r2", "linear", ("r1a",), "r2", {"W": w2, "b": b2}),
        Node("res", "add", ("h", "r2"), "hr"),
        Node("resa", "relu", ("hr",), "u"),
        Node("shape", "reshape", ("u",), "u4", {}, {"shape": (-1, 4, 1, 1)}),
        Node("gap", "global_avgpool", ("u4",), "g4"),
        Node("flat", "flatten", ("g4",), "g", {}, {"axis": 1}),
        Node("scale", "mul_const", ("g",), "gs", {"c": np.array([1.5, 0.5, -1.0, 2.0], f32)}),
        Node("shift", "add_const", ("gs",), "gt", {"c": np.array([0.1], f32)}),
        Node("tanh", "tanh", ("gt",), "t"),
        Node("join", "add", ("u", "t"), "v"),
        Node("out", "linear", ("v",), "z", {"W": wo, "b": bo}),
        Node("sig", "sigmoid", ("z",), "p"),
    ]
    return Graph(nodes, [TensorSpec("cat0", (None, 6)), TensorSpec("dense", (None, 3))], ["p"], name="small_residual")


def torch_mirror(graph: Graph, params: dict[str, Any], feeds: dict[str, Any]) -> Any:
    """Evaluate ``graph`` with torch functional ops (float64, autograd through ``params``)."""
    import torch
    import torch.nn.functional as F

    env = {k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in feeds.items()}
    for nd in graph.nodes:
        x, at = env[nd.inputs[0]], nd.attrs
        if nd.op == "linear":
            y = x @ params[f"{nd.name}/W"].T
            if f"{nd.name}/b" in params:
                y = y + params[f"{nd.name}/b"]
        elif nd.op == "conv2d":
            t, left, b, r = at["pads"]
            y = F.conv2d(F.pad(x, (left, r, t, b)), params[f"{nd.name}/W"], params.get(f"{nd.name}/b"), stride=at["strides"])
        elif nd.op == "relu":
            y = torch.relu(x)
        elif nd.op == "sigmoid":
            y = torch.sigmoid(x)
        elif nd.op == "tanh":
            y = torch.tanh(x)
        elif nd.op == "maxpool":
            t, left, b, r = at["pads"]
            y = F.max_pool2d(F.pad(x, (left, r, t, b), value=-float("inf")), at["kernel"], at["strides"])
        elif nd.op == "avgpool":
            t, left, b, r = at["pads"]
            assert t == b and left == r
            y = F.avg_pool2d(x, at["kernel"], at["strides"], padding=(t, left), count_include_pad=at["count_include_pad"])
        elif nd.op == "global_avgpool":
            y = x.mean(dim=(2, 3), keepdim=True)
        elif nd.op == "flatten":
            y = x.reshape(x.shape[0], -1)
        elif nd.op == "reshape":
            y = x.reshape(*at["shape"])
        elif nd.op == "add":
            y = x + env[nd.inputs[1]]
        elif nd.op == "add_const":
            y = x + torch.as_tensor(np.asarray(nd.params["c"], np.float64))
        elif nd.op == "mul_const":
            y = x * torch.as_tensor(np.asarray(nd.params["c"], np.float64))
        elif nd.op == "softmax":
            y = torch.softmax(x, dim=at["axis"])
        else:
            raise AssertionError(nd.op)
        env[nd.output] = y
    return env[graph.outputs[0]]


class DirectSecureMatmul:
    """Factory of a SecureMatmul whose three accelerators are called in this thread (no channels), for
    fast protocol tests. ``accs`` maps accelerator name -> TrainAccelerator."""

    @staticmethod
    def make(rt: Any, accs: dict[str, Any], reps: int = 1) -> Any:
        from veil.offload.training.protocol import SecureMatmul

        class _Direct(SecureMatmul):
            def __init__(self) -> None:
                super().__init__(None, rt, freivalds_reps=reps)  # type: ignore[arg-type]
                self.box: dict[str, Any] = {}

            def _send(self, acc: str, msg: Any) -> None:
                self.box[acc] = accs[acc].handle(msg)

            def _recv(self, acc: str) -> Any:
                return self.box.pop(acc)

        return _Direct()
