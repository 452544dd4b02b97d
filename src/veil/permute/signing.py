"""Developer signatures (Ed25519, from ``cryptography``) on the manifests the developer hands out.

The manifest check values of :mod:`veil.permute.bundle` catch corruption and mixed-up files; they
cannot tell who wrote a bundle. A signature can: the developer keeps an Ed25519 private key in its
key directory, signs the user bundle's and the cloud package's manifests, and publishes the public
key (64 hex digits) through a channel the user and the cloud trust. ``read_user_bundle`` and
``read_cloud_package`` verify the signature when given that public key, and refuse unsigned or
wrongly signed directories.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from veil.permute.errors import KeyBundleError

__all__ = ["new_signing_key", "public_key_hex", "sign_manifest", "verify_manifest", "fingerprint"]


def _body(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def new_signing_key() -> bytes:
    """A fresh Ed25519 private key, raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key_hex(private_raw: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    pub = Ed25519PrivateKey.from_private_bytes(private_raw).public_key()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def fingerprint(public_hex: str) -> str:
    """A short name for a public key (first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def sign_manifest(manifest: dict[str, Any], private_raw: bytes) -> dict[str, str]:
    sig = Ed25519PrivateKey.from_private_bytes(private_raw).sign(_body(manifest))
    return {"alg": "ed25519", "public_key": public_key_hex(private_raw), "value": sig.hex()}


def verify_manifest(where: str, manifest: dict[str, Any], public_hex: str) -> None:
    """Raise :class:`KeyBundleError` unless ``manifest`` carries a valid signature by ``public_hex``."""
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex.strip()))
    except ValueError:
        raise KeyBundleError("the developer public key must be 64 hex digits (Ed25519)") from None
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519":
        raise KeyBundleError(f"{where}: is not signed, but a developer signature was required")
    try:
        pub.verify(bytes.fromhex(str(sig.get("value", ""))), _body(manifest))
    except (InvalidSignature, ValueError):
        raise KeyBundleError(
            f"{where}: the developer signature does not verify with key {fingerprint(public_hex)} "
            "(signed by someone else, or changed after signing)"
        ) from None
