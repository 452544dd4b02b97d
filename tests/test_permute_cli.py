"""`veil permute keygen/transform/audit` end to end on a small Hugging Face model directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from veil.cli.permute_cmd import app
from veil.permute.bundle import read_cloud_package, read_user_bundle
from veil.permute.client import LocalTransport, PermuteClient
from veil.permute.cloud import CloudRuntime
from veil.permute.testing import random_gpt2

runner = CliRunner()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    src = random_gpt2(seed=12, layers=1)
    d = tmp_path_factory.mktemp("gpt2-hf")
    src.model.save_pretrained(d)
    return src, d


def test_keygen_transform_and_use(hf_dir, tmp_path):
    src, d = hf_dir
    r = runner.invoke(app, ["keygen", "--model", str(d), "--out", str(tmp_path / "key"), "--mode", "vocab"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["transform", "--model", str(d), "--key", str(tmp_path / "key"),
                            "--cloud-out", str(tmp_path / "cloud"), "--user-out", str(tmp_path / "user")])
    assert r.exit_code == 0, r.output
    # the verdict on a public checkpoint is printed every time, with the audit's figure
    assert "verdict" in r.output and "column matching from the public checkpoint: 100.0% of pi" in r.output
    client = PermuteClient(read_user_bundle(tmp_path / "user"),
                           LocalTransport(CloudRuntime(read_cloud_package(tmp_path / "cloud"))))
    ids = np.array([[1, 2, 3, 50, 60]])
    with torch.no_grad():
        ref = src.model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(client.forward(ids), ref, rtol=1e-4, atol=1e-4)

    r = runner.invoke(app, ["audit", "--model", str(d), "--key", str(tmp_path / "key"), "--noise", "0",
                            "--sequences", "2", "--length", "8"])
    assert r.exit_code == 0, r.output
    assert "column matching" in r.output and "100.0%" in r.output and "frequency analysis" in r.output


def test_transform_prints_the_sorted_row_figure_in_embed_mode(hf_dir, tmp_path):
    _, d = hf_dir
    assert runner.invoke(app, ["keygen", "--model", str(d), "--out", str(tmp_path / "key")]).exit_code == 0
    r = runner.invoke(app, ["transform", "--model", str(d), "--key", str(tmp_path / "key"),
                            "--cloud-out", str(tmp_path / "cloud"), "--user-out", str(tmp_path / "user")])
    assert r.exit_code == 0, r.output
    assert "sorted-row matching (embed mode)" in r.output and "token positions of 256" in r.output


def test_cli_errors_are_clear(hf_dir, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    opt = tmp_path / "opt"  # embeddings of width 8 projected to a residual stream of width 16
    OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             vocab_size=50, max_position_embeddings=16, word_embed_proj_dim=8)).save_pretrained(opt)
    r = runner.invoke(app, ["keygen", "--model", str(opt), "--out", str(tmp_path / "k")])
    assert r.exit_code == 2 and "not supported by the permute mode" in r.output and "'opt'" in r.output
    assert "residual stream" in r.output
    r = runner.invoke(app, ["transform", "--model", str(hf_dir[1]), "--key", str(tmp_path / "nokey"),
                            "--cloud-out", str(tmp_path / "c"), "--user-out", str(tmp_path / "u")])
    assert r.exit_code == 2 and "nokey: no such directory" in r.output


def test_export_writes_an_engine_checkpoint(hf_dir, tmp_path):
    """`export --format hf` of a vocab-mode package: transformers loads it, and generation with
    relabelled ids maps back to plain generation; GGUF of a non-Llama family is refused clearly."""
    from transformers import AutoModelForCausalLM

    from veil.permute.engines import VocabMap

    src, d = hf_dir
    assert runner.invoke(app, ["keygen", "--model", str(d), "--out", str(tmp_path / "key"),
                               "--mode", "vocab"]).exit_code == 0
    assert runner.invoke(app, ["transform", "--model", str(d), "--key", str(tmp_path / "key"), "--cloud-out",
                               str(tmp_path / "cloud"), "--user-out", str(tmp_path / "user")]).exit_code == 0
    r = runner.invoke(app, ["export", "--cloud", str(tmp_path / "cloud"), "--out", str(tmp_path / "hf"),
                            "--key", str(tmp_path / "key")])
    assert r.exit_code == 0, r.output
    engine = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    vm = VocabMap(read_user_bundle(tmp_path / "user"))
    assert engine.config.eos_token_id == vm.to_cloud([2])[0]  # relabelled with --key
    with torch.no_grad():
        ids = engine.generate(torch.tensor([vm.to_cloud([1, 5])]), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, 2:].tolist()
        ref = src.model.generate(torch.tensor([[1, 5]]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, 2:].tolist()
    assert vm.from_cloud(ids) == ref
    r = runner.invoke(app, ["export", "--cloud", str(tmp_path / "cloud"), "--out", str(tmp_path / "m.gguf"),
                            "--format", "gguf"])
    assert r.exit_code == 2 and "not supported" in r.output and "Llama architecture" in r.output


def test_serve_checks_the_package_before_announcing_and_errors_are_plain(tmp_path):
    """`veil permute serve --cloud MISSING`: one line naming the folder, exit 2, no "serving ..." first,
    and no exception class name (printed as every other mode prints a VeilError)."""
    import subprocess
    import sys

    from veil.net.ports import free_port

    missing = tmp_path / "no-such-cloud"
    r = subprocess.run([sys.executable, "-m", "veil.cli.main", "permute", "serve", "--cloud", str(missing),
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "serving" not in r.stdout + r.stderr and "plain HTTP" not in r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert lines == [f"error: {missing}: no such directory; expected a veil-permute-cloud/1 directory"], lines
    assert "KeyBundleError" not in r.stderr and "Traceback" not in r.stderr
