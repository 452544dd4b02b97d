"""The command line: inspect, run, keys, plain demo, and clear one-line errors (no tracebacks)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from veil.assets import load_slice, model_path


def veil_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "veil.cli.main", *args], capture_output=True, text=True, timeout=timeout)


def test_inspect_prints_the_graph():
    r = veil_cli("inspect", str(model_path("B")))
    assert r.returncode == 0, r.stderr
    assert "conv2d" in r.stdout and "maxpool" in r.stdout and "33,542 parameters" in r.stdout


def test_run_plain_matches_labels(tmp_path):
    x, y = load_slice(32)
    np.save(tmp_path / "x.npy", x)
    r = veil_cli("run", str(model_path("C")), str(tmp_path / "x.npy"), "--out", str(tmp_path / "out.npz"))
    assert r.returncode == 0, r.stderr
    logits = np.load(tmp_path / "out.npz")["logits"]
    assert logits.shape == (32, 10) and (logits.argmax(-1) == y).mean() > 0.9


def test_bad_input_is_one_clear_line(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 28, 28), np.float32))
    r = veil_cli("run", str(model_path("C")), str(tmp_path / "bad.npy"))
    assert r.returncode == 2
    assert "shape (2, 28, 28)" in r.stderr and "(?, 1, 28, 28)" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_is_one_clear_line(tmp_path):
    r = veil_cli("inspect", str(tmp_path / "nope.onnx"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_keys_creates_ca_and_party_certs(tmp_path):
    from cryptography import x509

    dep = tmp_path / "dep.toml"
    dep.write_text('name = "t"\nmode = "mpc"\n[parties]\nalice = "127.0.0.1:7001"\nbob = "127.0.0.1:7002"\n')
    r = veil_cli("keys", "--deployment", str(dep))
    assert r.returncode == 0, r.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "keys" / "ca.pem").read_bytes())
    for name in ("alice", "bob"):
        cert = x509.load_pem_x509_certificate((tmp_path / "keys" / f"{name}.pem").read_bytes())
        assert cert.issuer == ca.subject
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [name]
        assert (tmp_path / "keys" / f"{name}.key").stat().st_mode & 0o077 == 0  # private key not readable by others


def test_bad_deployment_file(tmp_path):
    dep = tmp_path / "dep.toml"
    dep.write_text('name = "t"\nmode = "mpc"\n[parties]\nalice = "127.0.0.1"\nbob = "127.0.0.1:7002"\n')
    r = veil_cli("keys", "--deployment", str(dep))
    assert r.returncode == 2 and "host:port" in r.stderr


def test_plain_demo():
    r = veil_cli("demo", "--plain", "--n", "64")
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout
