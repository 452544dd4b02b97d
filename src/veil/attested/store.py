"""The embedded model store: sealed blobs on disk plus an SQLite index.

Layout of ``store_dir``::

    index.sqlite3            models (id, instance, sha256, size, times) and credentials
                             (HMAC of token, kind, model id, model instance)
    blobs/<name>.sealed      AES-256-GCM(seal key, ONNX bytes, aad = "veil-model:" + sha256)

No secret is kept in clear here: the platform keys are derived by the platform (the simulation keeps
its key material in a state directory *outside* the store), and the operator's upload credential
lives in that state directory too.

* Every added model gets a random *instance* id; a credential is bound to the instance it was issued
  for, not only to the model id. A credential survives a replacement of its model's bytes by the
  owner (same instance) but never applies to another model later added under the same id.
* Issuing a credential inserts it only if the model instance still exists, in one statement under
  the store lock, so an issue racing a delete either precedes it (and is revoked by it) or fails.
* ``put`` checks the number of models under the same lock and transaction that inserts.

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
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from veil.attested.errors import StoreError, StoreFullError
from veil.attested.platform import TrustedPlatform

__all__ = ["StoredModel", "Credential", "ModelStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, instance TEXT);
CREATE TABLE IF NOT EXISTS credentials (
    token_mac TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('owner', 'run')),
    model_id TEXT NOT NULL, created REAL NOT NULL, instance TEXT);
"""
_MIGRATE_INSTANCES = """
UPDATE models SET instance = lower(hex(randomblob(16))) WHERE instance IS NULL;
UPDATE credentials SET instance = (SELECT instance FROM models WHERE models.model_id = credentials.model_id)
    WHERE instance IS NULL;
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
    instance: str | None = None  # the model instance the credential was issued for


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
            for table in ("models", "credentials"):  # stores written before credentials were bound to instances
                cols = [r[1] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()]
                if "instance" not in cols:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN instance TEXT")
            self._db.executescript(_MIGRATE_INSTANCES)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the model index in {self.dir}: {e}") from e

    # --- credentials ------------------------------------------------------------------------
    def token_mac(self, token: str) -> str:
        return hmac.new(self._cred_key, token.encode(), hashlib.sha256).hexdigest()

    def add_credential(self, token: str, kind: str, model_id: str, instance: str | None) -> bool:
        """Record a credential for the model instance ``instance`` of ``model_id``; False (nothing
        recorded) if that instance no longer exists (deleted, or another model under the same id)."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO credentials (token_mac, kind, model_id, created, instance) "
                "SELECT ?, ?, model_id, ?, instance FROM models WHERE model_id = ? AND instance = ?",
                (self.token_mac(token), kind, time.time(), model_id, instance))
            return cur.rowcount == 1

    def lookup_credential(self, token: str) -> Credential | None:
        """The credential for ``token`` if it is known *and* the model instance it was issued for exists."""
        mac = self.token_mac(token)
        with self._lock:
            row = self._db.execute(
                "SELECT c.kind, c.model_id, c.instance FROM credentials c JOIN models m "
                "ON m.model_id = c.model_id AND m.instance = c.instance WHERE c.token_mac = ?", (mac,)).fetchone()
        return None if row is None else Credential(row[0], row[1], mac[:32], row[2])

    def instance(self, model_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT instance FROM models WHERE model_id = ?", (model_id,)).fetchone()
        return None if row is None else row[0]

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

    def put(self, model_id: str, data: bytes, sha256: str, owner_token: str, max_models: int | None = None) -> bool:
        """Store a new model (a fresh instance) and its owner credential; True if its bytes were
        already stored (internal: never told to clients). With ``max_models``, refuse
        (:class:`StoreFullError`) when the store already holds that many, checked under the lock
        that inserts."""
        now = time.time()
        instance = secrets.token_hex(16)
        with self._lock:
            if max_models is not None:
                n = self._db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
                if n >= max_models:
                    raise StoreFullError(f"the server holds its maximum of {max_models} models")
            dedup = self._write_blob(data, sha256)
            self._db.execute("BEGIN")
            try:
                self._db.execute("INSERT INTO models (model_id, sha256, size, created, updated, instance) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (model_id, sha256, len(data), now, now, instance))
                self._db.execute("INSERT INTO credentials (token_mac, kind, model_id, created, instance) "
                                 "VALUES (?, 'owner', ?, ?, ?)", (self.token_mac(owner_token), model_id, now, instance))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                if not dedup:
                    self._drop_blob_if_unused(sha256)
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
            self.closed = True

    closed = False
