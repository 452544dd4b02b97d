"""Files the three roles exchange: the developer's key, the user's key bundle, the cloud's model.

Each is a directory: safetensors files (never pickle) plus ``manifest.json`` holding a format tag,
metadata, the SHA-256 of every file, and a check value over the manifest itself.

* ``veil-permute-key/1`` (developer, secret): ``keys.safetensors`` (``hidden``, optional ``vocab``).
* ``veil-permute-user/1`` (user, secret): ``keys.safetensors``; in ``embed`` mode also
  ``user_weights.safetensors`` (the token embedding and the head, which the cloud never gets);
  tokenizer files when the source model has them.
* ``veil-permute-cloud/1`` (cloud): ``model.safetensors`` (transformed weights), ``config.json``.

Check values. For key and user bundles the check is HMAC-SHA256 over the canonical manifest, keyed
with a hash of the permutations themselves: any change of a file, of the metadata, or a mix of files
from two bundles fails. For the cloud directory it is a SHA-256 of the canonical manifest. These
detect corruption and mismatched files; they are not signatures: whoever can write a whole new
bundle can also write a new check. For authenticity the developer signs the user bundle and the
cloud package with Ed25519 (:mod:`veil.permute.signing`); readers given the developer's public key
verify it. A user detects a bundle that belongs to another transformed model
by the random ``key_id``, which the cloud also holds and reports.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from veil.permute.errors import KeyBundleError, reason_of
from veil.permute.signing import new_signing_key, sign_manifest, verify_manifest
from veil.permute.transform import PermutationKey, check_permutation

__all__ = [
    "KEY_FORMAT",
    "USER_FORMAT",
    "CLOUD_FORMAT",
    "UserBundle",
    "CloudPackage",
    "write_key",
    "read_key",
    "read_signing_key",
    "write_user_bundle",
    "read_user_bundle",
    "write_cloud_package",
    "read_cloud_package",
]

KEY_FORMAT = "veil-permute-key/1"
USER_FORMAT = "veil-permute-user/1"
CLOUD_FORMAT = "veil-permute-cloud/1"
MANIFEST = "manifest.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _mac_key(key: PermutationKey | None) -> bytes:
    h = hashlib.sha256(b"veil-permute-manifest-check/1")
    if key is not None:
        h.update(np.ascontiguousarray(key.hidden, dtype="<i8").tobytes())
        if key.vocab is not None:
            h.update(np.ascontiguousarray(key.vocab, dtype="<i8").tobytes())
    return h.digest()


def _check_value(manifest: dict[str, Any], key: PermutationKey | None) -> str:
    body = {k: v for k, v in manifest.items() if k not in ("check", "signature")}
    return hmac.new(_mac_key(key), _canonical(body), hashlib.sha256).hexdigest()


def _write_dir(path: Path, fmt: str, meta: dict[str, Any], files: dict[str, bytes], key: PermutationKey | None,
               signing_key: bytes | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {
        "format": fmt,
        "meta": meta,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    manifest["check"] = _check_value(manifest, key)
    if signing_key is not None:
        manifest["signature"] = sign_manifest(manifest, signing_key)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _read_manifest(path: Path, fmt: str) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise KeyBundleError(f"{path}: no such directory; expected a {fmt} directory")
    if not mpath.is_file():
        raise KeyBundleError(f"{path}: no {MANIFEST}; expected a {fmt} directory")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyBundleError(f"{mpath}: not valid JSON ({reason_of(exc)})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise KeyBundleError(f"{mpath}: not a veil manifest")
    if manifest.get("format") != fmt:
        raise KeyBundleError(f"{path}: is a {manifest.get('format')!r} directory; expected {fmt!r}")
    if not isinstance(manifest.get("meta"), dict):
        raise KeyBundleError(f"{mpath}: has no metadata")
    return manifest


def _read_files(path: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    out = {}
    for name, digest in manifest["files"].items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise KeyBundleError(f"{path / MANIFEST}: names a file outside the bundle: {name!r}")
        fpath = path / name
        if not fpath.is_file():
            raise KeyBundleError(f"{path}: file {name!r} named in the manifest is missing")
        data = fpath.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise KeyBundleError(f"{path}: file {name!r} fails its SHA-256 check (corrupted or tampered with)")
        out[name] = data
    return out


def _verify_check(path: Path, manifest: dict[str, Any], key: PermutationKey | None) -> None:
    if not hmac.compare_digest(str(manifest.get("check", "")), _check_value(manifest, key)):
        raise KeyBundleError(
            f"{path}: manifest check value does not match (manifest edited, or files from different bundles)"
        )


def _safetensors(path: Path, name: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise KeyBundleError(f"{path}: {name!r} is not a valid safetensors file ({reason_of(exc)})") from None


def _key_files(key: PermutationKey) -> bytes:
    tensors = {"hidden": torch.from_numpy(np.asarray(key.hidden, dtype=np.int64))}
    if key.vocab is not None:
        tensors["vocab"] = torch.from_numpy(np.asarray(key.vocab, dtype=np.int64))
    return st_save(tensors)


def _key_from(path: Path, files: dict[str, bytes], meta: dict[str, Any]) -> PermutationKey:
    if "keys.safetensors" not in files:
        raise KeyBundleError(f"{path}: has no keys.safetensors")
    tensors = _safetensors(path, "keys.safetensors", files["keys.safetensors"])
    try:
        d, vocab_size, mode = int(meta["hidden_size"]), int(meta["vocab_size"]), meta["mode"]
        key_id = str(meta["key_id"])
    except (KeyError, TypeError, ValueError):
        raise KeyBundleError(f"{path}: manifest metadata lacks hidden_size, vocab_size, mode or key_id") from None
    if "hidden" not in tensors:
        raise KeyBundleError(f"{path}: keys.safetensors has no hidden permutation")
    hidden = check_permutation(tensors["hidden"].numpy(), d, "hidden")
    vocab = None
    if mode == "vocab":
        if "vocab" not in tensors:
            raise KeyBundleError(f"{path}: mode 'vocab' but keys.safetensors has no vocabulary permutation")
        vocab = check_permutation(tensors["vocab"].numpy(), vocab_size, "vocabulary")
    elif mode != "embed":
        raise KeyBundleError(f"{path}: unknown mode {mode!r}; expected 'embed' or 'vocab'")
    return PermutationKey(hidden=hidden, vocab=vocab, key_id=key_id)


# --- developer key -----------------------------------------------------------------------------
def write_key(path: str | Path, key: PermutationKey, meta: dict[str, Any], signing_key: bytes | None = None) -> None:
    """Write the developer's key and its Ed25519 signing key (fresh unless given).
    ``meta`` must hold family, mode, hidden_size, vocab_size."""
    from veil.permute.signing import public_key_hex

    signing_key = signing_key or new_signing_key()
    meta = dict(meta, key_id=key.key_id, developer_public_key=public_key_hex(signing_key))
    files = {"keys.safetensors": _key_files(key), "signing_key.safetensors": st_save(
        {"ed25519": torch.frombuffer(bytearray(signing_key), dtype=torch.uint8)})}
    _write_dir(Path(path), KEY_FORMAT, meta, files, key)


def read_signing_key(path: str | Path) -> bytes:
    """The developer's Ed25519 private key from its key directory (verified like :func:`read_key`)."""
    path = Path(path)
    read_key(path)
    manifest = _read_manifest(path, KEY_FORMAT)
    files = _read_files(path, manifest)
    if "signing_key.safetensors" not in files:
        raise KeyBundleError(f"{path}: has no signing key")
    raw = _safetensors(path, "signing_key.safetensors", files["signing_key.safetensors"]).get("ed25519")
    if raw is None or raw.numel() != 32:
        raise KeyBundleError(f"{path}: signing key is not 32 bytes")
    return bytes(raw.numpy().tobytes())


