"""A model the server can serve: ONNX bytes checked, an onnxruntime session, and input validation.

Upload-time checks (a refusal names the reason): the bytes parse as ONNX; no tensor refers to
external data (which onnxruntime would read from the server's disk); onnxruntime accepts the graph;
every input has a supported dtype. Run-time checks: input names, dtypes, ranks and fixed
dimensions match the model's declaration before onnxruntime sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from veil.attested.tensors import INPUT_DTYPES, ORT_TYPE_TO_DTYPE

__all__ = ["ModelRejected", "InputRejected", "TensorDecl", "ServedModel", "load_served_model"]


class ModelRejected(ValueError):
    """The bytes are not a model the server can serve (message is safe to return)."""


class InputRejected(ValueError):
    """Inputs do not match the model (message is safe to return)."""


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype,
                "shape": [d if isinstance(d, int) else None for d in self.shape]}


def _tensors_of_graph(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors_of_graph(attr.g)
            for g in attr.graphs:
                yield from _tensors_of_graph(g)


def _short(msg: str) -> str:
    line = str(msg).strip().splitlines()[0] if str(msg).strip() else "unknown error"
    return line[:300]


class ServedModel:
    def __init__(self, sha256: str, session: ort.InferenceSession):
        self.sha256 = sha256
        self.session = session
        self.inputs = [TensorDecl(i.name, ORT_TYPE_TO_DTYPE.get(i.type, i.type), tuple(i.shape))
                       for i in session.get_inputs()]
        self.outputs = [TensorDecl(o.name, ORT_TYPE_TO_DTYPE.get(o.type, o.type), tuple(o.shape))
                        for o in session.get_outputs()]

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        declared = {d.name: d for d in self.inputs}
        missing = [n for n in declared if n not in feeds]
        unknown = [n for n in feeds if n not in declared]
        if missing or unknown:
            raise InputRejected(f"inputs do not match the model: missing {missing}, unknown {unknown}; "
                                f"the model takes {list(declared)}")
        for name, arr in feeds.items():
            d = declared[name]
            if arr.dtype.name != d.dtype:
                raise InputRejected(f"input {name!r} has dtype {arr.dtype.name}, but the model expects {d.dtype}")
            if arr.ndim != len(d.shape) or any(isinstance(e, int) and e != g for e, g in zip(d.shape, arr.shape,
                                                                                            strict=True)):
                exp = "(" + ", ".join(str(e) if isinstance(e, int) else "?" for e in d.shape) + ")"
                raise InputRejected(f"input {name!r} has shape {tuple(arr.shape)}, but the model expects {exp}")

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        self.check_inputs(feeds)
        names = output_names or [o.name for o in self.outputs]
        unknown = [n for n in names if n not in {o.name for o in self.outputs}]
        if unknown:
            raise InputRejected(f"unknown outputs requested: {unknown}")
        try:
            values = self.session.run(names, feeds)
        except Exception as e:  # onnxruntime raises its own classes; the message holds names and shapes
            raise InputRejected(f"the model could not run on these inputs: {_short(str(e))}") from None
        return dict(zip(names, values, strict=True))


def load_served_model(data: bytes, sha256: str, intra_op_threads: int = 1) -> ServedModel:
    try:
        proto = onnx.load_model_from_string(data)
    except Exception:
        raise ModelRejected("the uploaded bytes are not a valid ONNX model (protobuf parse failed)") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelRejected("the uploaded ONNX model has an empty graph")
    for t in _tensors_of_graph(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelRejected(f"tensor {t.name!r} refers to external data; upload a self-contained model")
    del proto
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelRejected(f"onnxruntime cannot load the model: {_short(str(e))}") from None
    model = ServedModel(sha256, session)
    for d in model.inputs:
        if d.dtype not in INPUT_DTYPES:
            raise ModelRejected(f"input {d.name!r} has type {d.dtype}; supported input dtypes: {', '.join(INPUT_DTYPES)}")
    return model
