"""Every attestation failure, against a real server process on loopback.

A man in the middle (``Relay``: its own TLS key, forwarding to the real server) tampers with,
replays or merely relays the evidence; a policy expects other code, another simulation key or
other model hashes; the server is swapped after the client pinned its key. Each case must raise
its typed error before any credential or input is sent."""

from __future__ import annotations

import base64
import json
import warnings

import pytest

from test_attested_support import Relay, tiny_inputs, tiny_model
from veil.attested import (
    BadSignatureError,
    KeyMismatchError,
    MeasurementMismatchError,
    ModelHashMismatchError,
    PlatformNotAllowedError,
    Policy,
    SimulationNotAllowedError,
    SimulationWarning,
    StaleNonceError,
    UntrustedSignerError,
    connect,
)
from veil.attested.measure import sha256_hex
from veil.attested.testing import ServerProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("store"))
    try:
        srv.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with connect(srv.url, policy=_policy(srv), credential=srv.upload_token, hazmat_allow_simulation=True) as c:
                up = c.upload_model(tiny_model(), "tiny")
        srv.owner = up.owner_credential
        yield srv
    finally:
        srv.close()


def _policy(srv: ServerProcess, **kw) -> Policy:
    kw.setdefault("code_measurement", srv.info["measurement"])
    kw.setdefault("simulation_signers", [srv.info["simulation_signer"]])
    return Policy(**kw)


def _connect(url: str, policy: Policy, credential: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        return connect(url, policy=policy, credential=credential, hazmat_allow_simulation=True)


def test_baseline_connects_and_runs(server):
    with _connect(server.url, _policy(server), server.owner) as c:
        assert c.attest_model("tiny") == sha256_hex(tiny_model().SerializeToString())
        assert c.evidence.simulated
        assert c.run_model("tiny", tiny_inputs())["y"].shape == (2, 3)


def test_simulation_needs_explicit_opt_in_and_warns(server):
    with pytest.raises(SimulationNotAllowedError, match="hazmat_allow_simulation=True"):
        connect(server.url, policy=_policy(server))
    with pytest.warns(SimulationWarning, match="SIMULATED"):
        connect(server.url, policy=_policy(server), hazmat_allow_simulation=True).close()
    with pytest.raises(PlatformNotAllowedError):
        _connect(server.url, _policy(server, allowed_platforms={"sev-snp", "tdx"}))


def test_other_measurement_is_refused(server):
    other = "0" * 64
    with pytest.raises(MeasurementMismatchError, match="does not run the expected code") as ei:
        _connect(server.url, _policy(server, code_measurement=other))
    assert ei.value.got == server.info["measurement"] and ei.value.expected == other


def test_evidence_from_another_simulation_key_is_refused(server):
    with pytest.raises(UntrustedSignerError):
        _connect(server.url, _policy(server, simulation_signers=["ab" * 32]))


def test_expected_model_hash(server):
    right = sha256_hex(tiny_model().SerializeToString())
    with _connect(server.url, _policy(server, models={"tiny": right}), server.owner) as c:
        assert c.run_model("tiny", tiny_inputs()).model_sha256 == right
    with _connect(server.url, _policy(server, models={"tiny": "1" * 64}), server.owner) as c:
        with pytest.raises(ModelHashMismatchError, match="'tiny'"):  # checked on the inclusion proof, before running
            c.run_model("tiny", tiny_inputs())
    # the client refuses to upload bytes other than the ones its policy names
    with _connect(server.url, _policy(server, models={"other": "2" * 64}), server.upload_token) as c:
        with pytest.raises(ModelHashMismatchError):
            c.upload_model(tiny_model(0.9), "other")
        assert [m.model_id for m in c.list_models()] == ["tiny"]


def _tamper_claims(body: bytes) -> bytes:
    ev = json.loads(body)
    claims = json.loads(base64.b64decode(ev["claims"]))
    claims["models_root"] = "f" * 64
    ev["claims"] = base64.b64encode(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()).decode()
    return json.dumps(ev).encode()


def _tamper_report(body: bytes) -> bytes:
    ev = json.loads(body)
    report = json.loads(base64.b64decode(ev["report"]))
    inner = json.loads(base64.b64decode(report["body"]))
    inner["measurement"] = "0" * 64
    report["body"] = base64.b64encode(json.dumps(inner, sort_keys=True, separators=(",", ":")).encode()).decode()
    ev["report"] = base64.b64encode(json.dumps(report).encode()).decode()
    return json.dumps(ev).encode()


@pytest.mark.parametrize(("tamper", "reason"), [(_tamper_claims, "report data"), (_tamper_report, "signature")],
                         ids=["claims", "report"])
def test_tampered_evidence_is_refused(server, tamper, reason):
    with Relay(server.url, rewrite=tamper) as relay:
        with pytest.raises(BadSignatureError, match=reason):
            _connect(relay.url, _policy(server), server.owner)
        assert relay.seen == ["/attestation"]  # nothing but the evidence request went through


def test_replayed_evidence_is_refused(server):
    recorded: list[bytes] = []

    def replay(body: bytes) -> bytes:
        if not recorded:
            recorded.append(body)
        return recorded[0]

    with Relay(server.url, rewrite=replay) as relay:
        with pytest.raises(KeyMismatchError):  # first answer is genuine, but the relay's key is not attested
            _connect(relay.url, _policy(server))
        with pytest.raises(StaleNonceError, match="nonce"):
            _connect(relay.url, _policy(server))
        assert relay.seen == ["/attestation", "/attestation"]


def test_relay_presenting_another_tls_key_is_refused(server):
    with Relay(server.url) as relay:  # forwards genuine, fresh evidence untouched
        with pytest.raises(KeyMismatchError, match="another party"):
            _connect(relay.url, _policy(server), server.owner)
        assert relay.seen == ["/attestation"]


def test_server_swapped_after_pinning_fails_before_sending(tmp_path, server):
    victim = ServerProcess(tmp_path / "victim").start()
    try:
        c = _connect(victim.url, _policy(victim), victim.upload_token)
        up = c.upload_model(tiny_model(), "m")
        port = victim.port
        victim.stop()
        # another party takes over the port, with another key, relaying to a genuine server
        with Relay(server.url, port=port) as relay:
            with pytest.raises(KeyMismatchError, match="nothing was sent"):
                c.run_model("m", tiny_inputs(), credential=up.owner_credential)
            assert relay.seen == []  # the TLS handshake failed: no request reached it
        # the same server restarted has a fresh TLS key: the pinned connection refuses it too
        victim.start()
        assert victim.port == port
        with pytest.raises(KeyMismatchError):
            c.list_models()
        c.close()
        with _connect(victim.url, _policy(victim), up.owner_credential) as fresh:  # re-attesting works
            assert fresh.run_model("m", tiny_inputs())["y"].shape == (2, 3)
    finally:
        victim.close()
