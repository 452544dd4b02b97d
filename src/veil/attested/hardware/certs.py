"""Certificate and CRL checks for the vendors' chains, with ``cryptography`` and fixed algorithms.

AMD signs ARK -> ASK (or ASVK) -> VCEK (or VLEK) with RSA-PSS, SHA-384, MGF1-SHA-384, 48-byte salt;
Intel signs Root CA -> PCK Platform/Processor CA -> PCK certificate, and the CRLs, with ECDSA
P-256 / SHA-256. The verifier does not take the algorithm from the certificate: it requires the
vendor's and checks that the certificate declares that one.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable, Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import SignatureAlgorithmOID

from veil.attested.hardware.der import Tlv, read_one
from veil.attested.hardware.errors import (
    CertificateChainError,
    CollateralError,
    RevokedError,
)

__all__ = [
    "RSA_PSS_SHA384",
    "ECDSA_SHA256",
    "load_certificate",
    "load_pem_chain",
    "check_validity",
    "verify_issued_by",
    "verify_chain",
    "load_crl",
    "check_crl",
    "utc",
]

RSA_PSS_SHA384 = "rsa-pss-sha384"
ECDSA_SHA256 = "ecdsa-sha256"


def utc(at: dt.datetime | None) -> dt.datetime:
    """``at`` as an aware UTC time (naive means UTC); the clock when ``None``."""
    if at is None:
        return dt.datetime.now(dt.UTC)
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """A DER or PEM certificate. AMD's VCEKs carry serial number 0, which ``cryptography`` loads with a
    deprecation warning (RFC 5280 wants a positive serial); that warning is expected and silenced here."""
    with warnings.catch_warnings():
        _strict_warnings()
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
        except Exception as e:  # noqa: BLE001 - ValueError, InvalidVersion, ...: all the same refusal
            raise CertificateChainError(f"{what} is not a valid X.509 certificate ({type(e).__name__})") from None
        _parse_fully(cert, what)
    return cert


def _strict_warnings() -> None:
    """Inside ``catch_warnings``: a malformed field that ``cryptography`` only warns about is an error, except
    the deprecation warning for serial number 0 that AMD's VCEKs carry."""
    warnings.simplefilter("error", UserWarning)
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)


def _check_outer_der(der: bytes, tbs_alg_index: Callable[[list[Tlv]], int], what: str) -> None:
    """RFC 5280 strictness ``cryptography`` leaves out: the outer signature algorithm equals the signed
    one, and the signature BIT STRING has no unused bits (else bytes outside the signature could change)."""
    outer = read_one(der).children()
    if len(outer) != 3:
        raise ValueError("not SEQUENCE {tbs, algorithm, signature}")
    tbs_parts = outer[0].children()
    inner_alg = tbs_parts[tbs_alg_index(tbs_parts)]
    if (inner_alg.tag, inner_alg.value) != (outer[1].tag, outer[1].value):
        raise ValueError(f"{what}: outer signature algorithm differs from the signed one")
    if outer[2].tag != 0x03 or not outer[2].value or outer[2].value[0] != 0:
        raise ValueError(f"{what}: signature BIT STRING is malformed")


def _parse_fully(cert: x509.Certificate, what: str) -> None:
    """``cryptography`` parses names, extensions and keys lazily; malformed ones raise various errors on
    first use (ValueError, KeyError, ...). Touch them all here so that a bad certificate is one typed error."""
    try:
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        for ext in cert.extensions:
            _ = ext.value
        cert.public_key()
        _ = (cert.signature_algorithm_oid, cert.tbs_certificate_bytes, cert.signature,
             cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)
        # tbsCertificate: [0] version (optional), serial, signature algorithm
        _check_outer_der(cert.public_bytes(serialization.Encoding.DER),
                         lambda parts: 2 if parts[0].tag == 0xA0 else 1, what)
    except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is the same refusal
        raise CertificateChainError(f"{what} is malformed ({type(e).__name__})") from None


def load_pem_chain(data: bytes, what: str, *, canonical: bool = False) -> list[x509.Certificate]:
    """Certificates of a PEM bundle, in order. With ``canonical``, the text must be exactly the standard
    PEM of those certificates (64-column base64, LF), so that no byte of it can change unnoticed."""
    text = data.rstrip(b"\0")
    with warnings.catch_warnings():
        _strict_warnings()
        try:
            certs = x509.load_pem_x509_certificates(text)
        except Exception as e:  # noqa: BLE001 - ValueError, InvalidVersion, ...: all the same refusal
            raise CertificateChainError(f"{what} is not a valid PEM certificate chain ({type(e).__name__})") from None
        for i, cert in enumerate(certs):
            _parse_fully(cert, f"{what}, certificate {i}")
    if canonical and b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs) != text:
        raise CertificateChainError(f"{what} is not canonical PEM (changed or padded text)")
    return certs


