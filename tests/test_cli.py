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


def test_keys_gives_each_host_only_its_own_folder(tmp_path):
    from cryptography import x509

    dep = tmp_path / "dep.toml"
    dep.write_text('name = "t"\nmode = "mpc"\n[parties]\nalice = "127.0.0.1:7001"\nbob = "127.0.0.1:7002"\n')
    r = veil_cli("keys", "--deployment", str(dep))
    assert r.returncode == 0, r.stderr
    keys = tmp_path / "keys"
    assert sorted(p.name for p in keys.iterdir()) == ["alice", "bob", "ca"]  # nothing loose in keys/
    assert sorted(p.name for p in (keys / "ca").iterdir()) == ["ca.key", "ca.pem"]  # the CA key stays apart
    ca = x509.load_pem_x509_certificate((keys / "ca" / "ca.pem").read_bytes())
    for name in ("alice", "bob"):
        folder = keys / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(["ca.pem", f"{name}.key", f"{name}.pem"])
        assert (folder / "ca.pem").read_bytes() == (keys / "ca" / "ca.pem").read_bytes()
        cert = x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())
        assert cert.issuer == ca.subject
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [name]
        assert (folder / f"{name}.key").stat().st_mode & 0o077 == 0  # private key not readable by others
    assert sorted(str(p.relative_to(keys)) for p in keys.rglob("*.key")) == ["alice/alice.key", "bob/bob.key", "ca/ca.key"]


def test_a_host_with_only_its_folder_connects(tmp_path):
    """Two 'hosts' (directories) that each received only their party's folder talk over mutual TLS."""
    import shutil
    import threading

    from veil.net import connect_tls, create_keys, load_deployment, write_deployment
    from veil.net.ports import free_ports

    ports = free_ports(2)
    (tmp_path / "op").mkdir()
    operator = write_deployment(tmp_path / "op" / "dep.toml", "t", "test",
                                {"alice": f"127.0.0.1:{ports[0]}", "bob": f"127.0.0.1:{ports[1]}"})
    create_keys(operator)
    hosts = {}
    for name in ("alice", "bob"):
        host = tmp_path / f"host-{name}"
        shutil.copytree(tmp_path / "op" / "keys" / name, host / "keys" / name)
        shutil.copy(operator.path, host / "dep.toml")
        hosts[name] = load_deployment(host / "dep.toml")
        assert not list((host / "keys").rglob("ca.key"))
    got = {}

    def run(name, peer):
        ch = connect_tls(hosts[name], name, connect_timeout=20)
        try:
            ch.send(peer, name)
            got[name] = ch.recv(peer)
        finally:
            ch.close()

    ts = [threading.Thread(target=run, args=("alice", "bob")), threading.Thread(target=run, args=("bob", "alice"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(40)
    assert got == {"alice": "bob", "bob": "alice"}


def test_missing_key_folder_is_one_clear_line(tmp_path):
    dep = tmp_path / "dep.toml"
    dep.write_text('name = "t"\nmode = "mpc"\n[parties]\nowner = "127.0.0.1:7001"\nuser = "127.0.0.1:7002"\n'
                   'server0 = "127.0.0.1:7003"\nserver1 = "127.0.0.1:7004"\ndealer = "127.0.0.1:7005"\n')
    r = veil_cli("party", "-d", str(dep), "--as", "server0")
    assert r.returncode == 2 and "key files not found" in r.stderr and "server0" in r.stderr and "Traceback" not in r.stderr


def test_bad_deployment_file(tmp_path):
    dep = tmp_path / "dep.toml"
    dep.write_text('name = "t"\nmode = "mpc"\n[parties]\nalice = "127.0.0.1"\nbob = "127.0.0.1:7002"\n')
    r = veil_cli("keys", "--deployment", str(dep))
    assert r.returncode == 2 and "host:port" in r.stderr


def test_plain_demo():
    r = veil_cli("demo", "--plain", "--n", "64")
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout


def test_same_option_names_in_every_mode():
    """One name per thing: --batch-size for samples per query, --hazmat-allow-simulation for the
    simulation opt-in; the old names still parse (hidden where cheap)."""
    import typer.main

    from veil.cli.main import app

    root = typer.main.get_command(app)

    def opts(*path):
        cmd = root
        for p in path:
            cmd = cmd.commands[p]  # type: ignore[attr-defined]
        return {o: prm for prm in cmd.params for o in prm.opts}

    for path in (("mpc", "run"), ("mpc", "local"), ("mpc", "plan"), ("offload", "run"), ("demo",)):
        assert "--batch-size" in opts(*path), path
    for path in (("offload", "run"), ("offload", "train"), ("attested", "serve"), ("attested", "attest")):
        assert "--hazmat-allow-simulation" in opts(*path), path
    assert opts("offload", "run")["--batch"].hidden and opts("offload", "run")["--hazmat-simulate"].hidden
    assert opts("mpc", "plan")["--batch"].hidden
    r = veil_cli("mpc", "plan", "A", "--batch", "2")  # the old name still works
    assert r.returncode == 0 and "batch 2" in r.stdout, r.stderr
