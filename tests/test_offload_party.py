"""offload mode as separate processes over mutual TLS: ``veil party --as enclave|accelerator|user``."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from veil.net import connect_tls, create_keys, write_deployment
from veil.net.ports import free_ports
from veil.offload import party as offload_party
from veil.plain import run_plain


def make_deployment(tmp_path, accelerators=("accelerator",), weight_privacy="none"):
    names = ["enclave", *accelerators, "user"]
    ports = free_ports(len(names))
    graph_path = tmp_path / "D.onnx"
    import torch

    from veil.graph.torch_import import torch_to_onnx_bytes
    from veil.offload.examples import mnist_module

    torch.manual_seed(4)
    graph_path.write_bytes(torch_to_onnx_bytes(mnist_module("D"), torch.zeros(1, 1, 28, 28),
                                               output_names=("logits",)))
    x = np.random.default_rng(2).random((6, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    dep = write_deployment(
        tmp_path / "offload.toml", "offload-test", "offload", {n: f"127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)},
        timeout=20, options={"model": str(graph_path), "precompute": 8, "hazmat_simulate": True, "backend": "numpy",
                             "inputs": str(tmp_path / "x.npy"), "batch": 4, "weight_privacy": weight_privacy})
    create_keys(dep)
    return dep, graph_path, x


@pytest.fixture()
def deployment(tmp_path):
    return make_deployment(tmp_path)


@pytest.mark.parametrize("weight_privacy", ["none", "shares"])
def test_parties_over_mutual_tls_in_threads(tmp_path, weight_privacy) -> None:
    accs = ("accelerator",) if weight_privacy == "none" else ("accelerator0", "accelerator1")
    dep, graph_path, x = make_deployment(tmp_path, accs, weight_privacy)
    results: dict[str, object] = {}
    errors: dict[str, BaseException] = {}

    def body(name: str) -> None:
        try:
            ch = connect_tls(dep, name, offload_party.peers_of(dep, name), connect_timeout=20)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results[name] = offload_party.run_party(dep, name, ch)
            finally:
                ch.close()
        except BaseException as e:  # noqa: BLE001
            errors[name] = e

    threads = [threading.Thread(target=body, args=(n,), daemon=True) for n in ("enclave", *accs, "user")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a party hung"
    assert not errors, errors
    from veil.graph import load_model

    ref = next(iter(run_plain(load_model(graph_path), x).values())).argmax(-1)
    assert results["user"]["predictions"] == ref.tolist()
    assert results["enclave"]["counters"]["samples"] == 6 and results["enclave"]["material_left"] == 2


def test_veil_party_processes(deployment) -> None:
    dep, graph_path, x = deployment
    procs = {}
    try:
        for name in ("enclave", "accelerator", "user"):
            procs[name] = subprocess.Popen([sys.executable, "-m", "veil.cli.main", "party", "-d", str(dep.path),
                                            "--as", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outs = {n: p.communicate(timeout=120)[0] for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert all(p.returncode == 0 for p in procs.values()), outs
    assert "SIMULATED" in outs["enclave"]
    assert "6 predictions" in outs["user"]


def test_enclave_refuses_to_start_without_the_simulation_opt_in(deployment) -> None:
    dep, _, _ = deployment
    dep.options["hazmat_simulate"] = False
    from veil.errors import SimulationNotAllowedError

    with pytest.raises(SimulationNotAllowedError):
        offload_party.run_party(dep, "enclave", None)  # fails before touching the channel



def test_enclave_role_reports_bad_user_input_and_keeps_serving(deployment) -> None:
    from veil.net.local import run_local

    dep, graph_path, x = deployment
    replies = []

    def user(ch):
        ch.send("enclave", {"type": "infer", "x": np.zeros((1, 1, 27, 28), np.float32)})
        replies.append(ch.recv("enclave", timeout=30))
        ch.send("enclave", {"type": "infer", "x": x[:2]})
        replies.append(ch.recv("enclave", timeout=30))
        ch.send("enclave", {"type": "bye"})
        return "ok"

    def role(name):
        def body(ch):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return offload_party.run_party(dep, name, ch)
        return body

    results, _ = run_local({"enclave": role("enclave"), "accelerator": role("accelerator"), "user": user}, timeout=30)
    assert replies[0]["type"] == "error" and "shape" in replies[0]["message"]
    from veil.graph import load_model

    ref = next(iter(run_plain(load_model(graph_path), x[:2], dtype=np.float64).values()))
    got = next(iter(replies[1]["outputs"].values()))
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())
    assert results["enclave"]["counters"]["queries"] == 1
