"""Compute backends of the accelerator (and of the enclave's own field arithmetic).

* :class:`NumpyBackend`: float64 BLAS on the CPU (``veil.plain.kernels.conv2d`` with its injectable
  matmul for convolutions).
* :class:`TorchBackend`: torch float64 on a CUDA GPU when one is present, else on the CPU.

Both run the same exact limb arithmetic of :mod:`veil.offload.field`: float64 is used only on
integers whose partial sums stay below 2^53, so every backend returns bit-identical field elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.errors import VeilError
from veil.offload.field import FieldOps, limbs_f64, mul_full, mul_small
from veil.plain import kernels as K

__all__ = ["Backend", "NumpyBackend", "TorchBackend", "select_backend"]


class Backend(FieldOps):
    """Linear layers over F_p. Weights are prepared once (``prepare``), inputs arrive as int64 arrays."""

    name = "abstract"

    def put(self, a: np.ndarray) -> Any:
        raise NotImplementedError

    def get(self, t: Any) -> np.ndarray:
        raise NotImplementedError

    def matmul_t(self, a: Any, b: Any) -> Any:  # a @ b.T, float64
        raise NotImplementedError

    def conv(self, x: Any, w: Any, strides: Sequence[int], pads: Sequence[int]) -> Any:  # float64 NCHW
        raise NotImplementedError

    # --- layers ---------------------------------------------------------------------------------
    def prepare(self, w: np.ndarray, full: bool) -> tuple[Any, ...]:
        """Weights as float64 device arrays: (W,) for small signed weights, (W_hi, W_lo) for field shares."""
        if full:
            hi, lo = limbs_f64(w)
            return self.put_f64(hi), self.put_f64(lo)
        return (self.put_f64(w.astype(np.float64)),)

    def put_f64(self, a: np.ndarray) -> Any:
        return self.put(np.ascontiguousarray(a, dtype=np.float64))

    def linear(self, z: np.ndarray, w: tuple[Any, ...]) -> np.ndarray:
        """``z @ W.T mod p`` for ``z`` (rows, K) field elements."""
        zt = self.put(z.astype(np.int64, copy=False))
        y = mul_small(self, zt, w[0], self.matmul_t) if len(w) == 1 else mul_full(self, zt, w[0], w[1], self.matmul_t)
        return self.get(y)

    def conv2d(self, z: np.ndarray, w: tuple[Any, ...], strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
        """NCHW convolution of field elements ``z`` with zero padding, mod p."""
        zt = self.put(z.astype(np.int64, copy=False))

        def op(x: Any, k: Any) -> Any:
            return self.conv(x, k, strides, pads)

        y = mul_small(self, zt, w[0], op) if len(w) == 1 else mul_full(self, zt, w[0], w[1], op)
        return self.get(y)


class NumpyBackend(Backend):
    """float64 BLAS on the CPU through NumPy (the enclave's own backend, and the accelerator's without a GPU)."""

    name = "numpy"

    def put(self, a: np.ndarray) -> np.ndarray:
        return a

    def get(self, t: np.ndarray) -> np.ndarray:
        return t

    def f64(self, t: np.ndarray) -> np.ndarray:
        return t.astype(np.float64)

    def i64(self, t: np.ndarray) -> np.ndarray:
        return t.astype(np.int64)

    def matmul_t(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a @ b.T

    def conv(self, x: np.ndarray, w: np.ndarray, strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
        return K.conv2d(x, w, None, strides, pads)


class TorchBackend(Backend):
    """torch float64 on ``device`` ('cuda' when available by default)."""

    def __init__(self, device: str | None = None):
        try:
            import torch
        except ImportError:
            raise VeilError("the torch backend needs torch: pip install 'veil[torch]'") from None
        self.torch = torch
        self.F = torch.nn.functional
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = f"torch-{self.device.type}"

    def put(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def get(self, t: Any) -> np.ndarray:
        return t.cpu().numpy()

    def f64(self, t: Any) -> Any:
        return t.to(self.torch.float64)

    def i64(self, t: Any) -> Any:
        return t.to(self.torch.int64)

    def matmul_t(self, a: Any, b: Any) -> Any:
        return a @ b.T

    def conv(self, x: Any, w: Any, strides: Sequence[int], pads: Sequence[int]) -> Any:
        t, left, b, r = pads
        if any(pads):
            x = self.F.pad(x, (left, r, t, b))
        return self.F.conv2d(x, w, stride=tuple(strides))


def select_backend(name: str = "auto") -> Backend:
    """'auto': torch on CUDA when torch and a GPU are present, else NumPy. Also 'numpy', 'torch',
    'torch-cpu', 'torch-cuda'."""
    if name == "numpy":
        return NumpyBackend()
    if name in ("torch", "torch-cpu", "torch-cuda"):
        dev = None if name == "torch" else name.split("-")[1]
        if dev == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise VeilError("backend 'torch-cuda' requested but torch sees no CUDA device")
        return TorchBackend(dev)
    if name == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return TorchBackend("cuda")
        except ImportError:
            pass
        return NumpyBackend()
    raise VeilError(f"unknown accelerator backend {name!r}; choose auto, numpy, torch, torch-cpu or torch-cuda")
