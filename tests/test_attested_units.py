"""Pure checks of the attested building blocks (no server process): evidence verification against a
policy, the tensor wire format's real-size checks, the rate limiter, code measurement, sealing and
the store, and the public surface."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import veil.attested as att
from test_attested_support import EXTERNAL_PLACES, expand_model, external_data_model, loop_model
from veil.attested import (
    BadSignatureError,
    EvidenceFormatError,
    KeyMismatchError,
    MeasurementMismatchError,
    ModelHashMismatchError,
    Policy,
    PolicyError,
    SimulatedPlatform,
    SimulationNotAllowedError,
    SimulationWarning,
    StaleNonceError,
    UntrustedSignerError,
    verify_evidence,
)
from veil.attested.errors import AttestationError, UnsealError, error_for_status
from veil.attested.evidence import Evidence
from veil.attested.limits import RateLimiter
from veil.attested.measure import code_measurement
from veil.attested.store import ModelStore
from veil.attested.tensors import INPUT_DTYPES, WireFormatError, decode_tensor, encode_tensor
from veil.attested.tlskeys import generate_tls_identity
from veil.attested.trusted import TrustedSide
from veil.errors import VeilError

NONCE = "ab" * 32


@pytest.fixture
def platform(tmp_path):
    with pytest.warns(SimulationWarning):
        return SimulatedPlatform(tmp_path / "plat", measurement="1" * 64)


@pytest.fixture
def side(platform):
    return TrustedSide(platform, generate_tls_identity())


def _verify(ev: Evidence, side: TrustedSide, **kw):
    policy = kw.pop("policy", Policy(code_measurement="1" * 64, simulation_signers=[side.platform.public_key_hex]))
    kw.setdefault("nonce", NONCE)
    kw.setdefault("tls_spki_sha256", side.tls.spki_sha256)
    kw.setdefault("allow_simulation", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        return verify_evidence(ev, policy, **kw)


def _policy(side, **kw) -> Policy:
    kw.setdefault("code_measurement", "1" * 64)
    kw.setdefault("simulation_signers", [side.platform.public_key_hex])
    return Policy(**kw)


def test_valid_evidence_verifies_and_roundtrips_json(side):
    ev = side.evidence(NONCE, {"m": "c" * 64})
    again = Evidence.from_json(json.loads(json.dumps(ev.to_json())))
    v = _verify(again, side)
    assert v.tls_spki_sha256 == side.tls.spki_sha256 and v.simulated and len(v.models_root) == 64


def test_each_verification_failure_has_its_error(side, tmp_path):
    ev = side.evidence(NONCE, {"m": "c" * 64})
    claims = json.loads(ev.claims)
    claims["tls_spki_sha256"] = "0" * 64
    forged_claims = Evidence(ev.platform, json.dumps(claims).encode(), ev.report, ev.endorsements)
    with pytest.raises(BadSignatureError, match="report data"):
        _verify(forged_claims, side)
    outer = json.loads(ev.report)
    sig = bytearray(base64.b64decode(outer["signature"]))
    sig[0] ^= 1
    outer["signature"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(BadSignatureError, match="signature"):
        _verify(Evidence(ev.platform, ev.claims, json.dumps(outer).encode(), ev.endorsements), side)
    with pytest.raises(MeasurementMismatchError):
        _verify(ev, side, policy=_policy(side, code_measurement="2" * 64))
    with pytest.raises(StaleNonceError, match="nonce"):
        _verify(ev, side, nonce="cd" * 32)
    with pytest.raises(StaleNonceError, match="issued"):
        _verify(ev, side, now=time.time() + 3600)
    with pytest.raises(KeyMismatchError):
        _verify(ev, side, tls_spki_sha256=generate_tls_identity().spki_sha256)
    with pytest.raises(SimulationNotAllowedError):
        _verify(ev, side, allow_simulation=False)
    # a validly signed report from another simulation key
    with pytest.warns(SimulationWarning):
        other = TrustedSide(SimulatedPlatform(tmp_path / "other", measurement="1" * 64), side.tls)
    with pytest.raises(UntrustedSignerError):
        _verify(other.evidence(NONCE, {}), side)
    # swapping the endorsement for another key breaks the signature check
    with pytest.raises(BadSignatureError):
        _verify(Evidence(ev.platform, ev.claims, ev.report, other.evidence(NONCE, {}).endorsements), side)
    with pytest.raises(EvidenceFormatError):
        Evidence.from_json({"format": "something-else"})
    assert issubclass(StaleNonceError, AttestationError) and issubclass(AttestationError, VeilError)


def test_policy_requires_a_measurement_or_a_hazmat_opt_in():
    with pytest.raises(PolicyError):
        Policy()
    with pytest.raises(PolicyError):
        Policy(code_measurement="xyz")
    with pytest.warns(SimulationWarning):
        Policy(hazmat_any_measurement=True)


def test_wire_format_checks_real_sizes():
    for name in INPUT_DTYPES:
        arr = (np.arange(6) % 2).astype(name).reshape(2, 3)
        back = decode_tensor(encode_tensor(arr), "t", INPUT_DTYPES)
        assert back.dtype == arr.dtype and np.array_equal(back, arr)
    enc = encode_tensor(np.zeros((2, 3), np.float32))
    with pytest.raises(WireFormatError, match="needs 8 bytes"):
        decode_tensor({**enc, "shape": [2]}, "t", INPUT_DTYPES)
    with pytest.raises(OverflowError, match="6 elements"):
        decode_tensor({**enc, "shape": [1]}, "t", INPUT_DTYPES, max_elements=5)
    with pytest.raises(WireFormatError, match="bool"):
        decode_tensor({"dtype": "bool", "shape": [1], "data": base64.b64encode(b"\x07").decode()}, "t", INPUT_DTYPES)
    with pytest.raises(WireFormatError, match="shape"):
        decode_tensor({**enc, "shape": [-1, 3]}, "t", INPUT_DTYPES)


def test_rate_limiter_token_bucket():
    now = [100.0]
    rl = RateLimiter(rate_per_s=10.0, burst=3, clock=lambda: now[0])
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a") == pytest.approx(0.1)
    assert rl.take("b") == 0.0  # buckets are per credential
    now[0] += 0.05
    assert rl.take("a") == pytest.approx(0.05)
    now[0] += 0.06
    assert rl.take("a") == 0.0
    now[0] += 100
    assert [rl.take("a") for _ in range(4)][-1] > 0  # refills up to the burst, not beyond


def test_code_measurement_is_deterministic_and_covers_every_file(tmp_path):
    import veil

    src = Path(veil.__file__).parent
    copy = tmp_path / "veil"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    m0 = code_measurement(copy)
    assert m0 == code_measurement(copy)
    (copy / "attested" / "client.py").write_text((copy / "attested" / "client.py").read_text() + "\n# changed\n")
    m1 = code_measurement(copy)
    assert m1 != m0
    (copy / "attested" / "extra.py").write_text("x = 1\n")
    assert code_measurement(copy) not in (m0, m1)


def test_sealing_and_store(tmp_path, platform):
    blob = platform.seal(b"secret weights", b"aad")
    assert b"secret weights" not in blob and platform.unseal(blob, b"aad") == b"secret weights"
    with pytest.raises(UnsealError):
        platform.unseal(blob, b"other aad")
    with pytest.warns(SimulationWarning):
        other = SimulatedPlatform(tmp_path / "other")
    with pytest.raises(UnsealError):
        other.unseal(blob, b"aad")
    store = ModelStore(tmp_path / "store", platform)
    assert store.put("a", b"model-bytes", "e" * 64, "tok-a") is False
    assert store.put("b", b"model-bytes", "e" * 64, "tok-b") is True  # deduplicated (never told to clients)
    assert store.lookup_credential("tok-a").kind == "owner" and store.lookup_credential("nope") is None
    assert len(list((tmp_path / "store" / "blobs").iterdir())) == 1
    with pytest.raises(Exception, match="does not hash"):
        store.load("e" * 64)  # the bytes do not hash to the claimed sha256: refused


def test_error_for_status_maps_to_typed_errors():
    assert isinstance(error_for_status(401, "unauthenticated", "x"), att.AuthenticationError)
    assert isinstance(error_for_status(403, "forbidden", "x"), att.AccessDeniedError)
    assert isinstance(error_for_status(413, "input_too_large", "x"), att.LimitExceededError)
    e = error_for_status(429, "rate_limited", "x", 2.0)
    assert isinstance(e, att.RateLimitedError) and e.retry_after == 2.0
    assert isinstance(error_for_status(400, "invalid_model", "x"), att.InvalidModelError)


def test_public_surface():
    for name in att.__all__:
        assert hasattr(att, name), name
    for mod in ("client", "errors", "evidence", "policy", "platform", "simulated", "server", "store", "tensors",
                "limits", "measure", "tlskeys", "trusted", "serve", "testing", "onnx_model", "server_ids", "commitment"):
        m = __import__(f"veil.attested.{mod}", fromlist=["__all__"])
        for name in m.__all__:
            assert hasattr(m, name), f"{mod}.{name}"


# --- hardening (issue 9) ---------------------------------------------------------------------------
def test_simulated_evidence_needs_a_pinned_signer(side):
    ev = side.evidence(NONCE, {})
    with pytest.raises(UntrustedSignerError, match="pinned simulation signer") as ei:
        _verify(ev, side, policy=Policy(code_measurement="1" * 64))  # opted in, but nothing pinned
    assert ei.value.signer == side.platform.public_key_hex  # the value to pin, printed by `veil attested attest`
    with pytest.raises(SimulationNotAllowedError):  # pinned, but no opt-in
        _verify(ev, side, allow_simulation=False)
    assert _verify(ev, side).report.signer == side.platform.public_key_hex  # pinned and opted in


def test_models_commitment_hides_the_set_and_proves_inclusion(side):
    from veil.attested.commitment import InclusionProof, commit_models, root_from_proof
    from veil.attested.policy import verify_model_inclusion

    models = {"alpha": "a" * 64, "beta": "b" * 64, "gamma": "c" * 64}
    root, proofs = commit_models(models, pad_to=8)
    assert all(root_from_proof(p) == root for p in proofs.values())
    assert {len(p.path) for p in proofs.values()} == {3}  # padded to 8 leaves: the path says nothing about 3
    assert commit_models(models, pad_to=8)[0] != root  # fresh salts: the same set gives another root
    # the evidence a stranger gets names no model id nor hash
    ev, proof = side.model_evidence(NONCE, models, "beta", pad_to=8)
    for secret in ("alpha", "beta", "gamma", "a" * 64, "b" * 64, "c" * 64):
        assert secret not in ev.claims.decode() and secret.encode() not in side.evidence(NONCE, models).claims
    verified = _verify(ev, side)
    policy = _policy(side, models={"beta": "b" * 64})
    assert verify_model_inclusion(verified, proof, "beta", policy) == "b" * 64
    assert InclusionProof.from_json(json.loads(json.dumps(proof.to_json()))) == proof
    forged = [
        InclusionProof(proof.model_id, "d" * 64, proof.salt, proof.index, proof.path),  # other hash
        InclusionProof(proof.model_id, proof.sha256, "0" * 64, proof.index, proof.path),  # other salt
        InclusionProof(proof.model_id, proof.sha256, proof.salt, proof.index ^ 1, proof.path),  # other position
        InclusionProof(proof.model_id, proof.sha256, proof.salt, proof.index, ("0" * 64, *proof.path[1:])),
    ]
    for p in forged:
        with pytest.raises(BadSignatureError, match="does not lead"):
            verify_model_inclusion(verified, p, "beta", policy)
    with pytest.raises(BadSignatureError, match="not 'alpha'"):
        verify_model_inclusion(verified, proof, "alpha", policy)
    # a proof against other evidence (another fresh tree) fails
    with pytest.raises(BadSignatureError):
        verify_model_inclusion(_verify(side.evidence(NONCE, models, pad_to=8), side), proof, "beta", policy)
    with pytest.raises(ModelHashMismatchError):
        verify_model_inclusion(verified, proof, "beta", _policy(side, models={"beta": "e" * 64}))
    with pytest.raises(EvidenceFormatError):
        InclusionProof.from_json({**proof.to_json(), "index": 99})


def test_store_credentials_are_bound_to_the_model_instance(tmp_path, platform):
    store = ModelStore(tmp_path / "store", platform)
    store.put("m", b"first", "1" * 64, "owner-1")
    first = store.lookup_credential("owner-1")
    assert first is not None and first.instance == store.instance("m")
    assert store.add_credential("run-1", "run", "m", first.instance)
    # an issue that passed its ownership check just before the owner deleted the model ...
    store.delete("m")
    assert store.add_credential("run-late", "run", "m", first.instance) is False  # ... records nothing
    store.put("m", b"second", "2" * 64, "owner-2")  # a new model under the same id
    for old in ("owner-1", "run-1", "run-late"):
        assert store.lookup_credential(old) is None
    # even a credential row that survived (written directly, as an old store would hold it) does not apply
    store._db.execute("INSERT INTO credentials (token_mac, kind, model_id, created, instance) VALUES (?, 'run', 'm', 0, ?)",
                      (store.token_mac("survivor"), first.instance))
    assert store.lookup_credential("survivor") is None
    assert store.lookup_credential("owner-2").model_id == "m"
    # a replacement by the owner keeps the instance: its run credentials keep working
    assert store.add_credential("run-2", "run", "m", store.instance("m"))
    store.replace("m", b"third", "3" * 64)
    assert store.lookup_credential("run-2") is not None


def test_store_counts_models_under_the_insert_lock(tmp_path, platform):
    from concurrent.futures import ThreadPoolExecutor

    from veil.attested.errors import StoreFullError

    store = ModelStore(tmp_path / "store", platform)

    def put(i: int) -> bool:
        try:
            store.put(f"m{i}", b"bytes %d" % i, hashlib.sha256(b"bytes %d" % i).hexdigest(), f"tok{i}", max_models=2)
            return True
        except StoreFullError:
            return False

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(put, range(6))) == 2
    assert len(store.list()) == 2


def test_model_ids_match_in_full():
    from veil.attested.server_ids import is_model_id

    assert is_model_id("abc") and is_model_id("a" * 64) and is_model_id("v1.2_x-y")
    for bad in ("abc\n", "abc\r\n", "\nabc", "a" * 65, "-x", "", "a b", "abc\x00", None, 3):
        assert not is_model_id(bad), repr(bad)


@pytest.mark.parametrize("place", EXTERNAL_PLACES)
def test_external_data_anywhere_is_refused(place, tmp_path, monkeypatch):
    from veil.attested.onnx_model import ModelRejected, load_served_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(np.arange(1, 5, dtype=np.float32).tobytes())
    with pytest.raises(ModelRejected, match="refers to external data"):
        load_served_model(external_data_model(place, "secret.bin"), "0" * 64)


@pytest.mark.parametrize("location", ["secret.bin", "../cwd/secret.bin", "ABSOLUTE"])
def test_sessions_cannot_read_files_even_past_the_scan(location, tmp_path, monkeypatch):
    """With the scan switched off, every external-data placement still reads no file next to the server
    (the working directory holds one), nor any absolute path."""
    import veil.attested.onnx_model as om

    work = tmp_path / "cwd"
    work.mkdir()
    secret = np.arange(1, 5, dtype=np.float32)
    (work / "secret.bin").write_bytes(secret.tobytes())
    monkeypatch.chdir(work)
    monkeypatch.setattr(om, "external_data_tensors", lambda model: iter(()))
    loc = str(work / "secret.bin") if location == "ABSOLUTE" else location
    for place in EXTERNAL_PLACES:
        try:
            model = om.load_served_model(external_data_model(place, loc), "0" * 64)
        except om.ModelRejected:
            continue  # onnxruntime refused to load it: nothing read
        try:
            out = model.run({"x": np.zeros(4, np.float32)})["y"]
        except om.InputRejected:
            continue
        assert not np.array_equal(out, secret), f"{place}: the model read {loc}"


def test_run_time_and_output_limits_in_process():
    from veil.attested.onnx_model import RunLimitExceeded, load_served_model

    loop = load_served_model(loop_model(), "0" * 64)
    t0 = time.monotonic()
    with pytest.raises(RunLimitExceeded, match="stopped after the limit of 0.3 s") as ei:
        loop.run({"x": np.zeros(1, np.float32)}, max_seconds=0.3)
    assert ei.value.code == "run_time_exceeded" and time.monotonic() - t0 < 5
    small = load_served_model(loop_model(1000), "0" * 64)  # the same op within its time: exact result
    assert small.run({"x": np.zeros(1, np.float32)}, max_seconds=30)["y"][0] == 1000.0
    expand = load_served_model(expand_model(), "0" * 64)
    with pytest.raises(RunLimitExceeded, match="4000000 bytes") as ei:
        expand.run({"shape": np.array([1000, 1000], np.int64)}, max_output_bytes=1 << 20)
    assert ei.value.code == "output_too_large"
    assert expand.run({"shape": np.array([3, 4], np.int64)}, max_output_bytes=1 << 20)["y"].shape == (3, 4)
