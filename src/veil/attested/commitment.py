"""A hiding commitment to the set of loaded models, with per-model inclusion proofs.

The evidence a stranger can fetch (``GET /attestation``) must not show which models the server
holds, yet a client entitled to a model (its owner or a run credential holder) must be able to check
that *its* model, with the expected hash, is among the models the attested code has loaded. So the
claims carry only ``models_root``, the root of a Merkle tree built fresh for every evidence:

1. each model ``(model_id, sha256)`` gets a fresh 32-byte random salt; its leaf is
   ``SHA-256("veil-model-leaf/1\\0" || salt || model_id || "\\0" || sha256 hex)``;
2. the leaves are shuffled (a position says nothing about the id) and padded with random leaves to
   a power of two at least ``pad_to`` (the server passes its ``--max-models``, capped at 4096);
3. an inner node is ``SHA-256("veil-model-node/1\\0" || left || right)``.

A stranger sees a fresh random-looking root per request: not the ids, the hashes, the count, nor
whether anything changed. An entitled client receives an :class:`InclusionProof` (its leaf's salt,
index and sibling path) for one model, together with evidence whose claims carry the root; it
recomputes the root from the proof. The siblings are salted hashes and reveal nothing about other
models; the path length reveals only ``log2`` of the padded leaf count.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veil.attested.errors import EvidenceFormatError

__all__ = ["InclusionProof", "commit_models", "leaf_hash", "root_from_proof", "MAX_PAD"]

_LEAF = b"veil-model-leaf/1\0"
_NODE = b"veil-model-node/1\0"
MAX_PAD = 4096
_HEX = frozenset("0123456789abcdef")


def leaf_hash(model_id: str, sha256: str, salt: bytes) -> bytes:
    return hashlib.sha256(_LEAF + salt + model_id.encode() + b"\0" + sha256.encode()).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


@dataclass(frozen=True)
class InclusionProof:
    """That ``model_id`` with ``sha256`` is a leaf of the tree whose root the evidence carries."""

    model_id: str
    sha256: str
    salt: str  # hex, 32 bytes
    index: int
    path: tuple[str, ...]  # sibling hashes (hex), leaf level first

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "sha256": self.sha256, "salt": self.salt, "index": self.index,
                "path": list(self.path)}

    @classmethod
    def from_json(cls, obj: Any) -> InclusionProof:
        if not isinstance(obj, dict):
            raise EvidenceFormatError("the inclusion proof must be a JSON object")
        model_id, sha, salt, index, path = (obj.get(k) for k in ("model_id", "sha256", "salt", "index", "path"))
        if not isinstance(model_id, str) or not isinstance(sha, str) or not isinstance(salt, str) \
                or not _is_hex(sha, 64) or not _is_hex(salt, 64):
            raise EvidenceFormatError("the inclusion proof needs model_id, a 64-hex sha256 and a 64-hex salt")
        if not isinstance(path, list) or len(path) > 32 or not all(_is_hex(h, 64) for h in path):
            raise EvidenceFormatError("the inclusion proof path must be at most 32 hex SHA-256 values")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < (1 << len(path)):
            raise EvidenceFormatError("the inclusion proof index does not fit its path")
        return cls(model_id, sha, salt, index, tuple(path))


def root_from_proof(proof: InclusionProof) -> str:
    """The root (hex) that ``proof`` leads to."""
    h = leaf_hash(proof.model_id, proof.sha256, bytes.fromhex(proof.salt))
    index = proof.index
    for sibling in proof.path:
        s = bytes.fromhex(sibling)
        h = _node(h, s) if index % 2 == 0 else _node(s, h)
        index //= 2
    return h.hex()


def commit_models(models: Mapping[str, str], pad_to: int = 1) -> tuple[str, dict[str, InclusionProof]]:
    """A fresh commitment to ``models`` (id -> sha256): its root (hex) and one proof per model."""
    items = list(models.items())
    secrets.SystemRandom().shuffle(items)
    salts = [os.urandom(32) for _ in items]
    width = 1
    while width < max(len(items), min(max(pad_to, 1), MAX_PAD)):
        width *= 2
    level = [leaf_hash(mid, sha, salt) for (mid, sha), salt in zip(items, salts, strict=True)]
    level += [os.urandom(32) for _ in range(width - len(level))]
    levels = [level]
    while len(level) > 1:
        level = [_node(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        levels.append(level)
    proofs = {}
    for i, ((mid, sha), salt) in enumerate(zip(items, salts, strict=True)):
        path, j = [], i
        for lv in levels[:-1]:
            path.append(lv[j ^ 1].hex())
            j //= 2
        proofs[mid] = InclusionProof(mid, sha, salt.hex(), i, tuple(path))
    return levels[-1][0].hex(), proofs
