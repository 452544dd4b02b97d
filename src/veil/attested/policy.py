"""The client's attestation policy and the verification of evidence against it.

:func:`verify_evidence` runs these checks, in this order, and raises the first failure:

1. the platform is one the policy allows (:class:`PlatformNotAllowedError`); a simulated platform
   also needs ``allow_simulation`` (:class:`veil.errors.SimulationNotAllowedError`), warns, and is
   refused unless the policy pins the simulation signer (``simulation_signers``;
   :class:`UntrustedSignerError` naming the key that signed, to be compared with the one the
   server printed at start);
2. the platform report's signature is valid, by a trusted signer (:class:`BadSignatureError`,
   :class:`UntrustedSignerError`);
3. the report's 64 bytes of report data equal ``SHA-512(claims)``: the claims are the signed ones
   (:class:`BadSignatureError`);
4. the platform is not in debug mode unless the policy allows it;
5. the measured code equals the policy's ``code_measurement`` (:class:`MeasurementMismatchError`);
6. the claims answer this client's nonce and are recent (:class:`StaleNonceError`);
7. the TLS key the client sees equals the attested one (:class:`KeyMismatchError`).

The claims name the loaded models only through a hiding commitment (``models_root``). A client
entitled to a model checks it with :func:`verify_model_inclusion`: the server's inclusion proof must
lead to the attested root (:class:`BadSignatureError`) and the model's hash must be the one the policy
names, if it names one (:class:`ModelHashMismatchError`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from veil.attested.commitment import InclusionProof, root_from_proof
from veil.attested.errors import (
    AttestationError,
    BadSignatureError,
    KeyMismatchError,
    MeasurementMismatchError,
    ModelHashMismatchError,
    PlatformNotAllowedError,
    PolicyError,
    StaleNonceError,
    UntrustedSignerError,
)
from veil.attested.evidence import Evidence, report_data_for
from veil.attested.platform import PlatformReport, SimulationWarning, get_verifier
from veil.errors import SimulationNotAllowedError

__all__ = ["Policy", "VerifiedEvidence", "verify_evidence", "verify_model_inclusion"]

_HEX = set("0123456789abcdef")


def _check_hex(value: str, what: str, length: int) -> str:
    v = value.lower()
    if len(v) != length or not set(v) <= _HEX:
        raise PolicyError(f"{what} must be {length} hex characters")
    return v


@dataclass(frozen=True)
class Policy:
    """What the client requires of a server before it sends anything.

    ``code_measurement``: hex SHA-256 the platform must report (see :mod:`veil.attested.measure`),
    or on real hardware the 96-hex launch measurement (SEV-SNP ``MEASUREMENT``, TDX ``MRTD``);
    required unless ``hazmat_any_measurement=True``.
    ``allowed_platforms``: platform names accepted (the simulation still needs the client's opt-in).
    ``models``: model id -> expected hex SHA-256 of its ONNX bytes.
    ``simulation_signers``: hex public keys of the simulation keys to trust; simulated evidence is
    refused unless its signer is among them (``veil attested serve`` and ``veil attested attest``
    print the key).
    ``max_evidence_age_s``: how old the evidence's time of issue may be.
    """

    code_measurement: str | None = None
    allowed_platforms: frozenset[str] = frozenset({"simulated", "sev-snp", "tdx"})
    models: Mapping[str, str] = field(default_factory=dict)
    simulation_signers: frozenset[str] | None = None
    max_evidence_age_s: float = 120.0
    allow_debug: bool = False
    hazmat_any_measurement: bool = False

    def __post_init__(self) -> None:
        if self.code_measurement is None:
            if not self.hazmat_any_measurement:
                raise PolicyError("the policy needs code_measurement (or hazmat_any_measurement=True)")
            warnings.warn("veil attested: policy accepts ANY server code (hazmat_any_measurement=True)",
                          SimulationWarning, stacklevel=3)
        else:
            width = 96 if len(self.code_measurement) == 96 else 64  # 96: SEV-SNP MEASUREMENT / TDX MRTD
            object.__setattr__(self, "code_measurement", _check_hex(self.code_measurement, "code_measurement", width))
        object.__setattr__(self, "allowed_platforms", frozenset(self.allowed_platforms))
        object.__setattr__(self, "models", {str(k): _check_hex(v, f"hash of model {k!r}", 64)
                                            for k, v in dict(self.models).items()})
        if self.simulation_signers is not None:
            signers: Iterable[str] = self.simulation_signers
            if isinstance(signers, str):
                signers = [signers]
            object.__setattr__(self, "simulation_signers",
                               frozenset(_check_hex(s, "simulation signer", 64) for s in signers))

    def with_model(self, model_id: str, sha256: str) -> Policy:
        """A copy that also requires ``model_id`` to have ``sha256``."""
        models = dict(self.models)
        models[model_id] = sha256
        return Policy(self.code_measurement, self.allowed_platforms, models, self.simulation_signers,
                      self.max_evidence_age_s, self.allow_debug, self.hazmat_any_measurement)


@dataclass(frozen=True)
class VerifiedEvidence:
    """Evidence that passed :func:`verify_evidence`, with its parsed claims."""

    evidence: Evidence
    report: PlatformReport
    claims: dict[str, Any]

    @property
    def tls_spki_sha256(self) -> str:
        return self.claims["tls_spki_sha256"]

    @property
    def models_root(self) -> str:
        """The commitment to the loaded models (see :mod:`veil.attested.commitment`)."""
        return self.claims["models_root"]

    @property
    def simulated(self) -> bool:
        return self.report.simulated


def verify_evidence(evidence: Evidence, policy: Policy, *, nonce: str, tls_spki_sha256: str | None,
                    allow_simulation: bool = False, now: float | None = None) -> VerifiedEvidence:
    """Check ``evidence`` against ``policy`` for this ``nonce`` and the TLS key seen (see module doc)."""
    # 1. platform
    if evidence.platform not in policy.allowed_platforms:
        raise PlatformNotAllowedError(
            f"evidence comes from platform {evidence.platform!r}; the policy allows "
            f"{', '.join(sorted(policy.allowed_platforms)) or 'none'}"
        )
    verifier = get_verifier(evidence.platform)
    if verifier.simulated:
        if not allow_simulation:
            raise SimulationNotAllowedError(
                f"the server's evidence comes from a SIMULATED platform ({evidence.platform!r}); "
                "pass hazmat_allow_simulation=True to accept it (development only)"
            )
        warnings.warn("veil attested: accepting SIMULATED attestation evidence; it proves nothing about "
                      "the hardware (hazmat_allow_simulation=True)", SimulationWarning, stacklevel=3)
        if policy.simulation_signers is None:
            signer = evidence.endorsements[0].hex() if evidence.endorsements else "unknown"
            raise UntrustedSignerError(
                f"simulated evidence is accepted only from a pinned simulation signer; this evidence names "
                f"signer {signer} (compare it with the key `veil attested serve` printed at start, then pin it: "
                f"Policy(simulation_signers=[...]) or --simulation-signer)", signer=signer)
    # 2. signature
    report = verifier.verify(evidence.report, evidence.endorsements,
                             policy.simulation_signers if verifier.simulated else None)
    # 3. binding of the claims
    if report.report_data != report_data_for(evidence.claims):
        raise BadSignatureError("the evidence claims are not the ones the platform signed (report data mismatch)")
    claims = evidence.claims_dict()
    if claims["platform"] != report.platform:
        raise BadSignatureError(f"claims name platform {claims['platform']!r}, the report {report.platform!r}")
    # 4. security settings
    if report.debug and not policy.allow_debug:
        raise AttestationError("the platform runs in debug mode; the policy does not allow it")
    # 5. code
    if verifier.simulated and claims["code_measurement"] != report.measurement:
        raise BadSignatureError("claimed code measurement differs from the platform's")
    if policy.code_measurement is not None and report.measurement != policy.code_measurement:
        raise MeasurementMismatchError(report.measurement, policy.code_measurement)
    # 6. freshness
    if claims["nonce"] != nonce:
        raise StaleNonceError("the evidence does not answer this client's nonce (replayed evidence?)")
    t = time.time() if now is None else now
    age = t - float(claims["issued_at"])
    if age > policy.max_evidence_age_s or age < -30.0:
        raise StaleNonceError(f"the evidence was issued {age:.0f} s ago; at most {policy.max_evidence_age_s:.0f} s "
                              "is accepted")
    # 7. TLS key
    if tls_spki_sha256 is not None and claims["tls_spki_sha256"] != tls_spki_sha256:
        raise KeyMismatchError(
            f"the server presents TLS key {tls_spki_sha256[:16]}..., but its evidence binds "
            f"{claims['tls_spki_sha256'][:16]}...: another party is answering"
        )
    return VerifiedEvidence(evidence, report, claims)


def verify_model_inclusion(verified: VerifiedEvidence, proof: InclusionProof, model_id: str, policy: Policy) -> str:
    """Check that ``model_id`` is among the models the attested evidence commits to; return its SHA-256.

    The proof must name ``model_id`` and lead to the evidence's ``models_root``
    (:class:`BadSignatureError`); the hash must match the policy's, if it names one
    (:class:`ModelHashMismatchError`)."""
    if proof.model_id != model_id:
        raise BadSignatureError(f"the inclusion proof is for model {proof.model_id!r}, not {model_id!r}")
    if root_from_proof(proof) != verified.models_root:
        raise BadSignatureError(f"the inclusion proof of model {model_id!r} does not lead to the attested "
                                "models commitment")
    expected = policy.models.get(model_id)
    if expected is not None and proof.sha256 != expected:
        raise ModelHashMismatchError(model_id, proof.sha256, expected)
    return proof.sha256
