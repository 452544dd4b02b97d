"""A server process killed (SIGKILL) while the attention of an encoder layer is in progress: every other
party process exits within seconds with a one-line error naming the dead party, nothing hangs, and every
process is stopped at the end. The five parties run as `veil party` processes over mutual TLS on loopback;
server1 is held inside the layer's attention softmax by the test hook ``VEIL_MPC_STOP_AT``
(:mod:`veil.mpc.debug`) and killed there, while server0 waits for its messages in the same step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from veil.graph import load_model
from veil.mpc.debug import STOP_ENV
from veil.mpc.roles import PARTIES
from veil.net import create_keys, write_deployment
from veil.net.ports import free_ports

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import encoder_layer  # noqa: E402

SURVIVORS = ("owner", "user", "server0", "dealer")


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def test_server_killed_during_attention_stops_every_party_with_one_clear_line(tmp_path):
    model = encoder_layer.build_onnx(tmp_path / "layer.onnx", seq=16)
    softmax = next(n.name for n in load_model(model).nodes if n.op == "softmax")
    np.save(tmp_path / "x.npy", encoder_layer.inputs(16))
    ports = free_ports(len(PARTIES))
    dep = write_deployment(tmp_path / "mpc.toml", "kill-test", "mpc",
                           {p: f"127.0.0.1:{port}" for p, port in zip(PARTIES, ports, strict=True)}, timeout=60,
                           options={"model": str(model), "inputs": "x.npy", "outputs": "out.npz"})
    create_keys(dep)
    base = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    base.pop(STOP_ENV, None)
    logs = {p: tmp_path / f"{p}.log" for p in PARTIES}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for p in PARTIES:
            env = dict(base, **({STOP_ENV: f"server1:{softmax}"} if p == "server1" else {}))
            with open(logs[p], "wb") as log:
                procs[p] = subprocess.Popen([sys.executable, "-m", "veil.cli.main", "party", "-d", str(dep.path), "--as", p],
                                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 240
        while "stopped at" not in logs["server1"].read_text(errors="replace"):
            assert time.monotonic() < deadline, {p: _last_line(v) for p, v in logs.items()}
            assert all(pr.poll() is None for pr in procs.values()), {p: _last_line(v) for p, v in logs.items()}
            time.sleep(0.1)
        assert softmax in _last_line(logs["server1"])  # it is inside the attention softmax, server0 too
        os.killpg(procs["server1"].pid, signal.SIGKILL)
        killed = time.monotonic()
        codes = {p: procs[p].wait(timeout=30) for p in SURVIVORS}  # far below the 60 s receive timeout
        took = time.monotonic() - killed
    finally:
        for pr in procs.values():  # nothing is left running, whatever happened
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGKILL)
            pr.wait(10)
    assert procs["server1"].returncode == -signal.SIGKILL
    assert took < 20, took
    for p in SURVIVORS:
        text = logs[p].read_text(errors="replace")
        line = _last_line(logs[p])
        assert codes[p] == 2, (p, codes[p], text[-1500:])
        assert "Traceback" not in text, (p, text[-1500:])
        assert "'server1'" in line, (p, line)  # names the dead party ...
        for other in SURVIVORS:  # ... and blames no survivor for dying
            assert f"'{other}' closed the connection or died" not in line, (p, line)
    assert not (tmp_path / "out.npz").exists()
