"""Models and data shipped with veil: MNIST networks A-D (SecureNN's benchmark set) and a test slice.

The networks were trained on images 0..7999 of the MNIST test set; ``mnist_heldout.npz`` ships the
held-out images 8000..9999 (the "held-out 2k"; see ``scripts/train_mnist.py`` and ``assets/README.md``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from veil.errors import InputError, ModelError

__all__ = ["NETWORKS", "HELDOUT", "SLICE", "model_path", "load_slice", "load_heldout", "stories260k_path"]

NETWORKS = ("A", "B", "C", "D")
HELDOUT = 2000
"""Images in the shipped held-out set: MNIST test images 8000..9999 (``mnist_heldout.npz``)."""
SLICE = 256
"""Images :func:`load_slice` returns by default (the first of the held-out set, 8000..8255)."""


def _root() -> Path:
    return Path(str(resources.files("veil.assets")))


def model_path(name: str) -> Path:
    """Path of a shipped network's ONNX file (``name`` in A, B, C, D)."""
    key = name.upper()
    if key not in NETWORKS:
        raise ModelError(f"unknown shipped network {name!r}; choose one of {', '.join(NETWORKS)}")
    p = _root() / "models" / f"{key}.onnx"
    if not p.is_file():
        raise ModelError(f"shipped network file {p} is missing; regenerate it with scripts/train_mnist.py")
    return p


def load_slice(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (default :data:`SLICE` = 256, at most :data:`HELDOUT` = 2000) images of the
    shipped held-out set as (x float32 (n,1,28,28) in [0,1], y int64 (n,))."""
    n = SLICE if n is None else n
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= HELDOUT:
        raise InputError(f"the shipped held-out set has {HELDOUT} images (MNIST test 8000..9999); "
                         f"asked for {n!r}: expected a whole number from 1 to {HELDOUT}")
    with np.load(_root() / "mnist_heldout.npz") as f:
        x, y = f["x"][:n], f["y"][:n]
    return (x.astype(np.float32) / 255.0)[:, None, :, :], y.astype(np.int64)


def load_heldout() -> tuple[np.ndarray, np.ndarray]:
    """All 2000 held-out images (MNIST test 8000..9999; the networks were trained on 0..7999)."""
    return load_slice(HELDOUT)


def stories260k_path() -> Path:
    """Path of the shipped stories260K.bin: Karpathy's 260K-parameter TinyStories Llama in llama2.c
    format (MIT licence, see assets/README.md); sha256 9414d5a2...c8d6."""
    p = _root() / "stories260K.bin"
    if not p.is_file():
        raise ModelError(f"shipped model file {p} is missing (it is part of the veil package data)")
    return p
