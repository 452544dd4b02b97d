"""Offload training as separate processes over mutual TLS: the data owner gets an ONNX model that the
plain executor, onnxruntime and offload inference serve unchanged; a killed accelerator process is a
clear error and the sealed checkpoint survives."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from offload_train_helpers import runtime
from veil.errors import VeilError
from veil.graph import load_model
from veil.offload import OffloadEnclave, run_offload_local
from veil.offload.training import TrainConfig, Trainer, train_offload_local
from veil.offload.training.launch import run_train_deployment
from veil.offload.training.party import owner_request
from veil.plain import run_plain

OPTS = {"model": "A", "data": "mnist-slice", "n": 64, "batch_size": 32, "epochs": 1, "hazmat_allow_simulation": True,
        "backend": "numpy", "optimizer": "sgd", "lr": 0.05, "seed": 1, "min_intensity": 16.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("train")
    progress: list = []
    res = run_train_deployment(wd, OPTS, recv_timeout=30, on_progress=progress.append)
    return res, progress


def test_training_over_tls_processes_matches_the_in_process_run_bit_for_bit(trained):
    res, progress = trained
    assert [m["step"] for m in progress] == [1, 2] and all(m["loss"] > 0 for m in progress)
    req = owner_request(OPTS)
    tr = Trainer(req["model"], req["feeds"], req["labels"], TrainConfig.from_dict(req["config"]))
    run = train_offload_local(tr, runtime(), min_intensity=16.0)
    assert run.counters["local_products"] > 0 and run.counters["products"] > 0  # A's 10-class layer stays inside
    assert tr.history == res["history"]
    assert tr.onnx_bytes() == res["onnx"]
    assert res["counters"]["freivalds_checks"] == res["counters"]["products"]  # one check per product (on Z0 + Z1 + C)


def test_the_trained_model_is_served_by_plain_onnxruntime_and_offload_inference(trained):
    res, _ = trained
    graph = load_model(res["onnx"])
    from veil.assets import load_slice

    x, _ = load_slice(32)
    plain = run_plain(graph, x)["logits"] if "logits" in graph.outputs else next(iter(run_plain(graph, x).values()))
    sess = ort.InferenceSession(res["onnx"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(plain, ref, rtol=1e-4, atol=1e-5)
    enc = OffloadEnclave(graph, runtime())
    enc.precompute(32)
    off = next(iter(run_offload_local(enc, [x], backend="numpy").outputs[0].values()))
    assert np.abs(off - plain).max() <= 2e-3 * max(1.0, np.abs(plain).max())
    assert (off.argmax(-1) == plain.argmax(-1)).mean() >= 0.97


def test_a_killed_accelerator_process_is_a_clear_error_and_the_checkpoint_survives(tmp_path):
    opts = {**OPTS, "n": 128, "checkpoint": "run.ckpt", "checkpoint_every": 1, "sealing_key": "sealing.key"}
    with pytest.raises(VeilError, match="accelerator1"):
        run_train_deployment(tmp_path, opts, recv_timeout=10, kill_after_steps=("accelerator1", 2))
    assert (tmp_path / "run.ckpt").is_file()
    req = owner_request({**opts})
    tr = Trainer(req["model"], req["feeds"], req["labels"], TrainConfig.from_dict(req["config"]))
    tr.resume(tmp_path / "run.ckpt", runtime(tmp_path / "sealing.key"))
    assert tr.step_count >= 2 and len(tr.history) == tr.step_count


def test_cli_train_refuses_without_the_simulation_opt_in():
    from veil.cli.main import app

    r = CliRunner().invoke(app, ["offload", "train", "A", "--n", "8"])
    assert r.exit_code != 0
    assert "--hazmat-" in (r.output + str(r.exception))


@pytest.mark.filterwarnings("ignore:offload mode. the enclave is SIMULATED")  # expected: the simulated enclave warns
def test_every_role_through_veil_party_dispatch_writes_the_owners_model(tmp_path):
    """The roles as ``veil party`` runs them (offload party module, task = train), here over in-memory
    channels: the owner writes the trained model and a JSON report next to the deployment file."""
    from veil.net import run_local, write_deployment
    from veil.offload.party import peers_of, run_party
    from veil.offload.training.party import TRAIN_PARTIES

    dep = write_deployment(tmp_path / "train.toml", "t", "offload", {p: "127.0.0.1:1" for p in TRAIN_PARTIES},
                           timeout=30, options={"task": "train", **OPTS, "output": "model.onnx"})
    assert set(peers_of(dep, "owner")) == {"enclave"}
    run_local({p: (lambda ch, p=p: run_party(dep, p, ch)) for p in TRAIN_PARTIES}, timeout=60)
    g = load_model(tmp_path / "model.onnx")
    assert g.outputs and (tmp_path / "model.json").is_file()
