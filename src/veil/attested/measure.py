"""Measurements: the hash of the installed server code and the hash of a model.

The code measurement is what a TEE's launch measurement stands for in veil's simulation: a
SHA-256 over every ``*.py`` file of the installed ``veil`` package, in sorted path order, each
entry being ``relative/path NUL sha256(content) LF``. Compiled caches (``__pycache__``) and
data assets are not part of it. A client that runs the same veil release computes the same value
with :func:`local_code_measurement` (or ``veil attested measure``) and requires it in its policy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["code_measurement", "local_code_measurement", "sha256_hex", "file_sha256"]


def _veil_root() -> Path:
    import veil

    return Path(veil.__file__).resolve().parent


def code_measurement(root: str | os.PathLike[str] | None = None) -> str:
    """Hex SHA-256 measurement of the Python files under ``root`` (default: the installed veil)."""
    base = Path(root) if root is not None else _veil_root()
    entries: list[tuple[str, str]] = []
    for path in base.rglob("*.py"):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        rel = path.relative_to(base).as_posix()
        entries.append((rel, hashlib.sha256(path.read_bytes()).hexdigest()))
    h = hashlib.sha256(b"veil-code-measurement-v1\n")
    for rel, digest in sorted(entries):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def local_code_measurement() -> str:
    """The measurement a server running this very installation would report."""
    return code_measurement()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, e.g. the ONNX model a client expects the server to serve."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
