"""Errors of the permute mode (STIP). All subclass :mod:`veil.errors`.

Messages name files, shapes, families and sizes; never weights, permutations or user data.
"""

from __future__ import annotations

from veil.errors import InputError, IntegrityError, ModelError, PeerAuthError, ProtocolError

__all__ = [
    "PermuteError",
    "KeyBundleError",
    "UnsupportedFamilyError",
    "SequenceTooLongError",
    "CloudError",
    "CloudAuthError",
    "reason_of",
]


class PermuteError(ProtocolError):
    """Base class of the permute mode's own errors."""


class KeyBundleError(PermuteError, IntegrityError):
    """A key bundle or transformed-model directory is missing, corrupted, tampered with, or does not
    belong to the model / server it is used with."""


class UnsupportedFamilyError(ModelError):
    """The model's family (``config.model_type``) has no permute adapter."""

    def __init__(self, family: str, supported: list[str], detail: str = ""):
        self.family, self.supported = family, sorted(supported)
        msg = f"model family {family!r} is not supported by the permute mode"
        if detail:
            msg += f" ({detail})"
        msg += f"; supported families: {', '.join(self.supported)}"
        super().__init__(msg)


class SequenceTooLongError(InputError):
    """A request would take the sequence past the model's maximum number of positions."""

    def __init__(self, length: int, limit: int):
        self.length, self.limit = length, limit
        super().__init__(
            f"sequence of {length} positions is longer than the model allows ({limit} positions maximum)"
        )


class CloudError(PermuteError):
    """The cloud server refused a request or answered with something the client cannot use."""


class CloudAuthError(CloudError, PeerAuthError):
    """TLS between the user and the cloud failed: the server's certificate does not verify against
    the user's CA (or is not for the expected name), or the cloud refused the user's client
    certificate (or its absence)."""


def reason_of(exc: BaseException) -> str:
    """A short, plain reason for a failed file or network operation, for a user's error line
    (``No such file or directory``, ``[Errno 111] Connection refused``), not the exception's class name."""
    reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc).strip()
    if reason:
        return " ".join(str(reason).split())[:200]
    words = "".join(f" {c.lower()}" if c.isupper() else c for c in type(exc).__name__).strip()
    return words.removesuffix(" error") or words
