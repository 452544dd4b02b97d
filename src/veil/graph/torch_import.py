"""Import a PyTorch ``nn.Module`` by exporting it to ONNX (torch.onnx) and converting that.

torch is an optional dependency (``pip install veil[torch]``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

from veil.errors import ModelError
from veil.graph.ir import Graph
from veil.graph.onnx_import import from_onnx

__all__ = ["from_torch", "torch_to_onnx_bytes"]


def torch_to_onnx_bytes(module: Any, example: Any, input_names: Sequence[str] = ("x",),
                        output_names: Sequence[str] = ("y",), dynamic_batch: bool = True, opset: int = 17) -> bytes:
    """Export ``module`` traced on ``example`` (a tensor or tuple of tensors) to ONNX bytes."""
    try:
        import torch
    except ImportError:
        raise ModelError("importing a PyTorch module needs torch: pip install 'veil[torch]'") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    args = example if isinstance(example, tuple) else (example,)
    dyn = {n: {0: "batch"} for n in list(input_names) + list(output_names)} if dynamic_batch else None
    buf = io.BytesIO()
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, buf, input_names=list(input_names),  # type: ignore[arg-type]
                              output_names=list(output_names), dynamic_axes=dyn, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        except Exception as e:
            raise ModelError(f"torch.onnx.export failed for {type(module).__name__}: {e}") from None
    return buf.getvalue()


def from_torch(module: Any, example: Any, input_names: Sequence[str] = ("x",),
               output_names: Sequence[str] = ("y",), dynamic_batch: bool = True, opset: int = 17) -> Graph:
    """Convert a PyTorch module into a veil :class:`Graph` (through ONNX at ``opset``; 20 exports GELU as Gelu)."""
    data = torch_to_onnx_bytes(module, example, input_names, output_names, dynamic_batch, opset)
    return from_onnx(data, name=type(module).__name__)
