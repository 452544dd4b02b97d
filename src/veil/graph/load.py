"""One entry point for every model format veil accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from veil.errors import ModelError
from veil.graph.ir import Graph
from veil.graph.onnx_import import from_onnx

__all__ = ["load_model"]


def load_model(model: Any, example: Any = None, **kwargs: Any) -> Graph:
    """Load a model into veil's graph.

    ``model`` may be a path to an ``.onnx`` file, ONNX bytes, an ``onnx.ModelProto``, a veil
    :class:`Graph` (returned as is) or a ``torch.nn.Module`` (then ``example`` is an input tensor
    used for tracing).
    """
    if isinstance(model, Graph):
        return model
    if isinstance(model, str | Path):
        p = Path(model)
        if p.suffix.lower() not in (".onnx", ""):
            raise ModelError(f"model file {p.name!r}: expected an .onnx file (export PyTorch models with veil's from_torch)")
        return from_onnx(p, name=p.stem)
    if type(model).__module__.startswith("onnx") or isinstance(model, bytes):
        return from_onnx(model)
    mro = [c.__module__ + "." + c.__name__ for c in type(model).__mro__]
    if "torch.nn.modules.module.Module" in mro:
        if example is None:
            raise ModelError("a PyTorch module needs an example input for export: load_model(module, example=x)")
        from veil.graph.torch_import import from_torch

        return from_torch(model, example, **kwargs)
    raise ModelError(f"cannot load a model from {type(model).__name__}; expected an ONNX path/bytes/ModelProto or torch.nn.Module")
