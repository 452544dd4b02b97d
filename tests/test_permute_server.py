"""The three roles as processes: a real uvicorn cloud server on 127.0.0.1, the user over HTTP."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

from veil.assets import stories260k_path
from veil.errors import InputError
from veil.permute import CloudError, KeyBundleError, SequenceTooLongError, load_source
from veil.permute.bundle import read_user_bundle, write_cloud_package, write_user_bundle
from veil.permute.client import HttpTransport, PermuteClient
from veil.permute.developer import make_key, make_packages
from veil.permute.signing import new_signing_key, public_key_hex
from veil.permute.testing import cloud_servers, random_gpt2


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


SIGNING_KEY = new_signing_key()
DEVELOPER = public_key_hex(SIGNING_KEY)


def deploy(src, mode, root, tokenizer_dir=None):
    key, meta = make_key(src, mode)
    cloud, user = make_packages(src, key, meta, tokenizer_dir=tokenizer_dir)
    write_cloud_package(root / "cloud", cloud, SIGNING_KEY)
    write_user_bundle(root / "user", user, SIGNING_KEY)
    return root / "cloud", root / "user"


@pytest.fixture(scope="module")
def stories():
    return load_source(stories260k_path())  # shipped with veil


@pytest.fixture(scope="module")
def servers(stories, tmp_path_factory):
    """The clouds start in parallel (each process spends seconds importing torch). MiniLM's server is
    in tests/test_permute_encode.py, so these tests need nothing that is not shipped."""
    gpt2 = random_gpt2(seed=7, positions=80)
    s_cloud, s_user = deploy(stories, "embed", tmp_path_factory.mktemp("stories"))
    g_cloud, g_user = deploy(gpt2, "vocab", tmp_path_factory.mktemp("gpt2"))
    # the stories cloud insists on the developer's signature
    with cloud_servers([s_cloud, g_cloud], window_ms=20, developer_keys=[DEVELOPER, None]) as (s_url, g_url):
        yield {"stories": (s_url, s_user), "gpt2": (gpt2, g_url, g_user)}


@pytest.fixture(scope="module")
def stories_server(servers):
    return servers["stories"]


@pytest.fixture(scope="module")
def gpt2_server(servers):
    return servers["gpt2"]


def connect(url, user_dir):
    return PermuteClient(read_user_bundle(user_dir, DEVELOPER), HttpTransport(url, timeout=30))


def test_stories_generation_over_http_is_identical(stories, stories_server):
    url, user_dir = stories_server
    client = connect(url, user_dir)
    assert client.generate([1], 64) == hf_greedy(stories.model, [1], 64)
    assert httpx.get(url + "/stats", timeout=5).json()["open_sessions"] == 0


def test_concurrent_users_are_batched_and_exact(stories, stories_server):
    url, user_dir = stories_server
    prompts = [[1, 400], [1, 300, 301], [1]]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def user(i):
        try:
            results[i] = connect(url, user_dir).generate(prompts[i], 12)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i, p in enumerate(prompts):
        assert results[i] == hf_greedy(stories.model, p, 12)
    assert httpx.get(url + "/stats", timeout=5).json()["largest_batch"] > 1


def test_bad_requests_get_typed_errors(stories_server):
    url, user_dir = stories_server
    client = connect(url, user_dir)
    transport = client.transport
    sid = transport.open_session()
    with pytest.raises(SequenceTooLongError, match="513 positions"):
        transport.step(sid, client.permute_input(np.ones(513, dtype=np.int64)))
    with pytest.raises(InputError, match="float32"):
        transport.step(sid, np.ones((2, 64), dtype=np.int64))
    with pytest.raises(InputError, match="shape"):
        transport.step(sid, np.ones((2, 63), dtype=np.float32))
    transport.close_session(sid)
    with pytest.raises(CloudError, match="unknown session"):
        transport.step(sid, client.permute_input(np.ones(1, dtype=np.int64)))
    r = httpx.post(url + "/forward", json={"inputs": {"dtype": "object", "shape": [1], "data": ""}}, timeout=5)
    assert r.status_code == 400 and r.json()["error"] == "InputError"


def test_wrong_bundle_is_refused_before_anything_is_sent(stories_server, gpt2_server):
    url, _ = stories_server
    _, _, gpt2_user = gpt2_server
    with pytest.raises(KeyBundleError, match="different transformed model"):
        connect(url, gpt2_user)


def test_unreachable_cloud_is_a_clear_error(stories_server):
    from veil.net.ports import free_port

    _, user_dir = stories_server
    with pytest.raises(CloudError, match="cannot reach"):
        connect(f"http://127.0.0.1:{free_port()}", user_dir)


def test_gpt2_vocab_mode_over_http(gpt2_server):
    src, url, user_dir = gpt2_server
    client = connect(url, user_dir)
    ids = np.random.default_rng(3).integers(0, 211, size=(2, 10))
    with torch.no_grad():
        ref = src.model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(client.forward(ids), ref, rtol=1e-4, atol=1e-4)
    assert client.generate([1, 2, 3], 64) == hf_greedy(src.model, [1, 2, 3], 64)
    with pytest.raises(SequenceTooLongError):
        client.transport.forward(client.permute_input(np.ones((1, 81), dtype=np.int64)), None)


def test_generate_cli_against_the_server(stories, stories_server):
    from typer.testing import CliRunner

    from veil.cli.permute_cmd import app

    url, user_dir = stories_server
    r = CliRunner().invoke(app, ["generate", "--user", str(user_dir), "--url", url, "--prompt-ids", "1",
                                 "--max-new-tokens", "10"])
    assert r.exit_code == 0, r.output
    assert r.output.split("\n")[0].split() == [str(t) for t in hf_greedy(stories.model, [1], 10)]
    r = CliRunner().invoke(app, ["generate", "--user", str(user_dir), "--url", url, "--max-new-tokens", "600"])
    assert r.exit_code == 2 and "longer than the model allows" in r.output


def test_server_refuses_a_package_not_signed_by_the_developer(tmp_path):
    import subprocess
    import sys

    src = random_gpt2(seed=3, layers=1)
    key, meta = make_key(src, "vocab")
    cloud, _ = make_packages(src, key, meta)
    write_cloud_package(tmp_path / "cloud", cloud, new_signing_key())
    proc = subprocess.run([sys.executable, "-m", "veil.permute.server", "--cloud", str(tmp_path / "cloud"),
                           "--port", "1", "--developer-key", DEVELOPER], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "does not verify" in proc.stderr
    assert "Traceback" not in proc.stderr
