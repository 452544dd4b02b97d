"""A real attested server process on loopback, driven by the client: happy path, access control,
malformed and oversized uploads and inputs, rate limits, persistence across a restart.

Reference: onnxruntime run in-process on the same ONNX bytes (outputs must be bit-identical, the
same runtime on the same CPU) and the NumPy formula of the tiny model (float tolerance 1e-5)."""

from __future__ import annotations

import base64
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from test_attested_support import tiny_inputs, tiny_model
from veil.attested import (
    AccessDeniedError,
    AuthenticationError,
    InvalidModelError,
    InvalidRequestError,
    LimitExceededError,
    ModelExistsError,
    ModelNotFoundError,
    Policy,
    RateLimitedError,
    connect,
    local_code_measurement,
)
from veil.attested.measure import sha256_hex
from veil.attested.testing import ServerProcess

pytestmark = pytest.mark.timeout(120)

LIMITS = ("--max-model-mb", "1", "--max-input-elements", "10000", "--max-request-mb", "1",
          "--rate", "1000", "--burst", "1000")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("store"), extra_args=LIMITS)
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


def _policy(srv: ServerProcess) -> Policy:
    # the measurement the server printed at start; test_server_measurement_matches_local_install checks
    # that it is the one this installation computes (other sessions editing veil files cannot race us)
    return Policy(code_measurement=srv.info["measurement"], simulation_signers=[srv.info["simulation_signer"]])


def _connect(srv: ServerProcess, credential: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return connect(srv.url, policy=_policy(srv), credential=credential, hazmat_allow_simulation=True)


@pytest.fixture
def conn(server):
    c = _connect(server, server.upload_token)
    try:
        yield c
    finally:
        c.close()


def _reference(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))


def _healthy(conn) -> None:
    assert conn._request("GET", "/health", None).json()["status"] == "ok"


def test_server_measurement_matches_local_install(server):
    assert server.info["measurement"] == local_code_measurement()
    assert server.info["platform"] == "simulated"


def test_happy_path_all_dtypes_several_inputs_and_outputs(conn):
    model = tiny_model().SerializeToString()
    up = conn.upload_model(model, "happy")
    assert up.sha256 == sha256_hex(model) and up.owner_credential.startswith("veil_own_")
    listed = {m.model_id: m for m in conn.list_models(credential=up.owner_credential)}
    assert listed["happy"].sha256 == sha256_hex(model)
    assert [i["dtype"] for i in listed["happy"].inputs] == ["float32", "float64", "int32", "int64", "uint8", "bool"]
    assert {m.model_id: m.sha256 for m in conn.list_models()}["happy"] is None  # the operator sees no hash
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fresh evidence plus the inclusion proof of the model's hash, for its owner
        assert conn.attest_model("happy", credential=up.owner_credential) == sha256_hex(model)

    inputs = tiny_inputs(3)
    res = conn.run_model("happy", inputs, credential=up.owner_credential)
    ref = _reference(model, inputs)
    assert res.model_sha256 == sha256_hex(model)
    assert set(res) == set(ref)
    for k in ref:
        assert res[k].dtype == ref[k].dtype and res[k].shape == ref[k].shape
        np.testing.assert_array_equal(res[k], ref[k])
    w = (np.arange(12, dtype=np.float32).reshape(4, 3) * 0.1).astype(np.float32)
    np.testing.assert_allclose(res["y"], inputs["x"] @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res["nb"], ~inputs["b"])

    only = conn.run_model("happy", inputs, credential=up.owner_credential, outputs=["n2"])
    assert list(only) == ["n2"]
    conn.delete_model("happy", credential=up.owner_credential)
    assert "happy" not in {m.model_id for m in conn.list_models()}
    with pytest.raises(AuthenticationError):  # deleting the model revoked its credentials
        conn.run_model("happy", inputs, credential=up.owner_credential)
    with pytest.raises(ModelNotFoundError):
        conn.run_model("happy", inputs)  # the operator learns that it is gone


def test_torch_and_positional_inputs(conn):
    model = tiny_model(0.3)
    up = conn.upload_model(model, "torchy")
    try:
        inputs = tiny_inputs(2, seed=5)
        ref = _reference(model.SerializeToString(), inputs)
        as_torch = {k: torch.from_numpy(v) for k, v in inputs.items()}
        res = conn.run_model("torchy", as_torch, credential=up.owner_credential)
        positional = conn.run_model("torchy", [as_torch[k] for k in ("x", "d", "i", "n", "u", "b")],
                                    credential=up.owner_credential)
        for k in ref:
            np.testing.assert_array_equal(res[k], ref[k])
            np.testing.assert_array_equal(positional[k], ref[k])
    finally:
        conn.delete_model("torchy", credential=up.owner_credential)


