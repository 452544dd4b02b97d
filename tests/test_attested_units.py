"""Pure checks of the attested building blocks (no server process): evidence verification against a
policy, the tensor wire format's real-size checks, the rate limiter, code measurement, sealing and
the store, and the public surface."""

from __future__ import annotations

import base64
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import veil.attested as att
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


def test_valid_evidence_verifies_and_roundtrips_json(side):
    ev = side.evidence(NONCE, {"m": "c" * 64})
    again = Evidence.from_json(json.loads(json.dumps(ev.to_json())))
    v = _verify(again, side)
    assert v.models == {"m": "c" * 64} and v.tls_spki_sha256 == side.tls.spki_sha256 and v.simulated


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
        _verify(ev, side, policy=Policy(code_measurement="2" * 64))
    with pytest.raises(StaleNonceError, match="nonce"):
        _verify(ev, side, nonce="cd" * 32)
    with pytest.raises(StaleNonceError, match="issued"):
        _verify(ev, side, now=time.time() + 3600)
    with pytest.raises(KeyMismatchError):
        _verify(ev, side, tls_spki_sha256=generate_tls_identity().spki_sha256)
    with pytest.raises(ModelHashMismatchError):
        _verify(ev, side, policy=Policy(code_measurement="1" * 64, models={"m": "d" * 64}))
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
    assert store.put("b", b"model-bytes", "e" * 64, "tok-b") is True  # deduplicated
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
                "limits", "measure", "tlskeys", "trusted", "serve", "testing", "onnx_model", "server_ids"):
        m = __import__(f"veil.attested.{mod}", fromlist=["__all__"])
        for name in m.__all__:
            assert hasattr(m, name), f"{mod}.{name}"
