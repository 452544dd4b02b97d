"""One entry point for every model format veil accepts."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from veil.errors import ModelError
from veil.graph.ir import Graph
from veil.graph.onnx_import import from_onnx

__all__ = ["load_model", "mode_ops", "MODE_OPS"]

#: where each mode declares the veil ops it runs (module, attribute); imported on use
MODE_OPS: dict[str, tuple[str, str]] = {
    "plain": ("veil.plain.executor", "PLAIN_OPS"),
    "mpc": ("veil.mpc.program", "MPC_OPS"),
    "offload": ("veil.offload.compile", "OFFLOAD_OPS"),
}


def mode_ops(mode: str) -> frozenset[str]:
    """The veil ops that ``mode`` runs (each mode declares its own set)."""
    if mode not in MODE_OPS:
        raise ModelError(f"mode {mode!r} runs no veil graph; modes with a graph executor: {', '.join(MODE_OPS)}")
    module, attr = MODE_OPS[mode]
    return frozenset(getattr(importlib.import_module(module), attr))


def load_model(model: Any, example: Any = None, mode: str | None = None, **kwargs: Any) -> Graph:
    """Load a model into veil's graph.

    ``model`` may be a path to an ``.onnx`` file, ONNX bytes, an ``onnx.ModelProto``, a veil
    :class:`Graph` (returned as is) or a ``torch.nn.Module`` (then ``example`` is an input tensor
    used for tracing). With ``mode`` (``"mpc"``, ``"offload"``, ``"plain"``) an operator that mode
    cannot run is refused at load, and the error lists the operators that mode runs.
    """
    if mode is None:
        return _load(model, example, **kwargs)
    ops, where = mode_ops(mode), f"{mode} mode"
    if not isinstance(model, Graph) and not _is_torch(model):  # the importer lists the ONNX ops the mode runs
        kwargs = {"supported": ops, "where": where, **kwargs}
    graph = _load(model, example, **kwargs)
    graph.require_ops(ops, where=where)
    return graph


def _is_torch(model: Any) -> bool:
    return "torch.nn.modules.module.Module" in [c.__module__ + "." + c.__name__ for c in type(model).__mro__]


def _load(model: Any, example: Any = None, **kwargs: Any) -> Graph:
    if isinstance(model, Graph):
        return model
    if isinstance(model, str | Path):
        p = Path(model)
        if p.suffix.lower() not in (".onnx", ""):
            raise ModelError(f"model file {p.name!r}: expected an .onnx file (export PyTorch models with veil's from_torch)")
        return from_onnx(p, name=p.stem, **kwargs)
    if type(model).__module__.startswith("onnx") or isinstance(model, bytes):
        return from_onnx(model, **kwargs)
    if _is_torch(model) and any(c.__module__.startswith("transformers") for c in type(model).__mro__):
        if example is None:
            raise ModelError("a Hugging Face model needs example token ids for export: load_model(model, example=ids)")
        from veil.models.hf import hf_graph

        return hf_graph(model, example)
    if _is_torch(model):
        if example is None:
            raise ModelError("a PyTorch module needs an example input for export: load_model(module, example=x)")
        from veil.graph.torch_import import from_torch

        return from_torch(model, example, **kwargs)
    raise ModelError(f"cannot load a model from {type(model).__name__}; expected an ONNX path/bytes/ModelProto or torch.nn.Module")
