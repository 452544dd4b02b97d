"""A *simulated* trusted platform, for machines without SEV-SNP, TDX or SGX.

What it does: it plays the part of the TEE firmware. It holds a simulation signing key (Ed25519)
and a platform secret in a directory of its own (0600 files), reports the code measurement of the
installed veil package, signs reports carrying the trusted side's 64 bytes of report data, and
derives sealing keys from its secret with HKDF-SHA256 (the analogue of an SGX MRSIGNER sealing
policy: a code update can still unseal the store).

What it does not do: protect anything from the host. The host can read the key directory, the
process memory and change the code before it is measured. Evidence from this platform proves
only that *someone holding the simulation key* signed it. This is why creating one warns
(:class:`SimulationWarning`) and why clients refuse its evidence unless they opt in with
``hazmat_allow_simulation=True`` *and* pin the simulation public key
(``Policy(simulation_signers=...)``; the server prints it at start): evidence from any other
simulation key is refused.

Where its secrets live: ``key_dir`` is the server's state directory (outside the model store, so
no model can be made to read it), directory 0700, files 0600. A real platform keeps no such files.

Report format (bytes): canonical JSON ``{"body": b64(body), "signature": b64(Ed25519(body))}``
where ``body`` is the canonical JSON of ``platform``, ``measurement``, ``report_data`` (hex),
``debug`` and ``signer`` (hex raw public key). The only endorsement is the raw public key.
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.attested.errors import BadSignatureError, EvidenceFormatError, UntrustedSignerError
from veil.attested.evidence import canonical_json
from veil.attested.measure import code_measurement
from veil.attested.platform import (
    PlatformReport,
    PlatformVerifier,
    SimulationWarning,
    TrustedPlatform,
    register_verifier,
)

__all__ = ["SIMULATED", "SimulatedPlatform", "SimulatedVerifier", "simulation_public_key"]

SIMULATED = "simulated"
_KEY_FILE = "simulation_signing_key.pem"
_SECRET_FILE = "simulation_platform_secret"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SimulatedPlatform(TrustedPlatform):
    """The simulated TEE. ``key_dir`` holds its signing key and platform secret (created if absent)."""

    name = SIMULATED
    simulated = True

    def __init__(self, key_dir: str | os.PathLike[str], measurement: str | None = None):
        warnings.warn(
            "veil attested: SIMULATED enclave. Evidence is signed by a simulation key the host can read; "
            "it proves nothing about the hardware. Use only for development and tests.",
            SimulationWarning,
            stacklevel=2,
        )
        self.key_dir = Path(key_dir)
        self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, secret_path = self.key_dir / _KEY_FILE, self.key_dir / _SECRET_FILE
        if not key_path.exists():
            key = Ed25519PrivateKey.generate()
            _write_private(key_path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        if not secret_path.exists():
            _write_private(secret_path, os.urandom(32))
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise EvidenceFormatError(f"{key_path} is not an Ed25519 private key")
        self._key = loaded
        self._secret = secret_path.read_bytes()
        self._measurement = measurement if measurement is not None else code_measurement()

    @property
    def public_key_hex(self) -> str:
        return _raw_public(self._key.public_key()).hex()

    def measurement(self) -> str:
        return self._measurement

    def report(self, report_data: bytes) -> tuple[bytes, tuple[bytes, ...]]:
        if len(report_data) != 64:
            raise ValueError("report data must be 64 bytes")
        body = canonical_json({
            "platform": SIMULATED,
            "measurement": self._measurement,
            "report_data": report_data.hex(),
            "debug": False,
            "signer": self.public_key_hex,
        })
        report = canonical_json({
            "body": base64.b64encode(body).decode(),
            "signature": base64.b64encode(self._key.sign(body)).decode(),
        })
        return report, (_raw_public(self._key.public_key()),)

    def derive_key(self, purpose: str) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"veil-simulated-platform",
                    info=f"veil attested {purpose}".encode())
        return hkdf.derive(self._secret)


def simulation_public_key(key_dir: str | os.PathLike[str]) -> str:
    """Hex raw public key of the simulation signing key in ``key_dir`` (for ``Policy.simulation_signers``)."""
    key = serialization.load_pem_private_key((Path(key_dir) / _KEY_FILE).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise EvidenceFormatError(f"{key_dir}/{_KEY_FILE} is not an Ed25519 private key")
    return _raw_public(key.public_key()).hex()


class SimulatedVerifier(PlatformVerifier):
    platform = SIMULATED
    simulated = True

    def verify(self, report: bytes, endorsements: tuple[bytes, ...],
               trusted_signers: frozenset[str] | None) -> PlatformReport:
        try:
            outer = json.loads(report)
            body_bytes = base64.b64decode(outer["body"], validate=True)
            signature = base64.b64decode(outer["signature"], validate=True)
            body = json.loads(body_bytes)
            signer_hex, measurement = body["signer"], body["measurement"]
            report_data, debug = bytes.fromhex(body["report_data"]), body["debug"]
        except (ValueError, KeyError, TypeError) as e:
            raise EvidenceFormatError("simulated report is malformed") from e
        if len(endorsements) != 1 or len(endorsements[0]) != 32:
            raise EvidenceFormatError("simulated evidence must carry exactly one 32-byte public key")
        if endorsements[0].hex() != signer_hex:
            raise BadSignatureError("simulated report names another signer than its endorsement")
        try:
            Ed25519PublicKey.from_public_bytes(endorsements[0]).verify(signature, body_bytes)
        except InvalidSignature:
            raise BadSignatureError("the simulation signature over the platform report is invalid") from None
        if trusted_signers is not None and signer_hex not in trusted_signers:
            raise UntrustedSignerError(
                f"report signed by simulation key {signer_hex[:16]}..., which the policy does not trust",
                signer=signer_hex)
        if body.get("platform") != SIMULATED or not isinstance(measurement, str) or not isinstance(debug, bool):
            raise EvidenceFormatError("simulated report body has wrong field types")
        return PlatformReport(SIMULATED, measurement, report_data, debug, signer_hex, simulated=True)


register_verifier(SimulatedVerifier())
