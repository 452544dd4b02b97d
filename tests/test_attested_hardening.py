"""Issue 9's holes, each against a real attested server process on loopback: models reading files
next to the server, secrets under the store, the model-count race, the credential/delete race,
model ids with a newline, malformed and deeply nested bodies, what the evidence and the upload
answer tell strangers, output-size and run-time limits, SIGTERM, and the pinned simulation signer.

Reference for outputs: onnxruntime in-process on the same bytes, or the models' closed forms."""

from __future__ import annotations

import base64
import json
import stat
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from test_attested_support import (
    EXTERNAL_PLACES,
    expand_model,
    external_data_model,
    loop_model,
    tiny_inputs,
    tiny_model,
)
from veil.attested import (
    AccessDeniedError,
    AuthenticationError,
    InvalidModelError,
    LimitExceededError,
    ModelNotFoundError,
    Policy,
    UntrustedSignerError,
    connect,
)
from veil.attested.measure import sha256_hex
from veil.attested.testing import ServerProcess
from veil.errors import DeploymentError

pytestmark = pytest.mark.timeout(180)

SECRET = np.arange(1, 5, dtype=np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")  # the server's working directory, with a file a model would like to read
    (work / "secret.bin").write_bytes(SECRET.tobytes())
    srv = ServerProcess(work / "store", cwd=work, extra_args=("--max-run-seconds", "1", "--max-output-mb", "1",
                                                              "--max-run-memory-mb", "64", "--rate", "1000",
                                                              "--burst", "1000"))
    try:
        srv.start()
        srv.work = work
        yield srv
    finally:
        srv.close()


def _policy(srv: ServerProcess, **kw) -> Policy:
    kw.setdefault("code_measurement", srv.info["measurement"])
    kw.setdefault("simulation_signers", [srv.info["simulation_signer"]])
    return Policy(**kw)


def _connect(srv: ServerProcess, credential: str | None = None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return connect(srv.url, policy=_policy(srv, **kw), credential=credential, hazmat_allow_simulation=True)


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _health_ms(conn) -> float:
    t = time.perf_counter()
    assert conn._request("GET", "/health", None).json()["status"] == "ok"
    return (time.perf_counter() - t) * 1e3


# --- 1. external data, secrets outside the store ---------------------------------------------------------
def test_models_cannot_read_files_next_to_the_server(server):
    token_file = server.state_dir / "upload.token"
    with _connect(server, server.upload_token) as c:
        for place in EXTERNAL_PLACES:
            for location in ("secret.bin", "./store/index.sqlite3", str(token_file), "../" + server.work.name + "/secret.bin"):
                with pytest.raises(InvalidModelError, match="refers to external data"):
                    c.upload_model(external_data_model(place, location), "reader")
        assert "reader" not in {m.model_id for m in c.list_models()}
        _health_ms(c)


def test_no_secret_in_clear_under_the_store(server):
    with _connect(server, server.upload_token) as c:
        up = c.upload_model(tiny_model(0.4), "sealed")
        run = c.create_run_credential("sealed", credential=up.owner_credential)
    try:
        names = {p.relative_to(server.store).as_posix() for p in server.store.rglob("*")}
        assert "upload.token" not in names and not any(n.startswith("simulated-platform") for n in names)
        assert names <= {"index.sqlite3", "blobs"} | {n for n in names if n.startswith("blobs/") and n.endswith(".sealed")}
        signing_key = (server.state_dir / "simulated-platform" / "simulation_signing_key.pem").read_bytes()
        platform_secret = (server.state_dir / "simulated-platform" / "simulation_platform_secret").read_bytes()
        for f in (p for p in server.store.rglob("*") if p.is_file()):
            content = f.read_bytes()
            for secret in (server.upload_token.encode(), up.owner_credential.encode(), run.encode(), signing_key,
                           platform_secret):
                assert secret not in content, f"a secret in clear in {f.name}"
        for f in (server.state_dir / "upload.token", server.state_dir / "simulated-platform" / "simulation_signing_key.pem",
                  server.state_dir / "simulated-platform" / "simulation_platform_secret"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        for d in (server.state_dir, server.state_dir / "simulated-platform"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    finally:
        with _connect(server) as c:
            c.delete_model("sealed", credential=up.owner_credential)


def test_secrets_under_the_store_are_refused_at_start(tmp_path):
    old = tmp_path / "old-store"
    old.mkdir()
    (old / "upload.token").write_text("veil_upl_" + "x" * 40)  # the layout before issue 9
    for srv, refusal in ((ServerProcess(old, start_timeout=30), "holds secrets in clear"),
                         (ServerProcess(tmp_path / "store", state_dir=tmp_path / "store" / "state", start_timeout=30),
                          "inside the store")):
        try:
            with pytest.raises(DeploymentError, match=refusal):
                srv.start()
        finally:
            srv.stop()  # a server that wrongly started is not left running


# --- 2. --max-models under the lock that inserts ---------------------------------------------------------
def test_concurrent_uploads_respect_max_models(tmp_path):
    with ServerProcess(tmp_path / "store", extra_args=("--max-models", "2", "--rate", "1000", "--burst", "1000")) as srv:
        conns = [_connect(srv, srv.upload_token) for _ in range(6)]
        barrier = threading.Barrier(6)

        def upload(i: int) -> str:
            barrier.wait()
            try:
                conns[i].upload_model(tiny_model(0.1 + i / 10), f"m{i}")
                return "stored"
            except LimitExceededError as e:
                return e.code

        try:
            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(upload, range(6)))
            assert sorted(results) == ["store_full"] * 4 + ["stored"] * 2, results
            assert len(conns[0].list_models()) == 2
        finally:
            for c in conns:
                c.close()


# --- 3. credential issue vs delete; credentials bound to the model instance -------------------------------
def test_credentials_issued_while_deleting_never_run_the_next_model(server):
    x = tiny_inputs()
    with _connect(server, server.upload_token) as c:
        for rnd in range(3):
            up = c.upload_model(tiny_model(0.2), "race")
            before = c.create_run_credential("race", credential=up.owner_credential)
            issued: list[str] = []
            stop = threading.Event()

            def issue(owner: str = up.owner_credential, stop: threading.Event = stop, issued: list[str] = issued) -> None:
                with _connect(server, owner) as ic:
                    while not stop.is_set():
                        try:
                            issued.append(ic.create_run_credential("race"))
                        except (ModelNotFoundError, AuthenticationError, AccessDeniedError):
                            return

            threads = [threading.Thread(target=issue) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.05 * (rnd + 1))
            c.delete_model("race", credential=up.owner_credential)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            nxt = c.upload_model(tiny_model(0.9), "race")  # another model under the same id
            for cred in [before, up.owner_credential, *issued]:
                with pytest.raises(AuthenticationError):
                    c.run_model("race", x, credential=cred)
            assert _quiet(c.run_model, "race", x, credential=nxt.owner_credential)["y"].shape == (2, 3)
            c.delete_model("race", credential=nxt.owner_credential)


# --- 4. model ids: full match ----------------------------------------------------------------------------
def test_model_id_with_a_trailing_newline_is_refused(server):
    with _connect(server, server.upload_token) as c:
        auth = {"Authorization": f"Bearer {c.credential}"}
        for path in ("/models/abc%0A", "/models/abc%0D%0A", "/models/abc%0A/run", "/models/abc%0A/credentials"):
            r = c._client.post(path, content=tiny_model().SerializeToString(), headers=auth)
            assert r.status_code == 400 and r.json()["error"] == "bad_model_id", (path, r.text)
        assert "abc\n" not in {m.model_id for m in c.list_models()}


# --- 5. malformed bodies ---------------------------------------------------------------------------------
def test_malformed_and_deeply_nested_bodies_get_4xx_with_a_reason(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    bodies = [deep, b'{"inputs": ' + b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000 + b"}", b"\xff\xfe\x00", b"null",
              b"[]", b'"text"', b'{"inputs": 5}', b'{"inputs": {"x": 5}}', b'{"inputs": [1, 2, 3, 4, 5, 6]}',
              b'{"inputs": {"x": {"dtype": "float32", "shape": [[2]], "data": "AAAA"}}}',
              b'{"inputs": {"x": {"dtype": "float32", "shape": [1e999], "data": "AAAA"}}}',
              b'{"inputs": {"x": {"dtype": "float32", "shape": [2, 4], "data": 7}}, "outputs": "y"}']
    with _connect(server, server.upload_token) as c:
        up = c.upload_model(tiny_model(0.3), "bodies")
        own = {"Authorization": f"Bearer {up.owner_credential}"}
        upl = {"Authorization": f"Bearer {c.credential}"}
        try:
            for body in bodies:
                calls = [("POST", "/models/bodies/run", own), ("POST", "/models/newbody", upl),
                         ("PUT", "/models/bodies", own), ("POST", "/models/bodies/credentials", {}),
                         ("GET", "/models", {}), ("GET", "/attestation?nonce=zz", {}),
                         ("GET", "/models/bodies/attestation?nonce=" + "ab" * 32, {})]
                for method, path, headers in calls:
                    r = c._client.request(method, path, content=body, headers=headers)
                    assert 400 <= r.status_code < 500, (method, path, body[:40], r.status_code, r.text[:200])
                    answer = r.json()
                    assert answer["error"] and answer["detail"], (method, path)
            r = c._client.post("/models/bodies/run", content=deep, headers=own)
            assert r.json() == {"error": "malformed_request", "detail": "the run request body is nested too deeply"}
            _health_ms(c)
            assert _quiet(c.run_model, "bodies", tiny_inputs(), credential=up.owner_credential)["y"].shape == (2, 3)
        finally:
            c.delete_model("bodies", credential=up.owner_credential)
    assert "Traceback" not in server.log_text()


# --- 6. the evidence and the upload answer do not show the model set -------------------------------------
def test_attestation_does_not_show_the_models_to_strangers(server):
    m1, m2 = tiny_model(0.61).SerializeToString(), tiny_model(0.62).SerializeToString()
    with _connect(server, server.upload_token) as c:
        a = c.upload_model(m1, "hidden-a")
        raw = c._client.post("/models/hidden-b", content=m1, headers={"Authorization": f"Bearer {c.credential}"})
        b_owner = raw.json()["owner_credential"]
        assert raw.status_code == 201 and set(raw.json()) == {"model_id", "sha256", "size", "owner_credential"}
        c.upload_model(m2, "hidden-b", credential=b_owner, replace=True)
        run_a = c.create_run_credential("hidden-a", credential=a.owner_credential)
        try:
            roots = set()
            for _ in range(2):
                ev = c._client.get("/attestation", params={"nonce": "cd" * 32}).json()
                claims = base64.b64decode(ev["claims"]).decode()
                for secret in ("hidden-a", "hidden-b", sha256_hex(m1), sha256_hex(m2)):
                    assert secret not in claims and secret not in json.dumps(ev)
                roots.add(json.loads(claims)["models_root"])
            assert len(roots) == 2  # a fresh commitment each time: no way to tell whether the set changed
            # the operator's list shows ids, not hashes (it would tell which known models are stored)
            assert all(m.sha256 is None for m in c.list_models())
            # entitled clients verify their model's inclusion; others get no proof
            with _connect(server, run_a, models={"hidden-a": sha256_hex(m1)}) as user:
                assert _quiet(user.attest_model, "hidden-a") == sha256_hex(m1)
                assert _quiet(user.run_model, "hidden-a", tiny_inputs()).model_sha256 == sha256_hex(m1)
                with pytest.raises(AccessDeniedError):
                    user.attest_model("hidden-b")
            with pytest.raises(AccessDeniedError):
                c.attest_model("hidden-a")  # the operator is not entitled to the proof
            with _connect(server) as anon, pytest.raises(AuthenticationError):
                anon.attest_model("hidden-a")
            assert _quiet(c.attest_model, "hidden-b", credential=b_owner) == sha256_hex(m2)
        finally:
            c.delete_model("hidden-a", credential=a.owner_credential)
            c.delete_model("hidden-b", credential=b_owner)


# --- 7. output size and run time -------------------------------------------------------------------------
def test_run_time_and_output_limits_keep_the_server_responsive(server):
    with _connect(server, server.upload_token) as c:
        loop = c.upload_model(loop_model(), "forever")
        big = c.upload_model(expand_model(), "expand")
        tiny = c.upload_model(tiny_model(0.5), "small")
    try:
        result: dict[str, object] = {}

        def long_run() -> None:
            with _connect(server, loop.owner_credential) as lc:
                _quiet(lc.attest_model, "forever")
                t = time.monotonic()
                try:
                    lc.run_model("forever", {"x": np.zeros(1, np.float32)})
                except LimitExceededError as e:
                    result["error"] = e
                result["seconds"] = time.monotonic() - t

        th = threading.Thread(target=long_run)
        th.start()
        with _connect(server, tiny.owner_credential) as sc:
            time.sleep(0.3)  # the Loop is spinning now
            assert _health_ms(sc) < 2000
            x = tiny_inputs()
            out = _quiet(sc.run_model, "small", x)
            w = (np.arange(12, dtype=np.float32).reshape(4, 3) * 0.5).astype(np.float32)
            np.testing.assert_allclose(out["y"], x["x"] @ w, rtol=1e-5, atol=1e-5)
        th.join(timeout=60)
        assert not th.is_alive()
        err = result["error"]
        assert isinstance(err, LimitExceededError) and err.code == "run_time_exceeded" and err.status == 503
        assert "stopped after the limit of 1 s" in str(err)
        assert float(result["seconds"]) < 10  # stopped at its limit (1 s), not left spinning

        with _connect(server, big.owner_credential) as bc:
            with pytest.raises(LimitExceededError, match="16000000 bytes") as ei:  # 2 input elements, 16 MB out
                _quiet(bc.run_model, "expand", {"shape": np.array([2000, 2000], np.int64)})
            assert ei.value.code == "output_too_large" and ei.value.status == 413
            # 400 MB asked for: refused by onnxruntime's capped arena before it is allocated
            with pytest.raises(LimitExceededError, match="more memory than the 67108864 bytes") as ei:
                bc.run_model("expand", {"shape": np.array([10000, 10000], np.int64)})
            assert ei.value.code == "run_memory_exceeded" and ei.value.status == 413
            status = Path(f"/proc/{server.proc.pid}/status")
            if status.exists():  # Linux: the server's peak memory stayed far from the 400 MB asked for (x base64)
                peak_kb = int(next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM")).split()[1])
                assert peak_kb < 700 * 1024, peak_kb
            assert bc.run_model("expand", {"shape": np.array([3, 5], np.int64)})["y"].tolist() == [[1.0] * 5] * 3
            _health_ms(bc)
    finally:
        with _connect(server) as c:
            for up, mid in ((loop, "forever"), (big, "expand"), (tiny, "small")):
                c.delete_model(mid, credential=up.owner_credential)


# --- 8. SIGTERM ------------------------------------------------------------------------------------------
def test_sigterm_closes_the_store_and_exits_0(tmp_path):
    srv = ServerProcess(tmp_path / "store", extra_args=("--max-run-seconds", "120"))
    try:
        srv.start()
        with _connect(srv, srv.upload_token) as c:
            up = c.upload_model(loop_model(), "busy")
        errors: list[BaseException] = []

        def busy() -> None:  # a run in progress when the signal comes: onnxruntime is asked to stop it
            try:
                with _connect(srv, up.owner_credential) as bc:
                    _quiet(bc.run_model, "busy", {"x": np.zeros(1, np.float32)})
            except Exception as e:
                errors.append(e)

        th = threading.Thread(target=busy)
        th.start()
        time.sleep(1.5)
        t = time.monotonic()
        srv.stop(grace=30)
        assert time.monotonic() - t < 20
        th.join(timeout=30)
        assert srv.returncode == 0, srv.log_text()[-2000:]
        assert "stopped, store closed" in srv.log_text() and "Traceback" not in srv.log_text()
        assert errors  # the long run did not complete
        srv.start()  # the store reopens with its model
        with _connect(srv, srv.upload_token) as c:
            assert [m.model_id for m in c.list_models()] == ["busy"]
    finally:
        srv.close()


# --- 9. simulation: the signer must be pinned -----------------------------------------------------------
def test_simulated_evidence_is_refused_unless_the_signer_is_pinned(server):
    with pytest.raises(UntrustedSignerError, match="pinned simulation signer") as ei:
        _connect(server, simulation_signers=None)
    assert ei.value.signer == server.info["simulation_signer"]
    with pytest.raises(UntrustedSignerError):
        _connect(server, simulation_signers=["ab" * 32])
    with _connect(server) as c:  # pinned: accepted
        assert c.evidence.report.signer == server.info["simulation_signer"]
