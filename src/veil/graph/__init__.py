"""veil's model graph (IR) and importers."""

from veil.graph.ir import OPS, Graph, Node, TensorSpec
from veil.graph.load import load_model
from veil.graph.onnx_import import SUPPORTED_ONNX_OPS, from_onnx

__all__ = ["OPS", "Graph", "Node", "TensorSpec", "load_model", "from_onnx", "SUPPORTED_ONNX_OPS"]
