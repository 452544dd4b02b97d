"""veil attested mode: a confidential ONNX inference server and a client that verifies before it sends.

The server (``veil attested serve``) runs on a TEE's trusted side; it serves ONNX models with
onnxruntime behind a FastAPI app over TLS, and produces evidence binding the measured code, the
loaded models' hashes, its TLS key and the client's nonce. The client (:func:`connect`) verifies
that evidence against a :class:`Policy`, then pins the attested TLS key for every later call.

On AMD SEV-SNP and Intel TDX confidential VMs the server gets real evidence through Linux's
configfs-tsm and clients verify it (:mod:`veil.attested.hardware`); elsewhere the platform is a
clearly labelled simulation (:class:`SimulatedPlatform`) that clients accept only with
``hazmat_allow_simulation=True``.
"""

from veil.attested import hardware as _hardware  # noqa: F401  (registers the sev-snp and tdx verifiers)
from veil.attested.client import Connection, ModelInfo, RunResult, UploadResult, connect
from veil.attested.errors import (
    AccessDeniedError,
    AttestationError,
    AuthenticationError,
    BadSignatureError,
    ConnectionFailedError,
    EvidenceFormatError,
    InvalidModelError,
    InvalidRequestError,
    KeyMismatchError,
    LimitExceededError,
    MeasurementMismatchError,
    ModelExistsError,
    ModelHashMismatchError,
    ModelNotFoundError,
    PlatformNotAllowedError,
    PolicyError,
    RateLimitedError,
    ServerRefusedError,
    SimulationNotAllowedError,
    StaleNonceError,
    UntrustedSignerError,
)
from veil.attested.evidence import Evidence
from veil.attested.measure import code_measurement, file_sha256, local_code_measurement
from veil.attested.platform import PlatformReport, PlatformVerifier, SimulationWarning, TrustedPlatform
from veil.attested.policy import Policy, VerifiedEvidence, verify_evidence
from veil.attested.simulated import SimulatedPlatform, simulation_public_key

__all__ = [
    "connect",
    "Connection",
    "Policy",
    "UploadResult",
    "ModelInfo",
    "RunResult",
    "Evidence",
    "VerifiedEvidence",
    "verify_evidence",
    "code_measurement",
    "local_code_measurement",
    "file_sha256",
    "TrustedPlatform",
    "PlatformVerifier",
    "PlatformReport",
    "SimulatedPlatform",
    "SimulationWarning",
    "simulation_public_key",
    "AttestationError",
    "EvidenceFormatError",
    "BadSignatureError",
    "UntrustedSignerError",
    "PlatformNotAllowedError",
    "MeasurementMismatchError",
    "StaleNonceError",
    "KeyMismatchError",
    "ModelHashMismatchError",
    "SimulationNotAllowedError",
    "PolicyError",
    "ConnectionFailedError",
    "ServerRefusedError",
    "AuthenticationError",
    "AccessDeniedError",
    "ModelNotFoundError",
    "ModelExistsError",
    "InvalidModelError",
    "InvalidRequestError",
    "LimitExceededError",
    "RateLimitedError",
]