def read_key(path: str | Path) -> tuple[PermutationKey, dict[str, Any]]:
    path = Path(path)
    manifest = _read_manifest(path, KEY_FORMAT)
    files = _read_files(path, manifest)
    key = _key_from(path, files, manifest["meta"])
    _verify_check(path, manifest, key)
    return key, manifest["meta"]


# --- user bundle -------------------------------------------------------------------------------
@dataclass
class UserBundle:
    """What the user holds: the key, the model's public shape facts, and in ``embed`` mode the
    token embedding table and the head."""

    key: PermutationKey
    meta: dict[str, Any]
    embedding: torch.Tensor | None = None
    head: torch.Tensor | None = None
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return str(self.meta["mode"])

    @property
    def family(self) -> str:
        return str(self.meta["family"])


def write_user_bundle(path: str | Path, bundle: UserBundle, signing_key: bytes | None = None) -> None:
    files = {"keys.safetensors": _key_files(bundle.key)}
    if bundle.embedding is not None:
        weights = {"embedding": bundle.embedding.contiguous()}
        if bundle.head is not None:
            weights["head"] = bundle.head.contiguous()
        files["user_weights.safetensors"] = st_save(weights)
    for name, data in bundle.tokenizer_files.items():
        if name in _TOKENIZER_FILES:
            files[name] = data
    _write_dir(Path(path), USER_FORMAT, dict(bundle.meta, key_id=bundle.key.key_id), files, bundle.key, signing_key)


