"""Attestation evidence: the claims the server makes, bound to a platform report.

Evidence has three parts:

1. ``claims``: canonical JSON (sorted keys, no spaces) written by the server's trusted side:
   the code measurement, ``models_root`` (a fresh hiding commitment to the loaded models' ids and
   hashes, see :mod:`veil.attested.commitment`), the SHA-256 of the TLS public key (SPKI), the
   client's nonce, the time of issue and the platform name;
2. ``report``: a platform-specific report whose 64-byte *report data* is ``SHA-512(claims)``;
   the platform (SEV-SNP firmware, a TDX quoting enclave, or veil's simulation key) signs the
   report together with the measurement of what it launched;
3. ``endorsements``: what the verifier needs to check that signature (for SEV-SNP the VCEK
   certificate chain, for the simulation the simulation public key).

Binding: a verifier checks the report's signature, then that ``report_data == SHA-512(claims)``;
only then are the claims believed. Changing a single byte of the claims breaks the binding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from veil.attested.errors import EvidenceFormatError

__all__ = ["EVIDENCE_FORMAT", "CLAIMS_VERSION", "Evidence", "canonical_json", "make_claims", "report_data_for"]

EVIDENCE_FORMAT = "veil-attested-evidence/2"
CLAIMS_VERSION = 2


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def report_data_for(claims: bytes) -> bytes:
    """The 64 bytes a platform report must carry to vouch for ``claims``."""
    return hashlib.sha512(claims).digest()


def make_claims(*, platform: str, code_measurement: str, models_root: str, tls_spki_sha256: str,
                nonce: str, runtime: dict[str, str], issued_at: float | None = None) -> bytes:
    return canonical_json({
        "version": CLAIMS_VERSION,
        "platform": platform,
        "code_measurement": code_measurement,
        "models_root": models_root,
        "tls_spki_sha256": tls_spki_sha256,
        "nonce": nonce,
        "issued_at": time.time() if issued_at is None else issued_at,
        "runtime": runtime,
    })


def _b64d(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise EvidenceFormatError(f"evidence field {what!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EvidenceFormatError(f"evidence field {what!r} is not valid base64") from e


@dataclass(frozen=True)
class Evidence:
    platform: str
    claims: bytes
    report: bytes
    endorsements: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EVIDENCE_FORMAT,
            "platform": self.platform,
            "claims": base64.b64encode(self.claims).decode(),
            "report": base64.b64encode(self.report).decode(),
            "endorsements": [base64.b64encode(e).decode() for e in self.endorsements],
        }

    @classmethod
    def from_json(cls, obj: Any) -> Evidence:
        if not isinstance(obj, dict):
            raise EvidenceFormatError("evidence must be a JSON object")
        if obj.get("format") != EVIDENCE_FORMAT:
            raise EvidenceFormatError(f"evidence format is {obj.get('format')!r}, expected {EVIDENCE_FORMAT!r}")
        platform = obj.get("platform")
        if not isinstance(platform, str):
            raise EvidenceFormatError("evidence field 'platform' must be a string")
        ends = obj.get("endorsements", [])
        if not isinstance(ends, list):
            raise EvidenceFormatError("evidence field 'endorsements' must be a list")
        return cls(platform, _b64d(obj.get("claims"), "claims"), _b64d(obj.get("report"), "report"),
                   tuple(_b64d(e, "endorsements") for e in ends))

    def claims_dict(self) -> dict[str, Any]:
        """The claims parsed and type-checked (only call after the binding was verified)."""
        try:
            c = json.loads(self.claims)
        except (ValueError, UnicodeDecodeError) as e:
            raise EvidenceFormatError("evidence claims are not JSON") from e
        expected: dict[str, type | tuple[type, ...]] = {
            "version": int, "platform": str, "code_measurement": str, "models_root": str,
            "tls_spki_sha256": str, "nonce": str, "issued_at": (int, float), "runtime": dict}
        if not isinstance(c, dict):
            raise EvidenceFormatError("evidence claims must be a JSON object")
        for key, typ in expected.items():
            if not isinstance(c.get(key), typ):
                raise EvidenceFormatError(f"evidence claim {key!r} is missing or has the wrong type")
        if c["version"] != CLAIMS_VERSION:
            raise EvidenceFormatError(f"evidence claims version {c['version']} is not supported "
                                      f"(expected {CLAIMS_VERSION})")
        return c
