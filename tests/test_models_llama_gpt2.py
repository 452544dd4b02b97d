"""Decoder frontends: stories260K step graphs (llama2.c) and a tiny random GPT-2, with the plain executor."""

from __future__ import annotations

import numpy as np
import pytest

from veil.errors import InputError, ModelError, ModelFormatError
from veil.models.llama import generate_plain, load_llama2c
from veil.plain import run_plain

# ../shared/models/README.md: llama2.c run.c and an independent NumPy forward, greedy from BOS (id 1)
REFERENCE_IDS = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264, 283, 452, 288, 13]


@pytest.fixture(scope="module")
def stories():
    from veil.assets import stories260k_path

    try:
        return load_llama2c(stories260k_path())
    except ModelError as e:
        pytest.skip(f"stories260K.bin is not shipped in this checkout: {e}")


def test_stories260k_greedy_ids_equal_reference(stories):
    assert stories.config.n_kv_heads == 4 and stories.config.n_heads == 8
    assert generate_plain(stories, 20) == REFERENCE_IDS


def test_step_graph_interface(stories):
    c = stories.config
    g0, g3 = stories.step_graph(0), stories.step_graph(3)
    assert [s.name for s in g0.inputs] == ["token"]
    past = [s for s in g3.inputs if s.name.startswith("past_")]
    assert len(past) == 2 * c.n_layers and past[0].shape == (1, c.n_kv_heads, 3, c.head_dim)
    assert g3.meta["state"] == g0.meta["state"] and g3.meta["state"]["past_k_0"] == "present_k_0"
    assert {"embedding", "rmsnorm", "silu", "matmul", "softmax", "concat"} <= g3.ops
    assert "concat" not in g0.ops
    # the cache a step returns is what a full recomputation gives: step 3 from step 0..2's caches
    feeds, cache, tok = {}, {}, 1
    for pos in range(4):
        g = stories.step_graph(pos)
        feeds = {s.name: cache[g.meta["state"][s.name]] for s in g.inputs if s.name != "token"}
        res = run_plain(g, {"token": np.array([[tok]]), **feeds})
        cache = {o: res[o] for o in g.outputs if o != "logits"}
        tok = REFERENCE_IDS[pos]
    assert cache["present_v_4"].shape == (1, c.n_kv_heads, 4, c.head_dim)


def test_llama_errors(stories, tmp_path):
    with pytest.raises(InputError, match="position"):
        stories.step_graph(stories.config.seq_len)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(np.array([64, 172, 5, 8, 4, 512, 512], "<i4").tobytes() + b"\0" * 100)
    with pytest.raises(ModelFormatError, match="ends inside"):
        load_llama2c(bad)
    with pytest.raises(ModelError, match="does not exist"):
        load_llama2c(tmp_path / "none.bin")


def test_tiny_gpt2_logits_match_hugging_face():
    pytest.importorskip("transformers", reason="GPT-2 needs transformers (veil[hf])")
    import torch

    from veil.models.gpt2 import gpt2_graph, tiny_gpt2

    model = tiny_gpt2(seed=3)
    graph = gpt2_graph(model, batch=2, seq_len=12)
    assert {"layernorm", "gelu_tanh", "softmax", "embedding", "matmul"} <= graph.ops
    sm = next(n for n in graph.nodes if n.op == "softmax")
    assert np.isneginf(sm.params["mask"][0, 0, 0, 1]) and sm.params["mask"][0, 0, 1, 0] == 0  # causal
    ids = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int64)
    got = run_plain(graph, {"input_ids": ids})["logits"]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_hugging_face_llama_with_grouped_query_attention():
    """HF LlamaForCausalLM export: decomposed RMSNorm and SiLU recognised, RoPE and repeat_kv lowered."""
    pytest.importorskip("transformers", reason="needs transformers (veil[hf])")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from veil.models.gpt2 import causal_lm_graph

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    graph = causal_lm_graph(model, batch=1, seq_len=10)
    assert {"rmsnorm", "silu", "softmax", "embedding"} <= graph.ops and "reduce_mean" not in graph.ops
    ids = np.random.default_rng(1).integers(0, 128, (1, 10)).astype(np.int64)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(run_plain(graph, {"input_ids": ids})["logits"], want, rtol=1e-4, atol=1e-4)


def test_load_model_takes_hugging_face_models():
    """veil.load_model(hf_model, example=ids): causal LMs give logits, encoders last_hidden_state."""
    pytest.importorskip("transformers", reason="needs transformers (veil[hf])")
    import torch
    from transformers import BertConfig, BertModel

    import veil
    from veil.models.gpt2 import tiny_gpt2

    torch.manual_seed(4)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32)).eval()
    gpt = tiny_gpt2(seed=5)
    ids = np.random.default_rng(2).integers(0, 100, (2, 7)).astype(np.int64)
    for model, key in ((bert, "last_hidden_state"), (gpt, "logits")):
        graph = veil.load_model(model, example=ids)
        assert [s.name for s in graph.inputs] == ["input_ids"] and graph.outputs == [key]
        with torch.no_grad():
            want = getattr(model(input_ids=torch.from_numpy(ids)), key).numpy()
        np.testing.assert_allclose(run_plain(graph, ids)[key], want, rtol=1e-4, atol=1e-4)
        assert not model.training
    with pytest.raises(ModelError, match="example token ids"):
        veil.load_model(gpt)
