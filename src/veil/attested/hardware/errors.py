"""Typed failures of the real-hardware verifiers (:class:`AttestationError` subclasses) and of sealing on hardware."""

from __future__ import annotations

from veil.attested.errors import AttestationError, BadSignatureError, EvidenceFormatError, PolicyError
from veil.errors import DeploymentError

__all__ = [
    "EvidenceFormatError",
    "BadSignatureError",
    "CertificateChainError",
    "RevokedError",
    "CollateralError",
    "TcbError",
    "HardwarePolicyError",
    "ReportDataMismatchError",
    "SealingUnavailableError",
    "PolicyError",
]


class CertificateChainError(BadSignatureError):
    """A certificate is malformed, expired, not yet valid, or not signed by the next one up to a trusted root."""


class RevokedError(CertificateChainError):
    """A certificate of the chain is listed in its issuer's revocation list."""


class CollateralError(AttestationError):
    """Collateral (VCEK, TCB info, QE identity, CRLs) is missing, malformed, out of date, or unsigned."""


class TcbError(AttestationError):
    """The platform's trusted computing base is below the minimum, out of date, or inconsistent with its certificate."""


class HardwarePolicyError(AttestationError):
    """A verified report field (debug, VMPL, measurement, MRTD, RTMR, attributes) is not what the policy requires."""


class ReportDataMismatchError(AttestationError):
    """The report's 64 bytes of report data are not the ones the caller expects (TLS key and nonce binding)."""


class SealingUnavailableError(DeploymentError):
    """The server's platform offers no sealing key to this guest through the interfaces veil uses."""