def check_validity(cert: x509.Certificate, at: dt.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise CertificateChainError(
            f"{what} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
            f"not at the verification time {at:%Y-%m-%d %H:%M}"
        )


def _verify_signature(public_key: object, signature: bytes, data: bytes, scheme: str, what: str) -> None:
    try:
        if scheme == RSA_PSS_SHA384:
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise CertificateChainError(f"{what}: issuer key is not RSA")
            public_key.verify(signature, data, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
                              hashes.SHA384())
        elif scheme == ECDSA_SHA256:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise CertificateChainError(f"{what}: issuer key is not ECDSA")
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:  # pragma: no cover - programming error
            raise ValueError(scheme)
    except (InvalidSignature, UnsupportedAlgorithm):
        raise CertificateChainError(f"{what}: signature is invalid") from None


def _declared_scheme_ok(cert_or_crl: x509.Certificate | x509.CertificateRevocationList, scheme: str) -> bool:
    if scheme == RSA_PSS_SHA384:
        if cert_or_crl.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
            return False
        params = cert_or_crl.signature_algorithm_parameters
        return (isinstance(params, padding.PSS) and isinstance(cert_or_crl.signature_hash_algorithm, hashes.SHA384)
                and isinstance(params.mgf, padding.MGF1) and params._salt_length == 48)
    return cert_or_crl.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate, scheme: str, what: str) -> None:
    """``cert`` names ``issuer`` as its issuer and carries a valid ``scheme`` signature by its key."""
    if cert.issuer != issuer.subject:
        raise CertificateChainError(f"{what} is issued by {cert.issuer.rfc4514_string()!r}, "
                                    f"expected {issuer.subject.rfc4514_string()!r}")
    try:
        declared = _declared_scheme_ok(cert, scheme)
    except (UnsupportedAlgorithm, ValueError):
        declared = False
    if not declared:
        raise CertificateChainError(f"{what} does not declare the vendor's signature algorithm ({scheme})")
    _verify_signature(issuer.public_key(), cert.signature, cert.tbs_certificate_bytes, scheme, what)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_chain(chain: list[tuple[x509.Certificate, str]], root: x509.Certificate, scheme: str,
                 at: dt.datetime, *, require_ca: bool = False) -> None:
    """``chain`` is leaf first, each with a name for messages, ending just below ``root`` (the trust
    anchor, which must sign itself). Every link and validity period is checked at ``at``."""
    verify_issued_by(root, root, scheme, "trusted root (self-signature)")
    check_validity(root, at, "trusted root")
    full = [*chain, (root, "trusted root")]
    for (cert, what), (issuer, issuer_what) in zip(full, full[1:], strict=False):
        check_validity(cert, at, what)
        if require_ca and not _is_ca(issuer):
            raise CertificateChainError(f"{issuer_what} is not a CA certificate")
        verify_issued_by(cert, issuer, scheme, what)


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        with warnings.catch_warnings():
            _strict_warnings()
            if data.lstrip().startswith(b"-----BEGIN"):
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
            crl.issuer.rfc4514_string()
            _ = (crl.signature_algorithm_oid, crl.tbs_certlist_bytes, crl.signature, crl.last_update_utc,
                 crl.next_update_utc, [r.serial_number for r in crl])
            for ext in crl.extensions:
                _ = ext.value
            # tbsCertList: version (optional INTEGER), signature algorithm
            _check_outer_der(crl.public_bytes(serialization.Encoding.DER),
                             lambda parts: 1 if parts[0].tag == 0x02 else 0, what)
    except Exception as e:  # noqa: BLE001 - lazily parsed fields of untrusted bytes fail in many ways
        raise CollateralError(f"{what} is not a valid CRL ({type(e).__name__})") from None
    return crl


def check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, scheme: str, at: dt.datetime,
              certs: Iterable[tuple[x509.Certificate, str]], what: str) -> None:
    """``crl`` is signed by ``issuer``, current at ``at``, and lists none of ``certs`` (those ``issuer`` issued)."""
    if crl.issuer != issuer.subject:
        raise CollateralError(f"{what} is issued by {crl.issuer.rfc4514_string()!r}, not by "
                              f"{issuer.subject.rfc4514_string()!r}")
    if not _declared_scheme_ok(crl, scheme):
        raise CollateralError(f"{what} does not declare the vendor's signature algorithm ({scheme})")
    try:
        _verify_signature(issuer.public_key(), crl.signature, crl.tbs_certlist_bytes, scheme, what)
    except CertificateChainError as e:
        raise CollateralError(str(e)) from None
    nxt = crl.next_update_utc
    if crl.last_update_utc > at or (nxt is not None and nxt < at):
        raise CollateralError(f"{what} is current from {crl.last_update_utc:%Y-%m-%d} to "
                              f"{nxt:%Y-%m-%d}, not at the verification time {at:%Y-%m-%d %H:%M}"
                              if nxt else f"{what} is not yet current at {at:%Y-%m-%d}")
    for cert, cert_what in certs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # serial number 0 (AMD VCEKs) warns on access
            serial = cert.serial_number
        if cert.issuer == issuer.subject and crl.get_revoked_certificate_by_serial_number(serial):
            raise RevokedError(f"{cert_what} (serial {serial:x}) is revoked by {what}")
