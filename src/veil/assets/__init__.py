"""Models and data shipped with veil: MNIST networks A-D (SecureNN's benchmark set) and a test slice.

The networks were trained on images 0..7999 of the MNIST test set; the slice holds images from
the held-out range 8000..9999 (see ``scripts/train_mnist.py`` and ``assets/README.md``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from veil.errors import ModelError

__all__ = ["NETWORKS", "model_path", "load_slice"]

NETWORKS = ("A", "B", "C", "D")


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
    """The shipped held-out slice as (x float32 (N,1,28,28) in [0,1], y int64 (N,))."""
    with np.load(_root() / "mnist_slice.npz") as f:
        x, y = f["x"], f["y"]
    if n is not None:
        x, y = x[:n], y[:n]
    return (x.astype(np.float32) / 255.0)[:, None, :, :], y.astype(np.int64)