def test_openapi_description(conn):
    spec = conn._request("GET", "/openapi.json", None).json()
    paths = spec["paths"]
    assert {"/attestation", "/models", "/models/{model_id}", "/models/{model_id}/run",
            "/models/{model_id}/credentials"} <= set(paths)
    assert {"post", "put", "delete"} <= set(paths["/models/{model_id}"])
    assert "application/octet-stream" in paths["/models/{model_id}"]["post"]["requestBody"]["content"]


def test_every_access_control_refusal(server, conn):
    a = conn.upload_model(tiny_model(0.1), "acl-a")
    b = conn.upload_model(tiny_model(0.2), "acl-b")
    run_a = conn.create_run_credential("acl-a", credential=a.owner_credential)
    assert run_a.startswith("veil_run_")
    model_c = tiny_model(0.7).SerializeToString()
    x = tiny_inputs()
    try:
        anon = _connect(server, None)
        with anon:
            for call in (lambda: anon.list_models(), lambda: anon.upload_model(model_c, "acl-c"),
                         lambda: anon.run_model("acl-a", x), lambda: anon.delete_model("acl-a"),
                         lambda: anon.create_run_credential("acl-a"),
                         lambda: anon.upload_model(model_c, "acl-a", replace=True)):
                with pytest.raises(AuthenticationError) as ei:
                    call()
                assert ei.value.status == 401
            for bogus in ("veil_own_forged", "Basic abc", conn.credential + "x"):
                with pytest.raises(AuthenticationError):
                    anon.list_models(credential=bogus)
        # run credential: may run its model, nothing else
        assert conn.run_model("acl-a", x, credential=run_a)["y"].shape == (2, 3)
        assert [m.model_id for m in conn.list_models(credential=run_a)] == ["acl-a"]
        refusals = [
            lambda: conn.upload_model(model_c, "acl-c", credential=run_a),
            lambda: conn.upload_model(model_c, "acl-a", credential=run_a, replace=True),
            lambda: conn.delete_model("acl-a", credential=run_a),
            lambda: conn.create_run_credential("acl-a", credential=run_a),
            lambda: conn.run_model("acl-b", x, credential=run_a),
            # owner of a: nothing on b, cannot add models
            lambda: conn.delete_model("acl-b", credential=a.owner_credential),
            lambda: conn.run_model("acl-b", x, credential=a.owner_credential),
            lambda: conn.upload_model(model_c, "acl-b", credential=a.owner_credential, replace=True),
            lambda: conn.create_run_credential("acl-b", credential=a.owner_credential),
            lambda: conn.upload_model(model_c, "acl-c", credential=a.owner_credential),
            # upload credential: adds models, but cannot run, replace or delete them
            lambda: conn.run_model("acl-a", x),
            lambda: conn.delete_model("acl-a"),
            lambda: conn.upload_model(model_c, "acl-a", replace=True),
        ]
        for call in refusals:
            with pytest.raises(AccessDeniedError) as ei:
                call()
            assert ei.value.status == 403 and ei.value.code == "forbidden"
        with pytest.raises(ModelExistsError):
            conn.upload_model(model_c, "acl-a")
        # the owner alone replaces; the run credential keeps working on the new bytes
        rep = conn.upload_model(model_c, "acl-a", credential=a.owner_credential, replace=True)
        assert rep.sha256 == sha256_hex(model_c)
        res = conn.run_model("acl-a", x, credential=run_a)
        assert res.model_sha256 == sha256_hex(model_c)
        np.testing.assert_array_equal(res["y"], _reference(model_c, x)["y"])
        # deleting revokes the model's credentials
        conn.delete_model("acl-a", credential=a.owner_credential)
        with pytest.raises(AuthenticationError):
            conn.run_model("acl-a", x, credential=run_a)
        assert "acl-b" in {m.model_id for m in conn.list_models()}
    finally:
        conn.delete_model("acl-b", credential=b.owner_credential)
    _healthy(conn)
    log = server.log_text()
    assert "SIMULATED" in log  # the server says it is a simulation
    for secret in (conn.credential, a.owner_credential, b.owner_credential, run_a):
        assert secret not in log  # credentials never reach the server's log


def _external_data_model() -> bytes:
    m = tiny_model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="/etc/passwd")
    return m.SerializeToString()


