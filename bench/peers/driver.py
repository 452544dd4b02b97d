"""Run the peer frameworks (CrypTen, SPU) from veil's benchmarks, each in its own virtual environment.

Each peer has a folder here with `setup.sh` (makes bench/peers/.venv-<peer>) and `run_<peer>.py` (the
measurement, run with that venv's python as a subprocess). This module, imported by the benchmarks in
veil's environment, writes the inputs the peers read, runs them, and returns their JSON records, or a
`NotMeasured` with the reason when a peer cannot run here (no venv and installing failed, a crash, a
timeout). Nothing here is a typed-in figure: every number comes from a run of the peer.

    sys.path.insert(0, "bench"); from peers import driver
    driver.run_networks("crypten", ["A", "C"], [1, 64], x)    # x float32 (N, 1, 28, 28), N >= 64
    driver.encoder_layer_peers(seq=16)                        # list of dicts, one per peer and variant

Environment: VEIL_CRYPTEN_VENV, VEIL_SPU_VENV override the venv folders; VEIL_PEERS_INSTALL=0 stops the
driver from running setup.sh when a venv is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PEERS", "NotMeasured", "venv_python", "ensure", "export_chain", "run_networks",
           "encoder_layer_peers", "max_abs_error"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODELS = REPO / "src" / "veil" / "assets" / "models"
PEERS = ("crypten", "spu")


@dataclass
class NotMeasured:
    peer: str
    reason: str

    def __str__(self) -> str:
        return f"not measured: {self.reason}"


def venv_python(peer: str) -> Path:
    env = os.environ.get(f"VEIL_{peer.upper()}_VENV")
    return (Path(env) if env else HERE / f".venv-{peer}") / "bin" / "python"


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:]


def ensure(peer: str, timeout: float = 1800) -> NotMeasured | None:
    """Make the peer's venv if it is missing (running its setup.sh); None when ready."""
    if venv_python(peer).exists():
        return None
    if os.environ.get("VEIL_PEERS_INSTALL", "1") == "0":
        return NotMeasured(peer, f"no venv at {venv_python(peer).parent.parent} (run bench/peers/{peer}/setup.sh)")
    try:
        r = subprocess.run(["bash", str(HERE / peer / "setup.sh")], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHON": sys.executable})
    except subprocess.TimeoutExpired:
        return NotMeasured(peer, f"setup.sh did not finish within {timeout:.0f} s")
    if r.returncode != 0 or not venv_python(peer).exists():
        return NotMeasured(peer, f"{peer} does not install here: {_tail(r.stdout + r.stderr)}")
    return None


def _run(peer: str, args: list[str], out: Path, timeout: float) -> dict[str, Any] | NotMeasured:
    missing = ensure(peer)
    if missing:
        return missing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [str(venv_python(peer)), str(HERE / peer / f"run_{peer}.py"), *args, "--out", str(out)]
    # its own session, so that a timeout stops the party processes the peer forks, not only its launcher
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return NotMeasured(peer, f"run did not finish within {timeout:.0f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0 or not out.exists():
        return NotMeasured(peer, f"run failed (exit {proc.returncode}): {_tail(text)}")
    return json.loads(out.read_text())


def export_chain(nets: list[str], x: np.ndarray, path: Path) -> Path:
    """veil's ONNX networks as layer chains (op list + weights) for peers without an ONNX importer (SPU)."""
    import onnx
    from onnx import numpy_helper

    arrays: dict[str, np.ndarray] = {"x": np.asarray(x, np.float32)}
    specs = {}
    for net in nets:
        model = onnx.load(str(MODELS / f"{net}.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        ops: list[dict[str, Any]] = []
        n = 0
        for node in model.graph.node:
            at = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type in ("Conv", "Gemm"):
                for name in node.input[1:3]:
                    arrays[f"{net}_{n}"] = inits[name].astype(np.float32)
                    n += 1
            if node.op_type == "Conv":
                if at.get("group", 1) != 1 or any(d != 1 for d in at.get("dilations", [1, 1])):
                    raise ValueError(f"{net}: grouped or dilated Conv is not exported")
                ops.append({"op": "conv", "strides": list(at.get("strides", [1, 1])),
                            "pads": list(at.get("pads", [0, 0, 0, 0]))})
            elif node.op_type == "Gemm":
                if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0:
                    raise ValueError(f"{net}: Gemm with transA/alpha/beta is not exported")
                ops.append({"op": "gemm", "transB": int(at.get("transB", 0))})
            elif node.op_type == "Relu":
                ops.append({"op": "relu"})
            elif node.op_type == "MaxPool":
                ops.append({"op": "maxpool", "kernel": list(at["kernel_shape"]), "strides": list(at["strides"])})
            elif node.op_type == "Flatten":
                ops.append({"op": "flatten"})
            else:
                raise ValueError(f"{net}: op {node.op_type} is not exported for the peers")
        specs[net] = {"ops": ops, "n_weights": n}
    np.savez(path, specs=np.array(json.dumps(specs)), **arrays)
    return path


def run_networks(peer: str, nets: list[str], batches: list[int], x: np.ndarray, queries: int = 3,
                 timeout: float = 3600) -> dict[str, Any] | NotMeasured:
    """The peer on veil's networks `nets` at `batches`, query input x[:batch]. Returns the peer's JSON:
    {"peer", ..., "records": [{"net", "batch", "setup_s", "total_s", "total_bytes", "rounds",
    ["online_s", "online_bytes", "offline_s"], "logits"}]}."""
    with tempfile.TemporaryDirectory(prefix="veil-peer-") as tmp:
        t = Path(tmp)
        common = ["--nets", ",".join(nets), "--batches", ",".join(map(str, batches)), "--queries", str(queries)]
        if peer == "crypten":
            np.savez(t / "x.npz", x=np.asarray(x, np.float32))
            return _run(peer, ["networks", "--models", str(MODELS), "--input", str(t / "x.npz"), *common],
                        t / "out.json", timeout)
        export_chain(nets, x, t / "nets.npz")
        return _run(peer, ["networks", "--npz", str(t / "nets.npz"), *common], t / "out.json", timeout)


def max_abs_error(values: Any, reference: np.ndarray) -> float:
    return float(np.abs(np.asarray(values, np.float64) - np.asarray(reference, np.float64)).max())


def encoder_layer_peers(seq: int = 16, queries: int = 1, peers: tuple[str, ...] = PEERS,
                        timeout: float = 1800) -> list[dict[str, Any]]:
    """One encoder layer of bench/encoder_layer.py (same weights and input) under each peer and variant:
    dicts {peer, variant, setup_s, time_s, bytes, rounds, max_err, note}; a peer that cannot run gives one
    dict with time_s None and note "not measured: reason"."""
    sys.path.insert(0, str(REPO / "bench"))
    import encoder_layer

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="veil-peer-") as tmp:
        npz = encoder_layer.save_npz(Path(tmp) / "layer.npz", seq=seq)
        ref = np.load(npz)["y"]
        for peer in peers:
            res = _run(peer, ["encoder", "--npz", str(npz), "--queries", str(queries)], Path(tmp) / f"{peer}.json",
                       timeout)
            if isinstance(res, NotMeasured):
                rows.append({"peer": peer, "variant": "-", "setup_s": None, "time_s": None, "bytes": None,
                             "rounds": None, "max_err": None, "note": str(res)})
                continue
            for r in res["records"]:
                rows.append({"peer": res["peer"], "variant": r["variant"], "setup_s": r["setup_s"],
                             "time_s": r["total_s"], "bytes": r["total_bytes"], "rounds": r["rounds"],
                             "max_err": max_abs_error(r["y"], ref), "note": res.get("provider", res.get("protocol", ""))})
    return rows


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="the peers on one encoder layer (bench/encoder_layer.py)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--peers", default=",".join(PEERS))
    a = ap.parse_args()
    for row in encoder_layer_peers(a.seq, a.queries, tuple(a.peers.split(","))):
        if row["time_s"] is None:
            print(f"{row['peer']}: {row['note']}")
        else:
            print(f"{row['peer']} [{row['variant']}]: {row['time_s']:.3f} s, max error {row['max_err']:.3g}, "
                  f"{row['bytes'] / 1e6:.1f} MB, {row['rounds']} rounds ({row['note']})")


if __name__ == "__main__":
    _main()
