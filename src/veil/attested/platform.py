"""The trusted side's interface to its platform, and the client's verifiers of platform reports.

Server side, :class:`TrustedPlatform` is what a TEE offers to code running inside it:

* ``measurement()``: the launch measurement of the code (SEV-SNP ``MEASUREMENT``, TDX ``MRTD``/RTMRs;
  in veil's simulation the hash of the installed package files);
* ``report(report_data)``: a report signed by the platform that carries 64 bytes chosen by the code
  (SEV-SNP ``REPORT_DATA``, TDX ``REPORTDATA``);
* ``derive_key(purpose)``: a key only this platform (and this code) can derive (SEV-SNP
  ``MSG_KEY_REQ``, SGX ``EGETKEY``); :meth:`seal`/:meth:`unseal` encrypt data at rest with it.

Client side, a :class:`PlatformVerifier` per platform name turns a report and its endorsements into
a :class:`PlatformReport` (or raises). Real backends (``sev-snp``, ``tdx``) plug in with
:func:`register_verifier` and a ``TrustedPlatform`` subclass; the client API does not change.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.attested.errors import PlatformNotAllowedError, UnsealError
from veil.simulation import SimulationWarning as _SimulationWarning

__all__ = [
    "SimulationWarning",
    "PlatformReport",
    "TrustedPlatform",
    "PlatformVerifier",
    "register_verifier",
    "get_verifier",
    "registered_platforms",
]


SimulationWarning = _SimulationWarning  # one class for every mode (veil.simulation)


@dataclass(frozen=True)
class PlatformReport:
    """What a verified platform report says."""

    platform: str
    measurement: str
    report_data: bytes
    debug: bool
    signer: str
    simulated: bool


class TrustedPlatform(abc.ABC):
    """The platform services the server's trusted side relies on."""

    name: str = ""
    simulated: bool = False

    @abc.abstractmethod
    def measurement(self) -> str:
        """Hex launch measurement of the running code."""

    @abc.abstractmethod
    def report(self, report_data: bytes) -> tuple[bytes, tuple[bytes, ...]]:
        """A signed report carrying ``report_data`` (64 bytes), and its endorsements."""

    @abc.abstractmethod
    def derive_key(self, purpose: str) -> bytes:
        """A 32-byte key bound to this platform (and code) for ``purpose``."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM under the sealing key: ``nonce(12) || ciphertext+tag``."""
        nonce = os.urandom(12)
        return nonce + AESGCM(self.derive_key("seal")).encrypt(nonce, plaintext, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 28:
            raise UnsealError("sealed blob is truncated")
        try:
            return AESGCM(self.derive_key("seal")).decrypt(blob[:12], blob[12:], aad)
        except InvalidTag as e:
            raise UnsealError("sealed blob failed authentication (other platform key, or tampered)") from e


class PlatformVerifier(abc.ABC):
    """Client-side check of one platform's reports."""

    platform: str = ""
    simulated: bool = False

    @abc.abstractmethod
    def verify(self, report: bytes, endorsements: tuple[bytes, ...],
               trusted_signers: frozenset[str] | None) -> PlatformReport:
        """Check the report's signature chain; raise ``BadSignatureError`` (or a subclass) if it fails."""


_VERIFIERS: dict[str, PlatformVerifier] = {}


def register_verifier(verifier: PlatformVerifier) -> None:
    _VERIFIERS[verifier.platform] = verifier


def get_verifier(platform: str) -> PlatformVerifier:
    try:
        return _VERIFIERS[platform]
    except KeyError:
        raise PlatformNotAllowedError(
            f"no verifier for platform {platform!r}; this client can verify: {', '.join(sorted(_VERIFIERS))}"
        ) from None


def registered_platforms() -> list[str]:
    return sorted(_VERIFIERS)
