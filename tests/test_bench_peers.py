"""bench/peers and bench/encoder_layer.py: what the mpc benchmarks compare veil with.

The shared encoder layer must be the layer its numpy reference computes; the chain exported for SPU must
compute veil's networks; a peer that cannot run is reported with its reason, never with a number. Where
the peers' venvs exist (bench/peers/*/setup.sh), one small run each checks that the peer really computes
the network (its logits against veil's plain executor)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import encoder_layer  # noqa: E402
from peers import driver  # noqa: E402
from veil.assets import load_slice, model_path  # noqa: E402
from veil.graph import load_model  # noqa: E402
from veil.plain import run_plain  # noqa: E402


def test_encoder_layer_onnx_matches_reference(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = encoder_layer.build_onnx(tmp_path / "layer.onnx", seq=16)
    x = encoder_layer.inputs(16)
    y = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    ref = encoder_layer.reference(x, encoder_layer.weights())
    assert y.shape == (1, 16, 384)
    assert np.abs(y - ref).max() < 1e-4
    # the layer is not degenerate: LayerNorm outputs of unit scale, attention not uniform
    assert 0.5 < ref.std() < 2
    w = encoder_layer.weights()
    q, k = x[0] @ w["wq"], x[0] @ w["wk"]
    assert (q[:, :32] @ k[:, :32].T / np.sqrt(32)).std() > 1.0


def test_encoder_npz_holds_what_peers_read(tmp_path):
    d = np.load(encoder_layer.save_npz(tmp_path / "l.npz", seq=8))
    assert d["x"].shape == (1, 8, 384) and d["y"].shape == (1, 8, 384)
    assert np.allclose(d["y"], encoder_layer.reference(d["x"], {k: d[k] for k in encoder_layer.weights()}))


def _run_chain(spec: dict, ws: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """A float64 evaluation of the exported chain, independent of veil's kernels."""
    h, i = x.astype(np.float64), 0
    for op in spec["ops"]:
        if op["op"] == "conv":
            w, b = ws[i], ws[i + 1]
            i += 2
            p, s = op["pads"], op["strides"]
            h = np.pad(h, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
            o, _, kh, kw = w.shape
            oh, ow = (h.shape[2] - kh) // s[0] + 1, (h.shape[3] - kw) // s[1] + 1
            cols = np.stack([h[:, :, a:a + s[0] * oh:s[0], c:c + s[1] * ow:s[1]] for a in range(kh) for c in range(kw)], 2)
            h = np.einsum("nckhw,ock->nohw", cols, w.reshape(o, -1, kh * kw)) + b.reshape(1, -1, 1, 1)
        elif op["op"] == "relu":
            h = np.maximum(h, 0)
        elif op["op"] == "maxpool":
            n, c, hh, ww = h.shape
            h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max((3, 5))
        elif op["op"] == "flatten":
            h = h.reshape(len(h), -1)
        else:
            w, b = ws[i], ws[i + 1]
            i += 2
            h = h @ (w.T if op["transB"] else w) + b
    return h


@pytest.mark.parametrize("net", ["A", "B", "D"])
def test_exported_chain_computes_the_network(tmp_path, net):
    import json

    x, _ = load_slice(4)
    d = np.load(driver.export_chain([net], x, tmp_path / "n.npz"))
    spec = json.loads(str(d["specs"]))[net]
    ws = [d[f"{net}_{i}"] for i in range(spec["n_weights"])]
    plain = run_plain(load_model(model_path(net)), x)["logits"]
    assert np.abs(_run_chain(spec, ws, d["x"]) - plain).max() < 1e-4


def test_missing_peer_is_not_measured_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_CRYPTEN_VENV", str(tmp_path / "absent"))
    monkeypatch.setenv("VEIL_PEERS_INSTALL", "0")
    x, _ = load_slice(1)
    res = driver.run_networks("crypten", ["A"], [1], x)
    assert isinstance(res, driver.NotMeasured)
    assert "setup.sh" in res.reason and str(res).startswith("not measured:")
    rows = driver.encoder_layer_peers(seq=4, peers=("crypten",))
    assert rows[0]["time_s"] is None and rows[0]["note"].startswith("not measured:")


def test_bench_tables_take_every_figure_from_the_records():
    import bench_mpc

    veil = {"measured": True, "total_s": 0.05, "online_s": 0.02, "offline_s": 0.03, "setup_s": 0.5,
            "setup_bytes": 1e6, "total_bytes": 2e6, "online_bytes": 1e6, "offline_bytes": 1e6, "rounds": 9,
            "agreement": 1.0, "max_abs_error": 1e-3, "kl": 1e-9, "plain_s": 1e-4, "images": 16}
    ct = {"measured": True, "total_s": 0.2, "setup_s": 0.01, "total_bytes": 6e6, "setup_bytes": 0.0, "rounds": 22,
          "online_s": 0.1, "offline_s": 0.01, "online_rounds": 22, "agreement": 1.0, "max_abs_error": 4e-3}
    row = {"net": "A", "batch": 1, "veil": veil, "crypten": ct,
           "spu": {"measured": False, "name": "SPU", "reason": "spu does not install here: no wheel"}}
    tabs = bench_mpc.tables([row], ["crypten", "spu"])
    head, line = tabs["total"]
    cell = dict(zip(head, line, strict=True))
    assert cell["CrypTen / veil"] == "4.0x"          # 0.2 s / 0.05 s
    assert cell["veil traffic / CrypTen's (1 query + setup)"] == "1/2.0"  # veil 2 MB + 1 MB setup against 6 MB + 0
    assert cell["SPU per query"] == "not measured" and "no wheel" in cell["SPU / veil"]
    head, line = tabs["online"]
    assert dict(zip(head, line, strict=True))["CrypTen online / veil online"] == "5.0x"


def test_bench_writes_table_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import bench_mpc

    veil = {"measured": True, "total_s": 0.05, "online_s": 0.02, "offline_s": 0.03, "setup_s": 0.5,
            "setup_bytes": 1e6, "total_bytes": 2e6, "online_bytes": 1e6, "offline_bytes": 1e6, "rounds": 9,
            "agreement": 1.0, "max_abs_error": 1e-3, "kl": 1e-9, "plain_s": 1e-4, "images": 16}
    rows = [{"net": "A", "batch": b, "load_before": 1.0, "veil": veil,
             "crypten": {"measured": False, "name": "CrypTen", "reason": "no venv"}} for b in (1, 64)]
    tabs = bench_mpc.tables(rows, ["crypten"])
    bench_mpc.write_results(rows, tabs, ["crypten"], tmp_path, "python bench/bench_mpc.py --nets A", plots=True)
    md = (tmp_path / "mpc_peers.md").read_text()
    assert "`python bench/bench_mpc.py --nets A`" in md and "not measured" in md
    for png in ("mpc_latency.png", "mpc_traffic.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _venv_or_skip(peer: str) -> None:
    if not driver.venv_python(peer).exists():
        pytest.skip(f"{peer}'s venv is not made here (bench/peers/{peer}/setup.sh)")


@pytest.mark.parametrize("peer", ["crypten", "spu"])
def test_peer_computes_network_a(peer, monkeypatch):
    _venv_or_skip(peer)
    monkeypatch.setenv("VEIL_PEERS_INSTALL", "0")
    x, _ = load_slice(2)
    res = driver.run_networks(peer, ["A"], [2], x, queries=1, timeout=300)
    assert not isinstance(res, driver.NotMeasured), str(res)
    rec = res["records"][0]
    plain = run_plain(load_model(model_path("A")), x)["logits"]
    assert np.abs(np.asarray(rec["logits"]) - plain).max() < 0.05
    assert rec["total_s"] > 0 and rec["total_bytes"] > 0
    if peer == "crypten":
        assert rec["cache_misses"] == 0 and rec["online_bytes"] > 0


def test_peer_timeout_stops_its_processes(tmp_path, monkeypatch):
    """A peer that hangs (here a fake venv whose python forks a child and sleeps) is reported within the
    timeout, and the processes it started are gone."""
    import os
    import time

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    pidfile = tmp_path / "child.pid"
    fake = venv / "bin" / "python"
    fake.write_text(f"#!/bin/sh\nsleep 120 &\necho $! > {pidfile}\nsleep 120\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VEIL_CRYPTEN_VENV", str(venv))
    x, _ = load_slice(1)
    t0 = time.perf_counter()
    res = driver.run_networks("crypten", ["A"], [1], x, timeout=2)
    assert time.perf_counter() - t0 < 15
    assert isinstance(res, driver.NotMeasured) and "did not finish within 2 s" in res.reason
    child = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the peer's child process outlived the timeout")
