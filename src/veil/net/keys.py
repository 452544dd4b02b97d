"""Deployment keys: a deployment CA and one key pair and certificate per party (``veil keys``).

Certificates carry the party name as common name and as a DNS subject-alternative name, so TLS
hostname checking proves a peer *is* the named party. Keys are ECDSA P-256. Private keys are
written with mode 0600 and never printed.

Layout: each host gets only what it needs, one folder per party, and the CA's key stays apart::

    keys/ca/ca.key, keys/ca/ca.pem                  the operator keeps these; ca.key goes to no host
    keys/<party>/ca.pem, <party>.pem, <party>.key   copy this folder (only) to <party>'s host

A party finds its files in ``keys/<party>/``, or directly in the deployment's key directory when
that directory *is* its folder (a host that received only its own folder). The flat layout of
earlier versions (every file in ``keys/``) is still read.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.errors import DeploymentError
from veil.net.deployment import Deployment

__all__ = ["create_keys", "create_ca", "issue_party_cert", "key_paths", "CA_DIR"]

CA_DIR = "ca"
"""Sub-folder of the key directory that holds the CA key and certificate (kept by the operator)."""

_VALIDITY = dt.timedelta(days=365)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def create_ca(out_dir: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"veil deployment CA: {name}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(out_dir / "ca.key", key)
    (out_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue_party_cert(out_dir: Path, party: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(party)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(out_dir / f"{party}.key", key)
    (out_dir / f"{party}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def create_keys(deployment: Deployment, out_dir: str | Path | None = None) -> Path:
    """Create the CA and every party's key and certificate; return the key directory.

    ``<dir>/ca/`` holds the CA key and certificate; ``<dir>/<party>/`` holds exactly what that
    party's host needs: its key, its certificate and the CA certificate. (In a real deployment
    each party would generate its own key and get it signed; here the operator's machine makes
    them all and hands each host its own folder.)
    """
    d = Path(out_dir) if out_dir is not None else deployment.keys_dir
    if CA_DIR in deployment.parties:
        raise DeploymentError(f"a party may not be named {CA_DIR!r}: that folder holds the deployment CA")
    ca_key, ca_cert = create_ca(d / CA_DIR, deployment.name)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    for name in deployment.parties:
        folder = d / name
        folder.mkdir(parents=True, exist_ok=True)
        issue_party_cert(folder, name, ca_key, ca_cert)
        (folder / "ca.pem").write_bytes(ca_pem)
    return d


def key_paths(keys_dir: Path, party: str) -> tuple[Path, Path, Path]:
    """(ca.pem, party.pem, party.key) of ``party``, checked to exist (see the module docstring)."""
    for folder in (keys_dir / party, keys_dir):
        paths = (folder / "ca.pem", folder / f"{party}.pem", folder / f"{party}.key")
        if all(p.is_file() for p in paths):
            return paths
    raise DeploymentError(f"party {party!r}: key files not found: expected {keys_dir / party}/ with ca.pem, "
                          f"{party}.pem and {party}.key (or those three in {keys_dir}/); create them with "
                          "`veil keys --deployment FILE` and copy the party's folder to its host")
