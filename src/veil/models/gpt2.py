"""Hugging Face GPT-2 language models as veil graphs (exported through ``torch.onnx``).

:func:`causal_lm_graph` serves any Hugging Face causal LM with eager attention the same way (tested
with a tiny random Llama with grouped-query attention). The graph takes ``input_ids`` (batch, seq_len) int64 and returns ``logits`` (batch, seq_len, vocab)
for a whole (static-length) sequence; the causal mask is public and folds into the attention
softmax. :func:`tiny_gpt2` makes a small random model for tests. Needs ``pip install 'veil[hf]'``.
"""

from __future__ import annotations

from typing import Any

from veil.graph.ir import Graph

__all__ = ["tiny_gpt2", "gpt2_onnx", "gpt2_graph", "causal_lm_graph"]


def tiny_gpt2(seed: int = 0, vocab_size: int = 256, n_positions: int = 64, n_embd: int = 64, n_layer: int = 2,
              n_head: int = 4) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` (eager attention, evaluation mode)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"  # plain matmul/softmax attention (exports as such)
    return GPT2LMHeadModel(cfg).eval()


def gpt2_onnx(model: Any, batch: int, seq_len: int) -> bytes:
    """ONNX export of ``model`` on a static (batch, seq_len) of token ids, output ``logits``."""
    from veil.models.hf import hf_onnx

    return hf_onnx(model, batch, seq_len)


def causal_lm_graph(model: Any, batch: int = 1, seq_len: int = 16, name: str | None = None) -> Graph:
    """The veil graph of a Hugging Face causal LM (eager attention) for (batch, seq_len) token ids."""
    from veil.graph.onnx_import import from_onnx

    return from_onnx(gpt2_onnx(model, batch, seq_len), name=name or type(model).__name__)


def gpt2_graph(model: Any, batch: int = 1, seq_len: int = 16) -> Graph:
    """The veil graph of ``model`` for (batch, seq_len) token ids."""
    return causal_lm_graph(model, batch, seq_len, name="gpt2")
