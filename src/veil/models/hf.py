"""Hugging Face transformers models as veil graphs, exported through ``torch.onnx`` on static shapes.

:func:`hf_onnx` wraps a ``PreTrainedModel`` so that it maps ``input_ids`` (batch, seq_len) int64 to
``logits`` (language models) or ``last_hidden_state`` (encoders), with an all-ones attention mask and
explicit position ids, eager attention (plain matmul/softmax) and no cache; masks and positions fold
into public constants at import. :func:`veil.load_model` routes Hugging Face models here, so
``veil.mpc.run(hf_model, ids)`` takes them unchanged. Needs ``pip install 'veil[hf]'``.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from veil.errors import ModelError
from veil.graph.ir import Graph

__all__ = ["is_hf_model", "hf_onnx", "hf_graph"]


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(model).__mro__)


def hf_onnx(model: Any, batch: int, seq_len: int) -> bytes:
    """ONNX bytes of ``model`` on (batch, seq_len) token ids (see the module docstring)."""
    import torch

    cfg = model.config
    ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if batch < 1 or seq_len < 1 or (ctx is not None and seq_len > ctx):
        raise ModelError(f"token ids of shape ({batch}, {seq_len}): expected a batch >= 1 and 1..{ctx} positions")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: Any) -> Any:
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
            kw: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": pos}
            if getattr(self.inner.config, "use_cache", False):
                kw["use_cache"] = False
            out = self.inner(**kw)
            return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    ids = torch.zeros((batch, seq_len), dtype=torch.long)
    buf = io.BytesIO()
    was_training, impl = model.training, getattr(cfg, "_attn_implementation", None)
    cfg._attn_implementation = "eager"  # plain matmul/softmax attention, which exports as such
    out_name = "logits" if hasattr(model, "lm_head") or type(model).__name__.endswith(("LMHeadModel", "ForCausalLM")) \
        else "last_hidden_state"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(Wrapper(model).eval(), (ids,), buf, input_names=["input_ids"],  # type: ignore[arg-type]
                              output_names=[out_name], opset_version=17, do_constant_folding=True, dynamo=False)
        except Exception as e:
            raise ModelError(f"exporting {type(model).__name__} through torch.onnx failed: {str(e).splitlines()[0][:200]}") from None
        finally:
            cfg._attn_implementation = impl
            model.train(was_training)
    return buf.getvalue()


def hf_graph(model: Any, example: Any) -> Graph:
    """The veil graph of a Hugging Face model for token ids shaped like ``example`` (batch, seq_len)."""
    from veil.graph.onnx_import import from_onnx

    shape = tuple(np.shape(example.detach().cpu().numpy() if hasattr(example, "detach") else example))
    if len(shape) != 2:
        raise ModelError(f"a Hugging Face model takes token ids of shape (batch, seq_len), got example shape {shape}")
    return from_onnx(hf_onnx(model, int(shape[0]), int(shape[1])), name=type(model).__name__)
