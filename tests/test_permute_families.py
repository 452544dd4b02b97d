"""Every family the permute mode claims, on tiny random models with every 1-D parameter random.

Reference: the untransformed Hugging Face model. Decoders: logits within ATOL = RTOL = 1e-4 and greedy
ids identical (through the cloud runtime's KV-cache sessions); encoders: final hidden states with a
padded batch and its attention mask. Both key modes. The adapters are derived from the weights
(:mod:`veil.permute.analysis`), so these tests also show that no family needs its own code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veil.permute import UnsupportedFamilyError, source_from_model
from veil.permute.client import LocalTransport, PermuteClient
from veil.permute.cloud import CloudRuntime
from veil.permute.developer import make_key, make_packages
from veil.permute.models import SourceModel
from veil.permute.testing import TINY_CONFIGS, random_model

ATOL = RTOL = 1e-4
DECODERS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gpt_neox", "opt", "falcon", "gpt2"]
ENCODERS = ["bert", "roberta", "distilbert"]
_cache: dict[str, SourceModel] = {}


def source(family: str) -> SourceModel:
    if family not in _cache:
        _cache[family] = random_model(family, seed=len(family))
    return _cache[family]


def client_for(src: SourceModel, mode: str) -> PermuteClient:
    key, meta = make_key(src, mode, seed=5)
    cloud, user = make_packages(src, key, meta)
    return PermuteClient(user, LocalTransport(CloudRuntime(cloud)))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_every_family_is_listed():
    assert sorted(DECODERS + ENCODERS) == sorted(TINY_CONFIGS)


def test_norm_gains_and_biases_are_random():
    """The premise of every test here: no norm parameter or bias keeps its fresh 1 / 0 value."""
    for family in TINY_CONFIGS:
        for name, p in source(family).model.named_parameters():
            if p.dim() == 1:
                assert p.std() > 0.02 and not torch.allclose(p, torch.ones_like(p)), (family, name)


@pytest.mark.parametrize("mode", ["embed", "vocab"])
@pytest.mark.parametrize("family", DECODERS)
def test_decoder_logits_and_greedy_ids_match(family, mode):
    src = source(family)
    client = client_for(src, mode)
    ids = np.random.default_rng(0).integers(3, src.adapter.vocab_size(src.config), size=(2, 9))
    with torch.no_grad():
        ref = src.model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(client.forward(ids), ref, rtol=RTOL, atol=ATOL)
    prompt = [1, 7, 11]
    assert client.generate(prompt, 16) == hf_greedy(src.model, prompt, 16)


@pytest.mark.parametrize("mode", ["embed", "vocab"])
@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_hidden_states_match_with_padding_mask(family, mode):
    src = source(family)
    client = client_for(src, mode)
    ids = np.random.default_rng(1).integers(3, src.adapter.vocab_size(src.config), size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = int(src.config.pad_token_id or 0)
    with torch.no_grad():
        ref = src.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    keep = mask.astype(bool)  # padded positions are masked out of attention; their own outputs are unused
    np.testing.assert_allclose(client.forward(ids, mask)[keep], ref.numpy()[keep], rtol=RTOL, atol=ATOL)


def test_adapters_are_chosen_by_what_the_weights_do():
    """What the analysis found, checked on facts of the architectures: q/k norms and q/k/v biases are
    not on the residual stream; (1 + w) gains are; Gemma's embedding scale is sqrt(d); fused qkv reads
    the stream on its input side only; Gemma2's logits are soft-capped."""
    qwen3 = source("qwen3").adapter.rules
    assert qwen3["model.layers.0.self_attn.q_norm.weight"].hidden == ()
    assert qwen3["model.layers.0.input_layernorm.weight"].hidden == (0,)
    qwen2 = source("qwen2").adapter.rules
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].hidden == ()
    assert qwen2["model.layers.0.self_attn.o_proj.weight"].hidden == (0,)
    assert source("phi3").adapter.rules["model.layers.0.self_attn.qkv_proj.weight"].hidden == (1,)
    gemma = source("gemma").adapter
    assert gemma.embedding_scale == pytest.approx(32 ** 0.5, rel=1e-6)
    assert source("gemma2").adapter.logit_softcap == pytest.approx(source("gemma2").config.final_logit_softcapping)
    neox = source("gpt_neox").adapter.rules
    assert neox["gpt_neox.layers.0.attention.dense.bias"].hidden == (0,)
    assert source("gpt2").adapter.rules["transformer.h.0.attn.c_attn.weight"].hidden == (0,)  # Conv1D (in, out)


def test_a_projection_between_embedding_and_stream_is_refused():
    """OPT with word_embed_proj_dim != hidden_size: the residual stream would stay unpermuted."""
    with pytest.raises(UnsupportedFamilyError, match="not on the residual stream"):
        random_model("opt", word_embed_proj_dim=16)


def test_an_order_dependent_operation_is_refused_with_its_name():
    """A final norm that rolls the hidden axis is not permutation-equivariant: refused, naming 'roll'."""
    src = source("llama")
    model = random_model("llama", seed=3).model
    inner = model.model.norm

    class RolledNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.roll(self.inner(x), 1, dims=-1)

    model.model.norm = RolledNorm()
    with pytest.raises(UnsupportedFamilyError, match="roll"):
        source_from_model(model)
    assert src.adapter.rules  # the unmodified model was accepted


def test_encoder_decoder_models_are_refused():
    from transformers import T5Config

    from veil.permute import adapter_for

    with pytest.raises(UnsupportedFamilyError, match="encoder-decoder"):
        adapter_for(T5Config())


UNLISTED = {  # families no test above names and no code mentions: accepted because the analysis proves them
    "granite": {"num_key_value_heads": 2, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                "logits_scaling": 2.0},
    "olmo2": {"num_key_value_heads": 2},
    "cohere": {"num_key_value_heads": 2},
    "bloom": {"n_layer": 2, "n_head": 4},
}


@pytest.mark.parametrize("family", sorted(UNLISTED))
def test_a_new_family_needs_no_code(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from veil.permute.testing import _COMMON, randomise_norms

    kwargs = dict(_COMMON)
    kwargs.update(UNLISTED[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    randomise_norms(model, 1)
    src = source_from_model(model)
    ids = np.random.default_rng(2).integers(3, 151, size=(2, 7))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    for mode in ("embed", "vocab"):
        np.testing.assert_allclose(client_for(src, mode).forward(ids), ref, rtol=RTOL, atol=ATOL)


def test_mixture_of_experts_is_refused_with_the_operation():
    from transformers import AutoConfig, AutoModelForCausalLM

    from veil.permute.testing import _COMMON

    kwargs = dict(_COMMON, num_key_value_heads=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                  num_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2_moe", **kwargs))
    with pytest.raises(UnsupportedFamilyError, match="cannot prove the permutation exact: operation"):
        source_from_model(model.eval())
