"""Constant folding at import: static shapes and ONNX nodes whose inputs are all constants.

The importer tracks every tensor's shape (:mod:`veil.graph.shapes`) with each symbolic input dim
(the batch) replaced by :data:`SYMBOLIC`, a sentinel value. ``Shape`` of an activation then becomes a constant holding the
sentinel where the batch goes, and the usual ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``
chains (``x.view(x.size(0), -1)``, Hugging Face exports) fold into constants that the importer
turns into a reshape with ``0`` (copy the batch dim) or ``-1``. Nodes whose inputs are all constants
are evaluated once with ONNX's reference implementation (:mod:`onnx.reference`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from veil.errors import ModelError

__all__ = ["SYMBOLIC", "fold_node", "has_symbolic"]

#: stands for a symbolic dim (the batch) while shapes are folded; a prime nobody uses as a size.
SYMBOLIC = 999_983

# ops that create tensors whose size comes from their inputs' values: refused if that value is symbolic
_SIZE_FROM_VALUE = {"ConstantOfShape", "Expand", "Range", "Tile", "Resize", "Pad"}


def has_symbolic(a: np.ndarray) -> bool:
    """Whether an integer array holds a symbolic dim (or a multiple of one)."""
    return a.dtype.kind in "iu" and bool(np.any((a != 0) & (a % SYMBOLIC == 0)))


def _gather_elements(node: onnx.NodeProto, v: list[Any]) -> list[np.ndarray]:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    data, idx = v[0], v[1].astype(np.int64)
    return [np.take_along_axis(data, np.where(idx < 0, idx + data.shape[axis], idx), axis=axis)]


# NumPy versions where onnx.reference is wrong (GatherElements broadcasts its index in onnx 1.23)
_NUMPY: dict[str, Any] = {"GatherElements": _gather_elements}


def fold_node(node: onnx.NodeProto, values: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Evaluate ``node`` on constant inputs with the ONNX reference implementation."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type in _SIZE_FROM_VALUE and any(v is not None and has_symbolic(v) for v in values):
        raise ModelError(f"node {node.name or node.output[0]!r} ({node.op_type}) builds a tensor whose size depends on "
                         "the batch; export the model with a static batch size")
    if node.op_type in _NUMPY:
        return [np.asarray(r) for r in _NUMPY[node.op_type](node, values)]
    feeds: dict[str, Any] = {n: v for n, v in zip(node.input, values, strict=True) if n}
    model = onnx.helper.make_model(
        onnx.helper.make_graph([node], "fold", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                                               for n in feeds], [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                                                                  for o in node.output if o]),
        opset_imports=[onnx.helper.make_opsetid(node.domain or "", opset)])
    try:
        res = ReferenceEvaluator(model).run(None, feeds)
    except Exception as e:
        raise ModelError(f"node {node.name or node.output[0]!r} ({node.op_type}): folding its constant inputs "
                         f"failed ({type(e).__name__}); expected an operator of the standard ONNX domain") from None
    return [np.asarray(r) for r in res]
