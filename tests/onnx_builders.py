"""Build one-node (or few-node) ONNX models for checking veil against onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Mapping[str, Sequence[int | None]],
               outputs: Sequence[str], inits: Mapping[str, np.ndarray] | None = None, opset: int = 17,
               out_types: Mapping[str, int] | None = None) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [int(d) if d is not None else "N" for d in v])
           for k, v in inputs.items()]
    inits_p = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    # declare outputs with the types onnx's shape inference finds for them
    probe = helper.make_model(helper.make_graph(list(nodes), "t", ins, [], inits_p),
                              opset_imports=[helper.make_opsetid("", opset)])
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(probe).graph.value_info}
    outs = []
    for o in outputs:
        if o in inferred:
            outs.append(inferred[o])
        else:
            outs.append(helper.make_tensor_value_info(o, (out_types or {}).get(o, TensorProto.FLOAT), ["d0"]))
    g = helper.make_graph(list(nodes), "t", ins, outs, inits_p)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, Any]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))
