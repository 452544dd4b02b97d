"""The client: verify the server's attestation, then talk only to the attested TLS key.

Protocol of :func:`connect`:

1. draw a fresh 32-byte nonce;
2. ``GET /attestation?nonce=...`` over TLS *without* CA validation (the server's certificate is
   self-signed) and record the certificate the server presented on that connection;
3. verify the evidence against the policy (:func:`veil.attested.policy.verify_evidence`), including
   that the key of that certificate is the attested one; any failure raises before anything else
   is sent;
4. build an SSL context whose only trust anchor is that certificate, and use it for every later
   call; each response's peer key is checked again. A server presenting any other key fails the
   TLS handshake, which raises :class:`KeyMismatchError` before a byte of the request is sent.

Credentials (upload, owner, run) travel only over the pinned channel.

Models: the evidence names the loaded models only through a hiding commitment. Before the first run
of a model on a connection (or on demand, :meth:`Connection.attest_model`), the client asks for fresh
evidence plus that model's inclusion proof with its credential (owner or run), verifies both, and
checks the model's hash against the policy; each run answer must then name that hash (a replaced
model is attested again once).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from veil.attested.commitment import InclusionProof
from veil.attested.errors import (
    ConnectionFailedError,
    EvidenceFormatError,
    InvalidRequestError,
    KeyMismatchError,
    ModelHashMismatchError,
    PolicyError,
    error_for_status,
)
from veil.attested.evidence import Evidence
from veil.attested.policy import Policy, VerifiedEvidence, verify_evidence, verify_model_inclusion
from veil.attested.server_ids import is_model_id
from veil.attested.tensors import (
    INPUT_DTYPES,
    OUTPUT_DTYPES,
    WireFormatError,
    decode_tensor,
    encode_tensor,
    to_numpy,
)
from veil.attested.tlskeys import cert_spki_sha256
from veil.errors import InputDtypeError, InputError

__all__ = ["connect", "Connection", "UploadResult", "ModelInfo", "RunResult", "NODELAY"]

# httpx writes headers and body separately; without TCP_NODELAY, Nagle's algorithm and the peer's
# delayed ACK add ~40 ms to every small request on loopback
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True)
class UploadResult:
    model_id: str
    sha256: str
    size: int
    owner_credential: str | None


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    sha256: str | None  # None in the operator's listing
    size: int
    access: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@dataclass(frozen=True)
class RunResult(Mapping[str, np.ndarray]):
    """Outputs by name (a read-only mapping), plus the hash of the model that produced them."""

    model_id: str
    model_sha256: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.outputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)


def _base_url(address: str) -> str:
    if address.startswith("http://"):
        raise PolicyError("the attested client only speaks TLS: use https://host:port or host:port")
    url = address if address.startswith("https://") else "https://" + address
    return url.rstrip("/")


def _peer_cert(response: httpx.Response) -> bytes | None:
    stream = response.extensions.get("network_stream")
    ssl_obj = stream.get_extra_info("ssl_object") if stream is not None else None
    return ssl_obj.getpeercert(True) if ssl_obj is not None else None


def _is_cert_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _model_path(model_id: str, suffix: str = "") -> str:
    if not is_model_id(model_id):
        raise InvalidRequestError("model ids are 1-64 characters of letters, digits, '.', '_', '-', starting with a "
                                  "letter or digit", status=400, code="bad_model_id")
    return f"/models/{model_id}{suffix}"


def _model_bytes(model: Any) -> bytes:
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    if isinstance(model, str | os.PathLike):
        return Path(model).read_bytes()
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        return model.SerializeToString()
    raise InputError(f"upload_model takes a path, bytes or an onnx.ModelProto, not {type(model).__name__}")


class Connection:
    """An attested, key-pinned connection to a veil attested server. Use :func:`connect`."""

    def __init__(self, address: str, policy: Policy, *, credential: str | None = None,
                 hazmat_allow_simulation: bool = False, timeout: float = 60.0, upload_chunk: int = 1 << 20):
        if not isinstance(policy, Policy):
            raise PolicyError("connect() needs a veil.attested.Policy")
        self.url = _base_url(address)
        self.policy = policy
        self.credential = credential
        self.allow_simulation = hazmat_allow_simulation
        self.timeout = timeout
        self.upload_chunk = upload_chunk
        self._http: httpx.Client | None = None
        self._checked_tls: object | None = None
        self._model_hashes: dict[str, str] = {}  # model id -> hash verified by an inclusion proof
        self.evidence = self._first_attestation()
        self._pinned = self.evidence.tls_spki_sha256

    # --- attestation ----------------------------------------------------------------------------
    def _fetch_evidence(self, client: httpx.Client, nonce: str) -> tuple[Evidence, bytes | None]:
        try:
            r = client.get("/attestation", params={"nonce": nonce})
        except httpx.HTTPError as e:
            if _is_cert_failure(e):
                raise KeyMismatchError("the server presented a TLS key other than the attested one") from None
            raise ConnectionFailedError(f"cannot fetch attestation evidence from {self.url}: {type(e).__name__}") from None
        cert = _peer_cert(r)
        if r.status_code != 200:
            raise EvidenceFormatError(f"the server answered /attestation with HTTP {r.status_code}")
        try:
            body = r.json()
        except ValueError:
            raise EvidenceFormatError("the /attestation answer is not JSON") from None
        return Evidence.from_json(body), cert

    def _first_attestation(self) -> VerifiedEvidence:
        nonce = secrets.token_hex(32)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # trust comes from the evidence, checked below, not from a CA
        with httpx.Client(base_url=self.url, timeout=self.timeout,
                          transport=httpx.HTTPTransport(verify=ctx, socket_options=NODELAY)) as c:
            evidence, cert = self._fetch_evidence(c, nonce)
        if cert is None:
            raise KeyMismatchError("could not read the server's TLS certificate")
        verified = verify_evidence(evidence, self.policy, nonce=nonce, tls_spki_sha256=cert_spki_sha256(cert),
                                   allow_simulation=self.allow_simulation)
        pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False  # the certificate itself is pinned; host names add nothing
        pinned.verify_mode = ssl.CERT_REQUIRED
        pinned.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        pinned.load_verify_locations(cadata=cert)
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout,
                                  transport=httpx.HTTPTransport(verify=pinned, socket_options=NODELAY))
        return verified

    def attest(self) -> VerifiedEvidence:
        """Ask for fresh evidence over the pinned channel and verify it again (e.g. after model changes)."""
        nonce = secrets.token_hex(32)
        evidence, cert = self._fetch_evidence(self._client, nonce)
        self.evidence = verify_evidence(evidence, self.policy, nonce=nonce,
                                        tls_spki_sha256=cert_spki_sha256(cert) if cert else None,
                                        allow_simulation=self.allow_simulation)
        if self.evidence.tls_spki_sha256 != self._pinned:
            raise KeyMismatchError("fresh evidence binds another TLS key than the pinned one")
        return self.evidence

    def attest_model(self, model_id: str, *, credential: str | None = None) -> str:
        """Fresh evidence plus ``model_id``'s inclusion proof (needs the owner or a run credential of the
        model), verified against the policy; returns the model's attested SHA-256."""
        nonce = secrets.token_hex(32)
        r = self._request("GET", _model_path(model_id, "/attestation"), credential, params={"nonce": nonce})
        try:
            body = r.json()
            evidence = Evidence.from_json(body["evidence"])
            proof = InclusionProof.from_json(body["proof"])
        except (ValueError, KeyError, TypeError):
            raise EvidenceFormatError("the model attestation answer is malformed") from None
        cert = _peer_cert(r)
        verified = verify_evidence(evidence, self.policy, nonce=nonce,
                                   tls_spki_sha256=cert_spki_sha256(cert) if cert else None,
                                   allow_simulation=self.allow_simulation)
        if verified.tls_spki_sha256 != self._pinned:
            raise KeyMismatchError("the model's evidence binds another TLS key than the pinned one")
        sha = verify_model_inclusion(verified, proof, model_id, self.policy)
        self._model_hashes[model_id] = sha
        return sha

    # --- transport ------------------------------------------------------------------------------
    @property
    def _client(self) -> httpx.Client:
        if self._http is None:
            raise ConnectionFailedError("the connection is closed")
        return self._http

    def _request(self, method: str, path: str, credential: str | None, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        token = credential if credential is not None else self.credential
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            r = self._client.request(method, path, headers=headers, **kw)
        except httpx.HTTPError as e:
            if _is_cert_failure(e):
                raise KeyMismatchError("the server presented a TLS key other than the attested one; nothing "
                                       "was sent") from None
            raise ConnectionFailedError(f"{method} {path} failed: {type(e).__name__}: {e}") from None
        self._check_peer(r)
        if r.status_code >= 400:
            try:
                body = r.json()
                code, detail = str(body.get("error", "refused")), str(body.get("detail", ""))
            except (ValueError, AttributeError):
                code, detail = "refused", r.text[:200]
            retry = r.headers.get("retry-after")
            raise error_for_status(r.status_code, code, detail, float(retry) if retry else None)
        return r

    def _check_peer(self, r: httpx.Response) -> None:
        """Defence in depth behind the pinned SSL context: the peer key of each new TLS connection is
        compared with the attested one (a connection already checked is remembered, by identity)."""
        stream = r.extensions.get("network_stream")
        ssl_obj = stream.get_extra_info("ssl_object") if stream is not None else None
        if ssl_obj is None:
            raise KeyMismatchError("the response did not come over TLS")
        if ssl_obj is self._checked_tls:
            return
        cert = ssl_obj.getpeercert(True)
        if cert is None or cert_spki_sha256(cert) != self._pinned:
            raise KeyMismatchError("the response came over a TLS key other than the attested one")
        self._checked_tls = ssl_obj  # a strong reference: its identity cannot be reused while held

    # --- API ------------------------------------------------------------------------------------
    def upload_model(self, model: Any, model_id: str, *, credential: str | None = None,
                     replace: bool = False) -> UploadResult:
        """Upload (or, with ``replace=True`` and the owner credential, replace) an ONNX model.

        ``model`` is a path, bytes or an ``onnx.ModelProto``. The body is streamed in chunks; the
        server's hash of what it received must equal the local hash."""
        data = _model_bytes(model)
        sha = hashlib.sha256(data).hexdigest()
        expected = self.policy.models.get(model_id)
        if expected is not None and expected != sha:
            raise ModelHashMismatchError(model_id, sha, expected)

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(data), self.upload_chunk):
                yield data[i:i + self.upload_chunk]

        r = self._request("PUT" if replace else "POST", _model_path(model_id), credential, content=chunks(),
                          headers={"Content-Type": "application/octet-stream"})
        body = r.json()
        if body.get("sha256") != sha:
            raise ModelHashMismatchError(model_id, str(body.get("sha256")), sha)
        self._model_hashes.pop(model_id, None)
        return UploadResult(body["model_id"], body["sha256"], body["size"], body.get("owner_credential"))

    def list_models(self, *, credential: str | None = None) -> list[ModelInfo]:
        return [ModelInfo(m["model_id"], m["sha256"], m["size"], m["access"], m["inputs"], m["outputs"])
                for m in self._request("GET", "/models", credential).json()]

    def run_model(self, model_id: str, inputs: Any, *, credential: str | None = None,
                  outputs: list[str] | None = None) -> RunResult:
        """Run ``model_id`` on ``inputs``: a mapping name -> array (numpy, torch, lists), a list of
        arrays in the model's input order, or a single array for a one-input model."""
        if isinstance(inputs, Mapping):
            payload: Any = {str(k): self._encode_input(str(k), v) for k, v in inputs.items()}
        elif isinstance(inputs, list | tuple):
            payload = [self._encode_input(f"#{i}", v) for i, v in enumerate(inputs)]
        else:
            payload = [self._encode_input("#0", inputs)]
        body: dict[str, Any] = {"inputs": payload}
        if outputs is not None:
            body["outputs"] = list(outputs)
        attested = self._model_hashes.get(model_id)
        if attested is None:
            attested = self.attest_model(model_id, credential=credential)
        r = self._request("POST", _model_path(model_id, "/run"), credential, json=body)
        res = r.json()
        if res.get("model_sha256") != attested:  # replaced since it was attested: attest it again, once
            attested = self.attest_model(model_id, credential=credential)
            if res.get("model_sha256") != attested:
                raise ModelHashMismatchError(model_id, str(res.get("model_sha256")), attested)
        try:
            outs = {k: decode_tensor(v, k, OUTPUT_DTYPES) for k, v in res["outputs"].items()}
        except (WireFormatError, KeyError, AttributeError) as e:
            raise ConnectionFailedError(f"malformed run response: {e}") from None
        return RunResult(res["model_id"], res["model_sha256"], outs)

    @staticmethod
    def _encode_input(name: str, value: Any) -> dict[str, Any]:
        arr = to_numpy(value)
        if arr.dtype.name not in INPUT_DTYPES:
            raise InputDtypeError(name, arr.dtype.name, " or ".join(INPUT_DTYPES))
        return encode_tensor(arr, INPUT_DTYPES)

    def delete_model(self, model_id: str, *, credential: str | None = None) -> None:
        self._request("DELETE", _model_path(model_id), credential)
        self._model_hashes.pop(model_id, None)

    def create_run_credential(self, model_id: str, *, credential: str | None = None) -> str:
        """Issue a run-only credential for ``model_id`` (needs its owner credential)."""
        return self._request("POST", _model_path(model_id, "/credentials"), credential).json()["credential"]

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str, *, policy: Policy, credential: str | None = None,
            hazmat_allow_simulation: bool = False, timeout: float = 60.0) -> Connection:
    """Attest the server at ``address`` (``host:port`` or ``https://host:port``) against ``policy``,
    pin its TLS key, and return the connection (a context manager).

    ``hazmat_allow_simulation=True`` accepts evidence from veil's simulated enclave, with a warning,
    if the policy pins its simulation signer (``Policy(simulation_signers=[...])``)."""
    return Connection(address, policy, credential=credential, hazmat_allow_simulation=hazmat_allow_simulation,
                      timeout=timeout)