def _float16_input_model() -> bytes:
    vi = helper.make_tensor_value_info
    g = helper.make_graph([helper.make_node("Identity", ["h"], ["o"])], "h",
                          [vi("h", TensorProto.FLOAT16, [2])], [vi("o", TensorProto.FLOAT16, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def test_malformed_uploads_are_refused_and_server_stays_up(conn):
    cases = {
        b"this is not an onnx model": "not a valid ONNX model",
        b"": "empty",
        _external_data_model(): "external data",
        _float16_input_model(): "float16",
        tiny_model().SerializeToString()[:-40]: "",
    }
    for data, reason in cases.items():
        with pytest.raises(InvalidModelError) as ei:
            conn.upload_model(data, "broken")
        assert ei.value.status == 400 and reason in str(ei.value)
        _healthy(conn)
    for bad_id in ("../escape", "-leading-dash", "x" * 65):  # refused by the client before sending
        with pytest.raises(InvalidRequestError, match="model ids"):
            conn.upload_model(tiny_model().SerializeToString(), bad_id)
    for bad_id in ("-leading-dash", "x" * 65, "a%20b"):  # and by the server
        r = conn._client.post(f"/models/{bad_id}", content=b"x", headers={"Authorization": f"Bearer {conn.credential}"})
        assert r.status_code == 400 and r.json()["error"] == "bad_model_id"
        _healthy(conn)
    assert "broken" not in {m.model_id for m in conn.list_models()}


def test_oversized_uploads_refused_on_real_size(conn):
    big = b"\0" * (1024 * 1024 + 1)
    with pytest.raises(LimitExceededError, match="more than 1048576 bytes received") as ei:
        conn.upload_model(big, "huge")  # streamed in chunks: no declared length, the real count decides
    assert ei.value.code == "model_too_large"
    # a declared Content-Length beyond the limit is refused before the body is read
    r = conn._client.post("/models/huge2", content=big, headers={"Authorization": f"Bearer {conn.credential}"})
    assert r.status_code == 413 and "declares 1048577 bytes" in r.json()["detail"]
    _healthy(conn)


def test_malformed_and_oversized_inputs(conn):
    up = conn.upload_model(tiny_model(0.5), "inputs")
    own = up.owner_credential
    good = tiny_inputs()
    try:
        bad_inputs = [
            ({k: v for k, v in good.items() if k != "b"}, "missing ['b']"),
            ({**good, "zzz": np.zeros(1, np.float32)}, "unknown ['zzz']"),
            ({**good, "x": good["x"].astype(np.float64)}, "expects float32"),
            ({**good, "i": np.zeros(4, np.int32)}, "expects (3)"),
            ({**good, "x": np.zeros((2, 4, 1), np.float32)}, "expects (?, 4)"),
        ]
        for inputs, reason in bad_inputs:
            with pytest.raises(InvalidRequestError) as ei:
                conn.run_model("inputs", inputs, credential=own)
            assert ei.value.status == 422 and reason in str(ei.value), str(ei.value)

        def raw(body: bytes | dict) -> tuple[int, dict]:
            kw = {"json": body} if isinstance(body, dict) else {"content": body}
            r = conn._client.post("/models/inputs/run", headers={"Authorization": f"Bearer {own}"}, **kw)
            return r.status_code, r.json()

        enc = {k: {"dtype": v.dtype.name, "shape": list(v.shape), "data": base64.b64encode(v.tobytes()).decode()}
               for k, v in good.items()}
        lying = json.loads(json.dumps(enc))
        lying["x"]["shape"] = [1, 4]  # declares 4 elements, carries 8
        status, body = raw({"inputs": lying})
        assert status == 400 and body["error"] == "malformed_input" and "needs 16 bytes" in body["detail"]
        assert raw(b"{not json")[0] == 400
        assert raw({"inputs": {**enc, "x": {**enc["x"], "dtype": "complex64"}}})[1]["error"] == "malformed_input"
        assert raw({"inputs": {**enc, "x": {**enc["x"], "data": "***"}}})[1]["error"] == "malformed_input"
        assert raw({"nothing": 1})[1]["error"] == "malformed_request"
        # real element count over the limit (10000), whatever the declared shape says
        many = np.zeros((10001, 4), np.float32)
        with pytest.raises(LimitExceededError, match="40004 elements") as ei:
            conn.run_model("inputs", {**good, "x": many}, credential=own)
        assert ei.value.code == "input_too_large"
        small_decl = {**enc, "x": {"dtype": "float32", "shape": [1, 4],  # declares 4, carries 40004
                                   "data": base64.b64encode(many.tobytes()).decode()}}
        status, body = raw({"inputs": small_decl})
        assert status == 413 and body["error"] == "input_too_large"
        with pytest.raises(LimitExceededError, match="request"):
            conn.run_model("inputs", {**good, "x": np.zeros((300000, 4), np.uint8)}, credential=own)
        _healthy(conn)
        assert conn.run_model("inputs", good, credential=own)["y"].shape == (2, 3)
    finally:
        conn.delete_model("inputs", credential=own)


def test_rate_limit_per_credential(tmp_path):
    with ServerProcess(tmp_path / "s", extra_args=("--rate", "0.05", "--burst", "3")) as srv:
        c = _connect(srv, srv.upload_token)
        with c:
            up = c.upload_model(tiny_model(), "rl")  # 1 token of the upload credential
            c.list_models()
            c.list_models()
            with pytest.raises(RateLimitedError) as ei:
                c.list_models()
            assert ei.value.status == 429 and ei.value.retry_after is not None and ei.value.retry_after >= 1
            assert "retry in" in str(ei.value)
            # another credential has its own bucket
            assert c.run_model("rl", tiny_inputs(), credential=up.owner_credential)["y"].shape == (2, 3)
            assert c._request("GET", "/health", None).status_code == 200


def test_persistence_restart_dedup_and_sealing(tmp_path):
    store = tmp_path / "store"
    m1 = tiny_model(0.11)
    m1_bytes, m2_bytes = m1.SerializeToString(), tiny_model(0.22).SerializeToString()
    weights = m1.graph.initializer[0].raw_data
    x = tiny_inputs(4, seed=9)
    srv = ServerProcess(store)
    try:
        srv.start()
        with _connect(srv, srv.upload_token) as c:
            a = c.upload_model(m1_bytes, "a")
            b = c.upload_model(m1_bytes, "b")  # stored once; the answer does not say so
            c2 = c.upload_model(m2_bytes, "c")
            assert not hasattr(b, "deduplicated")
            user = c.create_run_credential("a", credential=a.owner_credential)
            user_c = c.create_run_credential("c", credential=c2.owner_credential)
            before = c.run_model("a", x, credential=user)
        blobs = sorted((store / "blobs").glob("*.sealed"))
        assert len(blobs) == 2
        for f in [p for p in store.rglob("*") if p.is_file()]:
            content = f.read_bytes()
            assert weights not in content and m1_bytes[:64] not in content, f"plaintext model bytes in {f.name}"
            assert a.owner_credential.encode() not in content and user.encode() not in content
        first_key = srv.info["tls_spki_sha256"]

        srv.restart()
        assert srv.info["tls_spki_sha256"] != first_key  # a fresh TLS key per start
        with _connect(srv, srv.upload_token) as c:
            assert {m.model_id for m in c.list_models()} == {"a", "b", "c"}
            assert [m.sha256 for m in c.list_models(credential=b.owner_credential)] == [sha256_hex(m1_bytes)]
            assert c.attest_model("a", credential=user) == sha256_hex(m1_bytes)
            after = c.run_model("a", x, credential=user)
            for k in before:
                np.testing.assert_array_equal(after[k], before[k])
            c.delete_model("a", credential=a.owner_credential)
            assert len(list((store / "blobs").glob("*.sealed"))) == 2  # b still refers to the blob
            c.delete_model("b", credential=b.owner_credential)
            assert len(list((store / "blobs").glob("*.sealed"))) == 1
            with pytest.raises(AuthenticationError):  # revoked with its model
                c.run_model("a", x, credential=user)
            assert c.run_model("c", x, credential=user_c).model_sha256 == sha256_hex(m2_bytes)
            with pytest.raises(AccessDeniedError):
                c.delete_model("c", credential=user_c)
    finally:
        srv.close()


def test_cli_attest_verifies_and_refuses_simulation_without_opt_in(server):
    import subprocess
    import sys

    base = [sys.executable, "-m", "veil.attested", "attest", f"127.0.0.1:{server.port}",
            "--measurement", server.info["measurement"], "--simulation-signer", server.info["simulation_signer"]]
    ok = subprocess.run([*base, "--hazmat-allow-simulation"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "verified" in ok.stdout and "SIMULATED" in ok.stdout and server.info["tls_spki_sha256"][:20] in ok.stdout
    refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "SimulationNotAllowedError" in refused.stderr
    other = subprocess.run([*base[:5], "--measurement", "0" * 64, *base[7:], "--hazmat-allow-simulation"],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "MeasurementMismatchError" in other.stderr
    # no pinned simulation signer: refused, and the value to pin is printed
    unpinned = subprocess.run([*base[:7], "--hazmat-allow-simulation"], capture_output=True, text=True, timeout=60)
    assert unpinned.returncode == 2 and "UntrustedSignerError" in unpinned.stderr
    assert f"simulation signer: {server.info['simulation_signer']}" in unpinned.stdout
