"""The embedded model store: sealed blobs on disk plus an SQLite index.

Layout of ``store_dir``::

    index.sqlite3            models (id, sha256, size, times) and credentials (HMAC of token, kind, model)
    blobs/<name>.sealed      AES-256-GCM(seal key, ONNX bytes, aad = "veil-model:" + sha256)

* Identical uploads are stored once: the blob is addressed by its SHA-256, and removed when no
  model id refers to it any more.
* Nothing in the store is readable without the platform: blob names are HMAC(blob-name key,
  sha256), so the host cannot even test whether a known model is stored; credentials are kept as
  HMAC(credential key, token). Both keys and the sealing key are derived by the trusted platform.
* The host can delete or roll back files; unsealing then fails with :class:`UnsealError` (or an
  old model reappears). Rollback protection needs a monotonic counter the simulation lacks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from veil.attested.errors import StoreError
from veil.attested.platform import TrustedPlatform

__all__ = ["StoredModel", "Credential", "ModelStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    token_mac TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('owner', 'run')),
    model_id TEXT NOT NULL, created REAL NOT NULL);
"""


@dataclass(frozen=True)
class StoredModel:
    model_id: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Credential:
    kind: str  # "owner" | "run" | "upload"
    model_id: str | None
    fingerprint: str  # not secret: used to key rate limits


class ModelStore:
    def __init__(self, store_dir: str | os.PathLike[str], platform: TrustedPlatform):
        self.dir = Path(store_dir)
        self.blob_dir = self.dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._platform = platform
        self._name_key = platform.derive_key("blob-name")
        self._cred_key = platform.derive_key("credential")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.dir / "index.sqlite3", check_same_thread=False, isolation_level=None)
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the model index in {self.dir}: {e}") from e

    # --- credentials ------------------------------------------------------------------------
    def token_mac(self, token: str) -> str:
        return hmac.new(self._cred_key, token.encode(), hashlib.sha256).hexdigest()

    def add_credential(self, token: str, kind: str, model_id: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO credentials VALUES (?, ?, ?, ?)",
                             (self.token_mac(token), kind, model_id, time.time()))

    def lookup_credential(self, token: str) -> Credential | None:
        mac = self.token_mac(token)
        with self._lock:
            row = self._db.execute("SELECT kind, model_id FROM credentials WHERE token_mac = ?", (mac,)).fetchone()
        return None if row is None else Credential(row[0], row[1], mac[:32])

    # --- models -----------------------------------------------------------------------------
    def _blob_path(self, sha256: str) -> Path:
        return self.blob_dir / (hmac.new(self._name_key, sha256.encode(), hashlib.sha256).hexdigest() + ".sealed")

    def has_blob(self, sha256: str) -> bool:
        return self._blob_path(sha256).exists()

    def list(self) -> list[StoredModel]:
        with self._lock:
            rows = self._db.execute("SELECT model_id, sha256, size FROM models ORDER BY model_id").fetchall()
        return [StoredModel(*r) for r in rows]

    def get(self, model_id: str) -> StoredModel | None:
        with self._lock:
            row = self._db.execute("SELECT model_id, sha256, size FROM models WHERE model_id = ?",
                                   (model_id,)).fetchone()
        return None if row is None else StoredModel(*row)

    def _write_blob(self, data: bytes, sha256: str) -> bool:
        """Seal and write the blob unless an identical one is stored; True if it was deduplicated."""
        path = self._blob_path(sha256)
        if path.exists():
            return True
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self._platform.seal(data, b"veil-model:" + sha256.encode()))
        os.replace(tmp, path)
        return False

    def _drop_blob_if_unused(self, sha256: str) -> None:
        n = self._db.execute("SELECT COUNT(*) FROM models WHERE sha256 = ?", (sha256,)).fetchone()[0]
        if n == 0:
            self._blob_path(sha256).unlink(missing_ok=True)

    def put(self, model_id: str, data: bytes, sha256: str, owner_token: str) -> bool:
        """Store a new model and its owner credential; True if its bytes were already stored."""
        now = time.time()
        with self._lock:
            dedup = self._write_blob(data, sha256)
            self._db.execute("BEGIN")
            try:
                self._db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?)", (model_id, sha256, len(data), now, now))
                self._db.execute("INSERT INTO credentials VALUES (?, 'owner', ?, ?)",
                                 (self.token_mac(owner_token), model_id, now))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise StoreError(f"could not record model {model_id!r}: {e}") from e
        return dedup

    def replace(self, model_id: str, data: bytes, sha256: str) -> tuple[str, bool]:
        """Point ``model_id`` at new bytes; return (old sha256, deduplicated)."""
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM models WHERE model_id = ?", (model_id,)).fetchone()
            if row is None:
                raise StoreError(f"model {model_id!r} vanished during replacement")
            dedup = self._write_blob(data, sha256)
            self._db.execute("UPDATE models SET sha256 = ?, size = ?, updated = ? WHERE model_id = ?",
                             (sha256, len(data), time.time(), model_id))
            self._drop_blob_if_unused(row[0])
        return row[0], dedup

    def delete(self, model_id: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM models WHERE model_id = ?", (model_id,)).fetchone()
            if row is None:
                return
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM models WHERE model_id = ?", (model_id,))
            self._db.execute("DELETE FROM credentials WHERE model_id = ?", (model_id,))
            self._db.execute("COMMIT")
            self._drop_blob_if_unused(row[0])

    def load(self, sha256: str) -> bytes:
        """Unseal the bytes of the model with this hash, and check the hash."""
        path = self._blob_path(sha256)
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise StoreError(f"sealed blob for model hash {sha256[:16]}... is missing") from e
        data = self._platform.unseal(blob, b"veil-model:" + sha256.encode())
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"unsealed model does not hash to {sha256[:16]}...")
        return data

    def close(self) -> None:
        with self._lock:
            self._db.close()
