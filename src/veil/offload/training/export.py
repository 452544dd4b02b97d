"""Write a trained veil graph as an ONNX file that every veil mode (and onnxruntime) serves unchanged.

One ONNX operator per graph node (opset 17): linear -> Gemm (2-D input) or MatMul + Add, conv2d ->
Conv, pooling -> MaxPool/AveragePool/GlobalAveragePool, flatten -> Flatten, reshape -> Reshape with a
constant shape, add/add_const -> Add, mul_const -> Mul, relu/sigmoid/tanh/softmax as themselves.
The batch axis of every input and of the output is symbolic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from veil.errors import UnsupportedOpError
from veil.graph import Graph
from veil.plain import run_plain

__all__ = ["graph_to_onnx", "OPSET"]

OPSET = 17
_DT = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE, "int64": TensorProto.INT64}


def graph_to_onnx(graph: Graph, params: dict[str, np.ndarray] | None = None, name: str | None = None) -> onnx.ModelProto:
    """``graph`` with ``params`` (``"node/W"``, ``"node/b"``; default: the graph's own) as an ONNX model."""
    params = params or {}
    probe = {s.name: np.zeros(s.concrete(1), dtype=s.dtype) for s in graph.inputs}
    shapes = {k: v.shape for k, v in run_plain(graph, probe, keep=True).items()} if graph.inputs else {}
    ranks = {k: len(v) for k, v in shapes.items()}
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(nm: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a), nm))
        return nm

    def p(nd: Any, key: str) -> np.ndarray | None:
        v = params.get(f"{nd.name}/{key}", nd.params.get(key))
        return None if v is None else np.asarray(v, dtype=np.float32)

    for i, nd in enumerate(graph.nodes):
        x, out, tag = nd.inputs[0], nd.output, f"n{i}"
        at = nd.attrs
        if nd.op == "linear":
            w, b = p(nd, "W"), p(nd, "b")
            assert w is not None
            if ranks.get(x, 2) == 2:
                ins = [x, const(f"{tag}.W", w)] + ([const(f"{tag}.b", b)] if b is not None else [])
                nodes.append(helper.make_node("Gemm", ins, [out], name=nd.name, transB=1))
            elif b is None:
                nodes.append(helper.make_node("MatMul", [x, const(f"{tag}.Wt", w.T.copy())], [out], name=nd.name))
            else:
                nodes.append(helper.make_node("MatMul", [x, const(f"{tag}.Wt", w.T.copy())], [f"{tag}.mm"], name=nd.name))
                nodes.append(helper.make_node("Add", [f"{tag}.mm", const(f"{tag}.b", b)], [out], name=f"{nd.name}/bias"))
        elif nd.op == "conv2d":
            w, b = p(nd, "W"), p(nd, "b")
            assert w is not None
            ins = [x, const(f"{tag}.W", w)] + ([const(f"{tag}.b", b)] if b is not None else [])
            nodes.append(helper.make_node("Conv", ins, [out], name=nd.name, kernel_shape=list(w.shape[2:]),
                                          strides=list(at["strides"]), pads=list(at["pads"])))
        elif nd.op in ("relu", "sigmoid", "tanh"):
            nodes.append(helper.make_node(nd.op.capitalize(), [x], [out], name=nd.name))
        elif nd.op in ("maxpool", "avgpool"):
            kw: dict[str, Any] = {"kernel_shape": list(at["kernel"]), "strides": list(at["strides"]), "pads": list(at["pads"])}
            if nd.op == "avgpool":
                kw["count_include_pad"] = int(bool(at.get("count_include_pad", False)))
            nodes.append(helper.make_node("MaxPool" if nd.op == "maxpool" else "AveragePool", [x], [out], name=nd.name, **kw))
        elif nd.op == "global_avgpool":
            nodes.append(helper.make_node("GlobalAveragePool", [x], [out], name=nd.name))
        elif nd.op == "flatten":
            nodes.append(helper.make_node("Flatten", [x], [out], name=nd.name, axis=int(at["axis"])))
        elif nd.op == "reshape":
            nodes.append(helper.make_node("Reshape", [x, const(f"{tag}.shape", np.asarray(at["shape"], np.int64))], [out],
                                          name=nd.name))
        elif nd.op == "add":
            nodes.append(helper.make_node("Add", [x, nd.inputs[1]], [out], name=nd.name))
        elif nd.op in ("add_const", "mul_const"):
            c = const(f"{tag}.c", np.asarray(nd.params["c"], np.float32))
            nodes.append(helper.make_node("Add" if nd.op == "add_const" else "Mul", [x, c], [out], name=nd.name))
        elif nd.op == "softmax":
            nodes.append(helper.make_node("Softmax", [x], [out], name=nd.name, axis=int(at["axis"])))
        else:
            raise UnsupportedOpError(nd.name, nd.op, ["linear", "conv2d", "relu", "sigmoid", "tanh", "maxpool", "avgpool",
                                                     "global_avgpool", "flatten", "reshape", "add", "add_const",
                                                     "mul_const", "softmax"], where="ONNX export of a trained model")
    in_infos = [helper.make_tensor_value_info(s.name, _DT.get(s.dtype, TensorProto.FLOAT),
                                         ["batch" if d is None else d for d in s.shape]) for s in graph.inputs]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", *shapes[o][1:]]) for o in graph.outputs]
    g = helper.make_graph(nodes, name or graph.name, in_infos, outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="veil offload train")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
