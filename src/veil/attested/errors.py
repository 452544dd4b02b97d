"""Errors of the attested mode.

Two families:

* attestation failures, raised by the client *before* it sends anything to a server
  (:class:`AttestationError` and its subclasses, plus :class:`veil.errors.SimulationNotAllowedError`
  when simulated evidence is met without the ``hazmat_allow_simulation`` opt-in);
* refusals by the server (:class:`ServerRefusedError` and its subclasses), each carrying the HTTP
  status and the server's machine-readable reason code.

Messages name what was wrong and what was expected; they never contain credentials, weights,
inputs or outputs.
"""

from __future__ import annotations

from veil.errors import (
    ChannelError,
    DeploymentError,
    InputError,
    ModelError,
    ModelFormatError,
    SimulationNotAllowedError,
    VeilError,
)

__all__ = [
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
    "ServerInternalError",
    "StoreError",
    "StoreFullError",
    "UnsealError",
    "error_for_status",
]


# --- attestation (client side) -----------------------------------------------------------------
class AttestationError(VeilError):
    """The server's evidence does not prove what the client's policy requires."""


class EvidenceFormatError(AttestationError):
    """The evidence is not well-formed (missing fields, wrong encoding, unknown format)."""


class BadSignatureError(AttestationError):
    """The platform signature over the evidence is invalid, or the claims are not the signed ones."""


class UntrustedSignerError(BadSignatureError):
    """The evidence is signed by a key the policy does not trust (or, for simulated evidence, the
    policy pins no simulation signer); ``signer`` is the hex key the evidence names, if known."""

    def __init__(self, message: str, *, signer: str | None = None):
        super().__init__(message)
        self.signer = signer


class PlatformNotAllowedError(AttestationError):
    """The evidence comes from a platform (TEE kind) that the policy does not allow."""


class MeasurementMismatchError(AttestationError):
    """The measured server code differs from the measurement the policy expects."""

    def __init__(self, got: str, expected: str):
        self.got, self.expected = got, expected
        super().__init__(
            f"server code measurement is {got[:16]}..., but the policy expects {expected[:16]}...: "
            "the server does not run the expected code"
        )


class StaleNonceError(AttestationError):
    """The evidence does not answer this client's fresh nonce (a replay) or is too old."""


class KeyMismatchError(AttestationError):
    """The TLS key the server presents is not the key bound into its evidence."""


class ModelHashMismatchError(AttestationError):
    """A model loaded in the server does not have the hash the policy expects."""

    def __init__(self, model_id: str, got: str, expected: str):
        self.model_id, self.got, self.expected = model_id, got, expected
        super().__init__(
            f"model {model_id!r} has sha256 {got[:16]}..., but the policy expects {expected[:16]}..."
        )


class PolicyError(VeilError):
    """The client's attestation policy is incomplete or inconsistent."""


class ConnectionFailedError(ChannelError):
    """The server could not be reached, or the connection broke."""


# --- refusals by the server --------------------------------------------------------------------
class ServerRefusedError(VeilError):
    """The server refused a request; ``status`` is the HTTP status, ``code`` the reason code."""

    status: int = 400

    def __init__(self, message: str, *, status: int | None = None, code: str = "refused"):
        if status is not None:
            self.status = status
        self.code = code
        super().__init__(message)


class AuthenticationError(ServerRefusedError):
    """401: no credential, or a credential the server does not know."""

    status = 401


class AccessDeniedError(ServerRefusedError):
    """403: the credential is valid but does not allow this operation on this model."""

    status = 403


class ModelNotFoundError(ServerRefusedError, ModelError):
    """404: no model with this id."""

    status = 404


class ModelExistsError(ServerRefusedError, ModelError):
    """409: a model with this id exists; only its owner may replace it."""

    status = 409


class InvalidModelError(ServerRefusedError, ModelFormatError):
    """400: the uploaded bytes are not an ONNX model the server can serve."""

    status = 400


class InvalidRequestError(ServerRefusedError, InputError):
    """400/422: malformed request or inputs that do not match the model."""

    status = 400


class LimitExceededError(ServerRefusedError):
    """413: a real size (model bytes, input elements, request bytes) exceeds the server's limit."""

    status = 413


class RateLimitedError(ServerRefusedError):
    """429: too many requests for this credential; ``retry_after`` seconds until the next token."""

    status = 429

    def __init__(self, message: str, *, status: int | None = None, code: str = "rate_limited",
                 retry_after: float | None = None):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class ServerInternalError(ServerRefusedError):
    """5xx: the server failed; the message is deliberately generic."""

    status = 500


# --- server side ---------------------------------------------------------------------------------
class StoreError(DeploymentError):
    """The model store on disk is missing, corrupt or inconsistent."""


class StoreFullError(StoreError):
    """The store holds its maximum number of models."""


class UnsealError(StoreError):
    """A sealed blob could not be decrypted: other platform key, other code, or tampering."""


_LIMIT_CODES = frozenset({"run_time_exceeded", "output_too_large", "run_memory_exceeded", "store_full"})

_BY_STATUS: dict[int, type[ServerRefusedError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: AccessDeniedError,
    404: ModelNotFoundError,
    409: ModelExistsError,
    413: LimitExceededError,
    422: InvalidRequestError,
    429: RateLimitedError,
}


def error_for_status(status: int, code: str, detail: str, retry_after: float | None = None) -> ServerRefusedError:
    """The typed client-side error for a server refusal (``status``, reason ``code``, ``detail``)."""
    if code == "invalid_model":
        cls: type[ServerRefusedError] = InvalidModelError
    elif code in _LIMIT_CODES:
        cls = LimitExceededError
    elif status >= 500:
        cls = ServerInternalError
    else:
        cls = _BY_STATUS.get(status, ServerRefusedError)
    msg = f"server refused ({status} {code}): {detail}"
    if cls is RateLimitedError:
        return RateLimitedError(msg, status=status, code=code, retry_after=retry_after)
    return cls(msg, status=status, code=code)
