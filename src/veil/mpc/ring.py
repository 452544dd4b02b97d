"""Arithmetic in Z_2^64 on uint64 arrays, with fast matrix products.

NumPy's integer matmul does not use BLAS (about 15-30x slower than float64 here). Two exact methods:

* **int64 GEMM** (when torch is installed): torch's int64 matrix product wraps around mod 2^64 like
  the hardware, so the uint64 operands are viewed as int64 and multiplied directly (about 1.5-2x
  faster than the limbs below on MiniLM's shapes, and a third of their memory for fixed weights).
  Used from the first product of at least ``TORCH_MIN_MACS`` multiply-adds on (for every product from
  then on; small models never import torch); torch is imported and checked once per process, at that
  product, on full-range operands against the limb method (:func:`int64_backend`); if the check fails
  (or ``VEIL_RING_MATMUL=limbs``), the limbs are used.
* **float64 limbs**: each operand is split into three signed limbs of 22 bits held in float64::

    a = a0 + a1 * 2^22 + a2 * 2^44   (mod 2^64),  a0, a1 in [-2^21, 2^21),  a2 in [-2^19, 2^19)

  and only the six limb products that touch bits below 64 (i + j <= 2) are evaluated. Each partial dot
  product is a sum of at most ``CHUNK = 1024`` terms of magnitude <= 2^42, so it stays below 2^53 and
  float64 computes it exactly; longer inner dimensions are split into chunks. The partial products are
  rounded back to int64 and recombined with wrap-around. Cost: three BLAS calls of total work 6x a
  float64 product. Convolutions always use this method.

A fixed operand (weights) is prepared once with :class:`Limbs`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.plain import kernels as PK

__all__ = ["Limbs", "matmul", "bmatmul", "conv2d", "to_ring", "LIMB_BITS", "CHUNK", "int64_backend"]

LIMB_BITS = 22
CHUNK = 1024
_MASK = np.uint64((1 << LIMB_BITS) - 1)
_HALF = np.uint64(1 << (LIMB_BITS - 1))
_S = np.uint64(LIMB_BITS)


def to_ring(x: np.ndarray) -> np.ndarray:
    """View/convert an integer array as uint64 ring elements."""
    x = np.asarray(x)
    return x.view(np.uint64) if x.dtype == np.int64 else x.astype(np.uint64)


def _split(a: np.ndarray) -> list[np.ndarray]:
    """Three centred limbs of ``a`` (uint64) as float64 arrays."""
    a = np.ascontiguousarray(a, dtype=np.uint64)
    out = []
    for i in range(3):
        if i < 2:
            low = ((a + _HALF) & _MASK).view(np.int64) - np.int64(_HALF)  # centred low limb
            out.append(low.astype(np.float64))
            a = (a - low.view(np.uint64)) >> _S
        else:  # only a2 mod 2^20 matters: centre it in [-2^19, 2^19)
            top = ((a + np.uint64(1 << 19)) & np.uint64((1 << 20) - 1)).view(np.int64) - np.int64(1 << 19)
            out.append(top.astype(np.float64))
    return out


_BACKEND: list[Any] = []
_BACKEND_LOCK = threading.Lock()


def int64_backend() -> Any:
    """torch, if it is installed and its int64 matrix product wraps mod 2^64 (checked once against
    the limb method on full-range operands with an inner dimension above ``CHUNK``); else None.
    ``VEIL_RING_MATMUL=limbs`` forces the limbs."""
    if not _BACKEND:
        with _BACKEND_LOCK:
            if not _BACKEND:
                _BACKEND.append(_probe_torch())
    return _BACKEND[0]


TORCH_MIN_MACS = 1 << 20  # smaller products stay on the limbs until torch is loaded (no torch import for small models)


def _big(m: int, k: int, n: int) -> bool:
    """Use the int64 GEMM: a large product, or any product once torch has been loaded for one."""
    return bool(_BACKEND) or m * k * n >= TORCH_MIN_MACS


def _probe_torch() -> Any:
    if os.environ.get("VEIL_RING_MATMUL", "auto") == "limbs":
        return None
    try:
        import torch
    except Exception:  # torch is optional  # noqa: BLE001
        return None
    rng = np.random.default_rng(20261128)
    a = rng.integers(0, 2**64, (3, 2 * CHUNK + 5), dtype=np.uint64)
    b = rng.integers(0, 2**64, (2 * CHUNK + 5, 4), dtype=np.uint64)
    a[0], b[:, 0] = np.uint64(2**64 - 1), np.uint64(2**63)  # extremes
    try:
        ok = np.array_equal(_torch_matmul(torch, a, b), _limb_matmul(a, Limbs(b).cat, 4))
    except Exception:  # noqa: BLE001
        return None
    return torch if ok else None


def _torch_matmul(torch: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b mod 2^64`` (numpy broadcasting of leading dims) by torch's int64 product."""
    def t(x: np.ndarray) -> Any:
        x = np.ascontiguousarray(x)
        return torch.from_numpy((x if x.flags.writeable else x.copy()).view(np.int64))
    return torch.matmul(t(a), t(b)).numpy().view(np.uint64)


class Limbs:
    """A right-hand operand (k, n) prepared once: the uint64 matrix (``ring``) for the int64 product and,
    computed on first use by a product that stays on the limbs, ``[b0 | b1 | b2]`` as one (k, 3n) float64
    array (``cat``)."""

    def __init__(self, b: np.ndarray):
        if b.ndim != 2:
            raise ValueError("Limbs expects a matrix")
        self.shape = b.shape
        self.ring = np.ascontiguousarray(to_ring(b))
        self._cat: np.ndarray | None = None

    @property
    def cat(self) -> np.ndarray:
        if self._cat is None:
            self._cat = np.concatenate(_split(self.ring), axis=1)  # (k, 3n)
        return self._cat


