"""mpc over real processes and mutual TLS on loopback (one small model, short): a correct run, and a
party presenting a certificate from another CA, which must stop every process with an error."""

import shutil
import time

import numpy as np
import pytest

from veil.assets import load_slice, model_path
from veil.errors import VeilError
from veil.graph import load_model
from veil.mpc.demo import run_local_deployment
from veil.net.keys import create_ca, issue_party_cert
from veil.plain import run_plain


def test_five_processes_over_tls_agree_with_plain(tmp_path):
    x, _ = load_slice(4)
    graph = load_model(model_path("A"))
    named = {graph.inputs[0].name: x}  # named inputs travel as .npz (a bare array as .npy: the demo's path)
    res = run_local_deployment(model_path("A"), named, tmp_path, batch_size=2, timeout=120, recv_timeout=30)
    ref = run_plain(graph, x)["logits"]
    got = res["outputs"]["logits"]
    assert np.array_equal(got.argmax(1), ref.argmax(1)) and np.abs(got - ref).max() < 5e-3
    rep = res["report"]
    assert rep["queries"] == 2 and rep["rounds"] == rep["declared_rounds"]
    assert rep["server_bytes"] == rep["declared_server_bytes"]  # same counters over TLS as in memory


def test_wrong_certificate_stops_every_party(tmp_path):
    rogue = tmp_path / "rogue"
    rogue.mkdir()

    def tamper(keys_dir):
        key, cert = create_ca(rogue, "rogue")
        issue_party_cert(rogue, "server1", key, cert)
        for suffix in (".pem", ".key"):
            shutil.copy(rogue / f"server1{suffix}", keys_dir / "server1" / f"server1{suffix}")

    work = tmp_path / "run"
    work.mkdir()
    x, _ = load_slice(1)
    t0 = time.perf_counter()
    with pytest.raises(VeilError, match="server1") as exc:
        run_local_deployment(model_path("A"), x, work, timeout=60, recv_timeout=5, tamper=tamper)
    assert time.perf_counter() - t0 < 60
    msg = str(exc.value)
    assert all(p in msg for p in ("owner", "user", "server0", "server1", "dealer"))  # every party failed


def test_python_user_against_a_running_deployment(tmp_path):
    """Four parties as `veil party` processes, the user from Python (veil.mpc.party.run_user)."""
    import os
    import signal
    import subprocess
    import sys

    from veil.mpc.party import run_user
    from veil.mpc.roles import PARTIES
    from veil.net import create_keys, write_deployment
    from veil.net.ports import free_ports

    ports = free_ports(5)
    dep = write_deployment(tmp_path / "d.toml", "t", "mpc", {p: f"127.0.0.1:{q}" for p, q in zip(PARTIES, ports, strict=True)},
                           timeout=30, options={"model": str(model_path("D"))})
    create_keys(dep)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "veil.cli.main", "party", "-d", str(dep.path), "--as", p],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
             for p in PARTIES if p != "user"]
    try:
        x, _ = load_slice(3)
        pred, rep = run_user(dep, x, batch_size=2, timeout=30)
        ref = run_plain(load_model(model_path("D")), x)["logits"]
        assert np.array_equal(pred.argmax(1), ref.argmax(1)) and np.abs(pred - ref).max() < 5e-3
        assert rep.queries == 2 and rep.rounds == rep.declared_rounds
        for pr in procs:
            assert pr.wait(30) == 0
    finally:
        for pr in procs:
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait(10)


def test_killed_server_stops_every_party(tmp_path):
    """server1's process is killed mid-run: every other party exits with an error, none keeps running."""
    x, _ = load_slice(256)
    t0 = time.perf_counter()
    with pytest.raises(VeilError) as exc:
        run_local_deployment(model_path("C"), x, tmp_path, batch_size=8, timeout=90, recv_timeout=20,
                             kill_after=("server1", 3.0))  # 32 queries of network C: still running at 3 s
    msg = str(exc.value)
    assert "server1 (exit -9)" in msg
    for p in ("owner", "user", "server0", "dealer"):
        assert f"{p} (exit 2)" in msg, msg
    assert "closed the connection or died" in msg.split("user (exit 2)")[1].split(";")[0]  # names a peer that went away
    assert time.perf_counter() - t0 < 60
