"""Compute backends of the accelerator (and of the enclave's own field arithmetic).

* :class:`NumpyBackend`: float64 BLAS on the CPU (``veil.plain.kernels.conv2d`` with its injectable
  matmul for convolutions).
* :class:`TorchBackend`: torch float64 on a CUDA GPU when one is present, else on the CPU.

Both run the same exact limb arithmetic of :mod:`veil.offload.field`: float64 is used only on
integers whose partial sums stay below 2^53, so every backend returns bit-identical field elements.

:meth:`Backend.field_matmul` / :meth:`Backend.field_matmul_sum` are the exact products of two *field*
matrices (both factors uniform in [0, p), as in offload training). On a GPU, operands travel to the
device as 4-byte words (uint32 field elements viewed as int32: every element is < 2^31), are widened,
split into limbs, multiplied and reduced on the device, and the result comes back as one 4-byte copy;
nothing in between synchronises with the host. For convolutions offloaded as convolutions, an
:class:`Im2col` operand moves the tensor (not its im2col matrix) and builds the matrix on the device,
and ``col2im=`` folds a data gradient there before it comes back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from veil.errors import VeilError
from veil.offload.errors import FieldRangeError
from veil.offload.field import MAX_INNER_FULL, FieldOps, P, limbs_f64, mul_full, mul_small
from veil.plain import kernels as K

__all__ = ["Backend", "NumpyBackend", "TorchBackend", "select_backend", "MAX_INNER_KARATSUBA", "FieldArg", "Im2col",
           "ConvGeometry"]

MAX_INNER_KARATSUBA = 2 ** (53 - 34)  #: exact limit of the three-product (Karatsuba) form (exclusive)


class ConvGeometry(Protocol):
    """A convolution's geometry (e.g. :class:`veil.offload.training.conv_field.ConvSpec`)."""

    @property
    def x_shape(self) -> tuple[int, int, int, int]: ...
    @property
    def kernel(self) -> tuple[int, int]: ...
    @property
    def strides(self) -> tuple[int, int]: ...
    @property
    def pads(self) -> tuple[int, int, int, int]: ...
    @property
    def out_hw(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class Im2col:
    """An operand standing for ``cols(x)`` (im2col: rows ``(n, oh, ow)``, columns ``(c, i, j)``, zero padding,
    as :func:`veil.offload.training.conv_field.cols`) of the NCHW field tensor ``x`` (or of the sum mod p of
    a tuple of tensors). The backend moves the tensor, not ``cols(x)``, to its device and builds the matrix
    there."""

    x: np.ndarray | tuple[np.ndarray, ...]
    spec: ConvGeometry


#: a field matrix (uint32 or int64 host array, entries in [0, p)), a tuple of such matrices of one shape
#: standing for their sum mod p (formed on the backend's device), or an :class:`Im2col` of a field tensor
FieldArg = np.ndarray | tuple[np.ndarray, ...] | Im2col


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

    # --- products of two field matrices (offload training) ----------------------------------------
    def field_matmul(self, u: FieldArg, v: FieldArg, dtype: Any = np.int64,
                     col2im: ConvGeometry | None = None) -> np.ndarray:
        """``u @ v mod p`` for field matrices (see :meth:`field_matmul_sum`)."""
        return self.field_matmul_sum([(u, v)], dtype, col2im)

    def field_matmul_sum(self, pairs: Sequence[tuple[FieldArg, FieldArg]], dtype: Any = np.int64,
                         col2im: ConvGeometry | None = None) -> np.ndarray:
        """``sum_i u_i @ v_i mod p``, exact, as a host array of ``dtype`` (int64 or uint32).

        ``u_i`` (n x k_i) and ``v_i`` (k_i x m) are uint32 or int64 arrays of field elements in [0, p),
        tuples of such arrays (their sum mod p), or :class:`Im2col` operands (``cols`` of a tensor, built on
        the device). ``col2im``: return ``col2im`` of the (n x m) result instead, an array of
        ``col2im.x_shape`` (the adjoint of ``cols``, summed mod p on the device). The pairs are joined along the inner dimension
        (``[u_1 .. u_r] @ [v_1; ..; v_r]``), an array passed several times is moved to the device once.
        With 16-bit limbs ``u = u1 2^16 + u0``, ``v = v1 2^16 + v0``, Karatsuba needs three float64
        products, ``u1 v1``, ``u0 v0`` and ``(u1 + u0)(v1 + v0)`` (17-bit sums: every partial sum stays
        below 2^53 while the inner dimension is < 2^19, :data:`MAX_INNER_KARATSUBA`); ``2^32 = 2 (mod p)``.
        Wider products take the four limb products (inner dimension < 2^21, :data:`MAX_INNER_FULL`)."""
        if not pairs:
            raise ValueError("field_matmul_sum needs at least one pair")
        shapes = [(_shape(u), _shape(v)) for u, v in pairs]
        n, m = shapes[0][0][0], shapes[0][1][1]
        for (su, sv) in shapes:
            if su[0] != n or sv[1] != m or su[1] != sv[0]:
                raise ValueError(f"field products do not chain: {[(su, sv) for su, sv in shapes]}")
        k = sum(su[1] for su, _ in shapes)
        if col2im is not None and (n, m) != _cols_shape(col2im):
            raise ValueError(f"a result of shape {(n, m)} is not cols() of a tensor of shape {col2im.x_shape}")
        if k >= MAX_INNER_FULL:
            raise FieldRangeError(f"inner dimension {k} too large for exact field products (< {MAX_INNER_FULL})")
        if dtype not in (np.int64, np.uint32):
            raise ValueError("field_matmul_sum returns int64 or uint32 arrays")
        cache: dict[int, Any] = {}

        def dev(x: FieldArg) -> Any:
            if isinstance(x, tuple):
                t = dev(x[0])
                for y in x[1:]:
                    t = t + dev(y)
                return t % P
            key = id(x)
            if key not in cache:
                cache[key] = self.cols(dev(x.x), x.spec) if isinstance(x, Im2col) else self.field_in(x)
            return cache[key]

        u = self.cat([dev(a) for a, _ in pairs], 1)
        v = self.cat([dev(b) for _, b in pairs], 0)
        f, i, mm = self.f64, self.i64, self.mm
        u1, u0, v1, v0 = f(u >> 16), f(u & 0xFFFF), f(v >> 16), f(v & 0xFFFF)
        if k < MAX_INNER_KARATSUBA:
            hh = i(mm(u1, v1))
            ll = i(mm(u0, v0))
            mid = i(mm(u1 + u0, v1 + v0)) - hh - ll
        else:
            hh, ll = i(mm(u1, v1)), i(mm(u0, v0))
            mid = i(mm(u1, v0)) % P + i(mm(u0, v1)) % P
        z = (hh % P * 2 + mid % P * (1 << 16) + ll % P) % P
        return self.field_out(z if col2im is None else self.col2im(z, col2im), dtype)

    def field_in(self, a: np.ndarray) -> Any:
        """A host field matrix (uint32 or int64) -> the backend's int64 array."""
        raise NotImplementedError

    def field_out(self, t: Any, dtype: Any) -> np.ndarray:
        """The backend's int64 array of field elements -> a host array of ``dtype`` (int64 or uint32)."""
        raise NotImplementedError

    def cat(self, ts: list[Any], axis: int) -> Any:
        raise NotImplementedError

    def mm(self, a: Any, b: Any) -> Any:  # a @ b, float64
        raise NotImplementedError

    def cols(self, x: Any, spec: ConvGeometry) -> Any:
        """im2col of the backend's int64 NCHW tensor (see :class:`Im2col`)."""
        raise NotImplementedError

    def col2im(self, z: Any, spec: ConvGeometry) -> Any:
        """The adjoint of :meth:`cols` for the backend's int64 field matrix, mod p (int64 NCHW)."""
        raise NotImplementedError


def _cols_shape(spec: ConvGeometry) -> tuple[int, int]:
    n, c, _, _ = spec.x_shape
    oh, ow = spec.out_hw
    return n * oh * ow, c * spec.kernel[0] * spec.kernel[1]


def _shape(x: FieldArg) -> tuple[int, ...]:
    if isinstance(x, Im2col):
        xs = x.x if isinstance(x.x, tuple) else (x.x,)
        for y in xs:
            if not isinstance(y, np.ndarray) or y.dtype not in (np.uint32, np.int64) or y.shape != tuple(x.spec.x_shape):
                raise ValueError(f"an Im2col operand needs uint32 or int64 tensors of shape {tuple(x.spec.x_shape)}")
        return _cols_shape(x.spec)
    if isinstance(x, tuple):
        if not x or any(not isinstance(y, np.ndarray) or y.shape != x[0].shape for y in x):
            raise ValueError("a summed field operand must be a non-empty tuple of arrays of one shape")
        x = x[0]
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError("field operands must be 2-D arrays")
    if x.dtype not in (np.uint32, np.int64):
        raise ValueError(f"field operands must be uint32 or int64 arrays, not {x.dtype}")
    return tuple(x.shape)


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

    def field_in(self, a: np.ndarray) -> np.ndarray:
        return a.astype(np.int64, copy=False)

    def field_out(self, t: np.ndarray, dtype: Any) -> np.ndarray:
        return t.astype(dtype, copy=False)

    def cat(self, ts: list[np.ndarray], axis: int) -> np.ndarray:
        return ts[0] if len(ts) == 1 else np.concatenate(ts, axis=axis)

    def mm(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a @ b

    def cols(self, x: np.ndarray, spec: ConvGeometry) -> np.ndarray:
        from veil.offload.training.conv_field import cols

        return cols(x, spec)  # type: ignore[arg-type]  # any ConvGeometry

    def col2im(self, z: np.ndarray, spec: ConvGeometry) -> np.ndarray:
        from veil.offload.training.conv_field import col2im_field

        return col2im_field(z, spec)  # type: ignore[arg-type]


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
        self.cuda = self.device.type == "cuda"
        self._pinned = True  #: copy results back through page-locked memory (GPU only; off if unavailable)

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

    def field_in(self, a: np.ndarray) -> Any:
        # uint32 field elements (< 2^31) travel as int32 (a view, no host pass) and are widened on the device
        a = np.ascontiguousarray(a)
        src = a.view(np.int32) if a.dtype == np.uint32 else a
        if a.flags.writeable:
            t = self.torch.from_numpy(src)
        else:  # e.g. decoded from the wire; only read here (copied to the device or widened into a new tensor)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = self.torch.from_numpy(src)
        if self.cuda:
            t = t.to(self.device, non_blocking=True)
        return t.to(self.torch.int64)

    def field_out(self, t: Any, dtype: Any) -> np.ndarray:
        # values in [0, p) fit int32: one 4-byte copy back (into pinned memory on a GPU), viewed as uint32
        t32 = t.to(self.torch.int32)
        if self.cuda and self._pinned:
            try:
                host = self.torch.empty(t32.shape, dtype=self.torch.int32, pin_memory=True)
            except RuntimeError:  # no page-locked memory here: plain copies from now on
                self._pinned = False
            else:
                host.copy_(t32, non_blocking=True)
                self.torch.cuda.current_stream(self.device).synchronize()
                t32 = host
        out = t32.cpu().numpy().view(np.uint32)
        return out if dtype == np.uint32 else out.astype(np.int64)

    def cat(self, ts: list[Any], axis: int) -> Any:
        return ts[0] if len(ts) == 1 else self.torch.cat(ts, dim=axis)

    def mm(self, a: Any, b: Any) -> Any:
        return a @ b

    def cols(self, x: Any, spec: ConvGeometry) -> Any:
        n, c, _, _ = spec.x_shape
        (kh, kw), (sh, sw) = spec.kernel, spec.strides
        top, left, bottom, right = spec.pads
        oh, ow = spec.out_hw
        if any(spec.pads):
            x = self.F.pad(x, (left, right, top, bottom))
        win = x.unfold(2, kh, sh).unfold(3, kw, sw)[:, :, :oh, :ow]  # n, c, oh, ow, kh, kw (a view)
        return win.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)

    def col2im(self, z: Any, spec: ConvGeometry) -> Any:
        n, c, h, w = spec.x_shape
        (kh, kw), (sh, sw) = spec.kernel, spec.strides
        top, left, bottom, right = spec.pads
        oh, ow = spec.out_hw
        out = self.torch.zeros((n, c, h + top + bottom, w + left + right), dtype=self.torch.int64, device=z.device)
        d6 = z.reshape(n, oh, ow, c, kh, kw)
        for i in range(kh):
            for j in range(kw):
                out[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += d6[:, :, :, :, i, j].permute(0, 3, 1, 2)
        out %= P  # at most kh kw terms below 2^31 each
        return out[:, :, top:top + h, left:left + w].contiguous()


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
