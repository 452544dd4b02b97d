"""veil's model graph (IR) and importers."""

from veil.graph.ir import OPS, Graph, Node, TensorSpec
from veil.graph.load import MODE_OPS, load_model, mode_ops
from veil.graph.onnx_import import SUPPORTED_ONNX_OPS, from_onnx, onnx_ops_for

__all__ = ["OPS", "Graph", "Node", "TensorSpec", "load_model", "mode_ops", "MODE_OPS", "from_onnx", "onnx_ops_for",
           "SUPPORTED_ONNX_OPS"]