def read_user_bundle(path: str | Path, developer_key: str | None = None) -> UserBundle:
    """Read and verify a user key bundle; any problem is a :class:`KeyBundleError`.
    ``developer_key`` (hex Ed25519 public key): also require the developer's signature."""
    path = Path(path)
    manifest = _read_manifest(path, USER_FORMAT)
    if developer_key is not None:
        verify_manifest(str(path), manifest, developer_key)
    files = _read_files(path, manifest)
    meta = manifest["meta"]
    key = _key_from(path, files, meta)
    _verify_check(path, manifest, key)
    bundle = UserBundle(key=key, meta=meta, tokenizer_files={n: files[n] for n in _TOKENIZER_FILES if n in files})
    if key.vocab is None:
        if "user_weights.safetensors" not in files:
            raise KeyBundleError(f"{path}: mode 'embed' but the bundle has no user_weights.safetensors")
        weights = _safetensors(path, "user_weights.safetensors", files["user_weights.safetensors"])
        bundle.embedding = weights.get("embedding")
        bundle.head = weights.get("head")
        shape = (int(meta["vocab_size"]), int(meta["hidden_size"]))
        if bundle.embedding is None or tuple(bundle.embedding.shape) != shape:
            raise KeyBundleError(f"{path}: user_weights.safetensors has no embedding of shape {shape}")
    return bundle


# --- cloud package -----------------------------------------------------------------------------
@dataclass
class CloudPackage:
    """What the cloud holds: transformed weights, the HF config, public metadata."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    meta: dict[str, Any]


def write_cloud_package(path: str | Path, package: CloudPackage, signing_key: bytes | None = None) -> None:
    files = {
        "model.safetensors": st_save({k: v.contiguous() for k, v in package.state_dict.items()}),
        "config.json": json.dumps(package.config, sort_keys=True, default=str).encode(),
    }
    _write_dir(Path(path), CLOUD_FORMAT, package.meta, files, None, signing_key)


def read_cloud_package(path: str | Path, developer_key: str | None = None) -> CloudPackage:
    """Read and verify a cloud package; ``developer_key`` as in :func:`read_user_bundle`."""
    path = Path(path)
    manifest = _read_manifest(path, CLOUD_FORMAT)
    if developer_key is not None:
        verify_manifest(str(path), manifest, developer_key)
    files = _read_files(path, manifest)
    _verify_check(path, manifest, None)
    for name in ("model.safetensors", "config.json"):
        if name not in files:
            raise KeyBundleError(f"{path}: has no {name}")
    try:
        config = json.loads(files["config.json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyBundleError(f"{path}: config.json is not valid JSON") from None
    state = _safetensors(path, "model.safetensors", files["model.safetensors"])
    return CloudPackage(state_dict=state, config=config, meta=manifest["meta"])
