"""A deployed offload user sees its predictions (every output, saved to a file) and, when the enclave
refuses or fails, the enclave's reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings

import numpy as np

from veil.assets import load_slice, model_path
from veil.errors import ProtocolError, VeilError
from veil.graph import load_model
from veil.net import connect_tls, create_keys, write_deployment
from veil.net.ports import free_ports
from veil.offload import party as offload_party
from veil.plain import run_plain

NAMES = ("enclave", "accelerator", "user")


def _deployment(tmp_path, **options):
    ports = free_ports(len(NAMES))
    opts = {"model": "A", "precompute": 16, "backend": "numpy", "batch_size": 3, **options}
    dep = write_deployment(tmp_path / "offload.toml", "offload-user", "offload",
                           {n: f"127.0.0.1:{p}" for n, p in zip(NAMES, ports, strict=True)}, timeout=20, options=opts)
    create_keys(dep)
    return dep


def _run_threads(dep):
    """Each party as `veil party` runs it: its channel, the role, and an abort notice on error."""
    results, errors, said = {}, {}, []

    class Say:
        def print(self, *a, **k):
            said.append(" ".join(map(str, a)))

    def body(name):
        try:
            ch = connect_tls(dep, name, offload_party.peers_of(dep, name), connect_timeout=20)
            try:
                with warnings.catch_warnings(), ch.aborting():
                    warnings.simplefilter("ignore")
                    results[name] = offload_party.run_party(dep, name, ch, Say() if name == "user" else None)
            finally:
                ch.close()
        except BaseException as e:  # noqa: BLE001
            errors[name] = e

    ts = [threading.Thread(target=body, args=(n,), daemon=True) for n in NAMES]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    assert not any(t.is_alive() for t in ts), "a party hung"
    return results, errors, said


def test_user_saves_every_output_and_prints_each_prediction(tmp_path):
    x, _ = load_slice(7)
    np.savez(tmp_path / "x.npz", x=x)  # named inputs, path relative to the deployment file
    dep = _deployment(tmp_path, inputs="x.npz", outputs="out.npz", hazmat_allow_simulation=True)
    results, errors, said = _run_threads(dep)
    assert not errors, errors
    ref = run_plain(load_model(model_path("A")), x)["logits"]
    with np.load(tmp_path / "out.npz") as f:
        saved = {k: f[k] for k in f.files}
    assert list(saved) == ["logits"] and saved["logits"].shape == (7, 10)  # all 7 samples of 3 queries
    assert np.abs(saved["logits"] - ref).max() < 1e-2
    assert results["user"]["predictions"] == ref.argmax(1).tolist()
    text = "\n".join(said)
    assert "predicted class per sample: " + " ".join(map(str, ref.argmax(1))) in text
    assert "saved to" in text and "logits (7, 10)" in text


def test_user_gets_the_enclaves_reason_for_a_refused_query(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 28, 28), np.float32))  # no channel axis
    dep = _deployment(tmp_path, inputs="bad.npy", hazmat_allow_simulation=True)
    results, errors, _ = _run_threads(dep)
    assert isinstance(errors.get("user"), ProtocolError), errors
    msg = str(errors["user"])
    assert "refused query 0" in msg and "shape (2, 28, 28)" in msg and "(?, 1, 28, 28)" in msg
    assert "enclave" in results and "accelerator" in results  # the enclave kept serving, then said bye


def test_user_process_learns_why_the_enclave_stopped(tmp_path):
    """The enclave refuses to start without the simulation opt-in: the user (a separate process)
    exits with the enclave's reason instead of 'the enclave closed the connection or died'."""
    x, _ = load_slice(2)
    np.save(tmp_path / "x.npy", x)
    dep = _deployment(tmp_path, inputs="x.npy")  # no hazmat_allow_simulation
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    procs = {n: subprocess.Popen([sys.executable, "-m", "veil.cli.main", "party", "-d", str(dep.path), "--as", n],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                 start_new_session=True) for n in NAMES}
    try:
        outs = {n: p.communicate(timeout=90)[0] for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    assert procs["user"].returncode == 2, outs
    assert "no SGX enclave" in outs["user"] and "hazmat_allow_simulation" in outs["user"], outs["user"]
    assert "Traceback" not in outs["user"]
    assert issubclass(ProtocolError, VeilError)


def test_user_names_the_shipped_images_it_scored(tmp_path):
    """Without inputs the user runs the first n shipped held-out images and says which ones it scored."""
    dep = _deployment(tmp_path, n=5, hazmat_allow_simulation=True)
    results, errors, said = _run_threads(dep)
    assert not errors, errors
    _, y = load_slice(5)
    accuracy = float((np.asarray(results["user"]["predictions"]) == y).mean())
    assert f"accuracy {accuracy:.2%} (held-out MNIST test images 8000..8004)" in "\n".join(said)