def _matmul_chunk(al: list[np.ndarray], bcat: np.ndarray, n: int) -> np.ndarray:
    """The six limb products of one inner-dimension chunk, recombined mod 2^64."""
    t0 = al[0] @ bcat  # a0 b0 | a0 b1 | a0 b2
    t1 = al[1] @ bcat[:, : 2 * n]  # a1 b0 | a1 b1
    t2 = al[2] @ bcat[:, :n]  # a2 b0
    # group by shift; with k <= CHUNK = 1024 every group sum is below 2^53, so it is added exactly in
    # float64 (|a_i b_j| <= 2^42 for i, j < 2 and <= 2^40 with the 20-bit top limb)
    s0 = t0[:, :n].astype(np.int64).view(np.uint64)
    s1 = (t0[:, n : 2 * n] + t1[:, :n]).astype(np.int64).view(np.uint64)
    s2 = (t0[:, 2 * n :] + t1[:, n:] + t2).astype(np.int64).view(np.uint64)
    return s0 + (s1 << _S) + (s2 << np.uint64(2 * LIMB_BITS))


def matmul(a: np.ndarray, b: np.ndarray | Limbs) -> np.ndarray:
    """``a @ b mod 2^64`` for uint64 ``a`` (..., k) and ``b`` (k, n) (or its :class:`Limbs`)."""
    k, n = b.shape
    a = to_ring(a)
    if a.shape[-1] != k:
        raise ValueError(f"matmul shapes {a.shape} and {b.shape} do not align")
    torch = int64_backend() if _big(a.size // max(k, 1), k, n) else None
    if torch is not None:
        return _torch_matmul(torch, a, b.ring if isinstance(b, Limbs) else to_ring(b))
    lb = b if isinstance(b, Limbs) else Limbs(to_ring(b))
    lead = a.shape[:-1]
    return _limb_matmul(a.reshape(-1, k), lb.cat, n).reshape(*lead, n)


def _limb_matmul(a2: np.ndarray, bcat: np.ndarray, n: int) -> np.ndarray:
    k = a2.shape[1]
    if k <= CHUNK:
        return _matmul_chunk(_split(a2), bcat, n)
    out = np.zeros((a2.shape[0], n), np.uint64)
    for s in range(0, k, CHUNK):
        out += _matmul_chunk(_split(a2[:, s : s + CHUNK]), bcat[s : s + CHUNK], n)
    return out


def conv2d(x: np.ndarray, w: np.ndarray | Limbs, strides: Sequence[int], pads: Sequence[int],
           kernel: Sequence[int] | None = None, out_channels: int | None = None) -> np.ndarray:
    """NCHW convolution over Z_2^64 (no bias). ``w`` is (O, I, kh, kw) uint64, or the :class:`Limbs` of
    ``w.reshape(O, -1).T`` together with ``kernel`` and ``out_channels``."""
    if isinstance(w, Limbs):
        assert kernel is not None and out_channels is not None
        lw, kh, kw, o = w, kernel[0], kernel[1], out_channels
    else:
        o, _, kh, kw = w.shape
        lw = Limbs(np.ascontiguousarray(to_ring(w).reshape(o, -1).T))
    n, _, h, wd = x.shape
    oh, ow = PK.conv_out_hw(h, wd, (kh, kw), strides, pads)
    # split the (small) input into limbs before im2col expands it kh*kw times
    limbs = np.concatenate(_split(to_ring(x)))  # (3N, C, H, W) float64
    cols = PK.im2col(limbs, (kh, kw), strides, pads)  # (3M, K): limb blocks stacked by rows
    m, k = cols.shape[0] // 3, cols.shape[1]
    blocks = [cols[i * m : (i + 1) * m] for i in range(3)]
    if k <= CHUNK:
        y = _matmul_chunk(blocks, lw.cat, o)
    else:
        y = np.zeros((m, o), np.uint64)
        for s in range(0, k, CHUNK):
            y += _matmul_chunk([b[:, s : s + CHUNK] for b in blocks], lw.cat[s : s + CHUNK], o)
    return np.ascontiguousarray(y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2))


def bmatmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched ``a @ b mod 2^64`` with numpy broadcasting of the leading dims (attention products):
    ``a`` (..., m, k), ``b`` (..., k, n), both uint64. Same limb method as :func:`matmul`, with
    ``np.matmul`` on float64 stacks."""
    a, b = to_ring(a), to_ring(b)
    if a.ndim == 2 and b.ndim == 2:
        return matmul(a, b)
    k = a.shape[-1]
    if b.shape[-2] != k:
        raise ValueError(f"matmul shapes {a.shape} and {b.shape} do not align")
    m = int(np.prod(np.broadcast_shapes(a.shape[:-1], b.shape[:-2] + (1,)), dtype=np.int64))
    torch = int64_backend() if _big(m, k, b.shape[-1]) else None
    if torch is not None:
        return _torch_matmul(torch, a, b)
    out: np.ndarray | None = None
    for s in range(0, k, CHUNK):
        al = _split(a[..., s : s + CHUNK])
        bl = _split(b[..., s : s + CHUNK, :])
        s0 = np.matmul(al[0], bl[0]).astype(np.int64).view(np.uint64)
        s1 = (np.matmul(al[0], bl[1]) + np.matmul(al[1], bl[0])).astype(np.int64).view(np.uint64)
        s2 = (np.matmul(al[0], bl[2]) + np.matmul(al[1], bl[1]) + np.matmul(al[2], bl[0])).astype(np.int64).view(np.uint64)
        part = s0 + (s1 << _S) + (s2 << np.uint64(2 * LIMB_BITS))
        out = part if out is None else out + part
    assert out is not None
    return out
