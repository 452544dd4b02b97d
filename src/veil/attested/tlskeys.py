"""The server's TLS identity, generated inside the trusted side, and key fingerprints.

The trusted side creates a fresh ECDSA P-256 key pair at every start and a self-signed
certificate for it. Clients never trust the certificate through a CA: they trust it because the
SHA-256 of its SubjectPublicKeyInfo (:func:`spki_sha256`) is bound into attestation evidence.
The certificate is valid for ten years: the key lives only as long as the process, and an expiry
would only turn a long-running server into a spurious key mismatch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TlsIdentity", "generate_tls_identity", "spki_sha256", "cert_spki_sha256"]


@dataclass(frozen=True)
class TlsIdentity:
    """A private key (kept in memory) and its self-signed certificate (PEM)."""

    private_key: ec.EllipticCurvePrivateKey
    cert_pem: bytes

    @property
    def spki_sha256(self) -> str:
        return spki_sha256(self.private_key.public_key())

    def encrypted_key_pem(self, password: bytes) -> bytes:
        """The private key as PEM encrypted under ``password`` (for handing to the TLS stack)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )


def generate_tls_identity(hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil attested server")])
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TlsIdentity(key, cert.public_bytes(serialization.Encoding.PEM))


def spki_sha256(public_key) -> str:
    """Hex SHA-256 of a public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def cert_spki_sha256(cert_der_or_pem: bytes) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo of a certificate given as DER or PEM."""
    if cert_der_or_pem.lstrip().startswith(b"-----BEGIN"):
        cert = x509.load_pem_x509_certificate(cert_der_or_pem)
    else:
        cert = x509.load_der_x509_certificate(cert_der_or_pem)
    return spki_sha256(cert.public_key())
