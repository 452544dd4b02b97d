"""`veil attested upload` and `veil attested run` against a real server process on loopback.

Reference: onnxruntime run in-process on the same ONNX bytes (the same runtime on the same CPU:
outputs must be bit-identical). The server process is stopped at the end (ServerProcess)."""

from __future__ import annotations

import stat
import subprocess
import sys
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_attested_support import tiny_inputs, tiny_model
from veil.attested import Policy, connect
from veil.attested.testing import ServerProcess

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("store"))
    try:
        srv.start()
        yield srv
    finally:
        srv.close()
    assert srv.returncode == 0  # stopped by SIGTERM, store closed


def veil(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "veil.cli.main", "attested", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _trust(srv: ServerProcess, pin: bool = True, allow: bool = True) -> list[str]:
    # the measurement the server reports (other sessions may edit veil files while the tests run)
    args = ["--server", f"127.0.0.1:{srv.port}", "--measurement", srv.info["measurement"]]
    if pin:
        args += ["--simulation-signer", srv.info["simulation_signer"]]
    return args + (["--hazmat-allow-simulation"] if allow else [])


def _reference(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))


def _stored_ids(srv: ServerProcess) -> set[str]:
    policy = Policy(code_measurement=srv.info["measurement"], simulation_signers=[srv.info["simulation_signer"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with connect(srv.url, policy=policy, credential=srv.upload_token, hazmat_allow_simulation=True) as c:
            return {m.model_id for m in c.list_models()}


def test_upload_and_run_match_onnxruntime(server, tmp_path):
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_model().SerializeToString())
    token = server.state_dir / "upload.token"
    up = veil("upload", str(model), "--credential-file", str(token), "--run-credential-out", str(tmp_path / "run.tok"),
              *_trust(server), cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "SIMULATED enclave" in up.stderr and "verified: platform simulated" in up.stderr
    assert "uploaded tiny:" in up.stdout
    owner = tmp_path / "tiny.owner.token"  # default: MODEL_ID.owner.token
    for f in (owner, tmp_path / "run.tok"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        secret = f.read_text().strip()
        assert secret.startswith("veil_") and secret not in up.stdout + up.stderr  # never printed
    assert server.upload_token not in up.stdout + up.stderr

    feed = tiny_inputs(3, seed=4)
    np.savez(tmp_path / "x.npz", **feed)
    out = tmp_path / "y.npz"
    r = veil("run", "tiny", "--input", str(tmp_path / "x.npz"), "--credential-file", str(tmp_path / "run.tok"),
             "--out", str(out), *_trust(server))
    assert r.returncode == 0, r.stderr
    assert "SIMULATED enclave" in r.stderr and "model 'tiny' attested" in r.stderr
    got = dict(np.load(out))
    ref = _reference(model.read_bytes(), feed)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    assert "y: float32 (3, 3)" in r.stdout

    # the uploaded bytes are the attested ones: another expected hash is refused before running
    bad = veil("run", "tiny", "--input", str(tmp_path / "x.npz"), "--credential-file", str(owner),
               "--model-sha256", "0" * 64, *_trust(server))
    assert bad.returncode == 2 and "ModelHashMismatchError" in bad.stderr and "Traceback" not in bad.stderr


def test_one_input_model_from_npy(server, tmp_path):
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "W")
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "one",
                              [vi("x", TensorProto.FLOAT, ["N", 4])], [vi("y", TensorProto.FLOAT, ["N", 2])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (tmp_path / "one.onnx").write_bytes(m.SerializeToString())
    up = veil("upload", str(tmp_path / "one.onnx"), "--credential-file", str(server.state_dir / "upload.token"),
              "--model-id", "one-in", "--owner-credential-out", str(tmp_path / "own"), *_trust(server))
    assert up.returncode == 0, up.stderr
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = veil("run", "one-in", "--input", str(tmp_path / "x.npy"), "--credential-file", str(tmp_path / "own"),
             "--out", str(tmp_path / "y.npz"), *_trust(server))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "y.npz")["y"], _reference(m.SerializeToString(), {"x": x})["y"])


def test_simulated_server_is_refused_without_opt_in_and_pin(server, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_model(0.3).SerializeToString())
    token = str(server.state_dir / "upload.token")
    unpinned = veil("upload", str(model), "--credential-file", token, *_trust(server, pin=False), cwd=tmp_path)
    assert unpinned.returncode == 2 and "UntrustedSignerError" in unpinned.stderr
    assert server.info["simulation_signer"] in unpinned.stderr  # the value to check and pin
    no_opt_in = veil("upload", str(model), "--credential-file", token, *_trust(server, allow=False), cwd=tmp_path)
    assert no_opt_in.returncode == 2 and "SimulationNotAllowedError" in no_opt_in.stderr
    for r in (unpinned, no_opt_in):
        assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in r.stderr
    assert "m" not in _stored_ids(server) and not (tmp_path / "m.owner.token").exists()  # nothing was sent
    missing = veil("run", "m", "--input", str(tmp_path / "nope.npz"), "--credential-file", token, *_trust(server))
    assert missing.returncode == 2 and "nope.npz" in missing.stderr and "Traceback" not in missing.stderr
