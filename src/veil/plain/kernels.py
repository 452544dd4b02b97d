"""NumPy building blocks shared by the executors: padding, im2col, pooling windows, ONNX reshape.

They are dtype-generic (float or integer ring elements): the mpc and offload modes reuse im2col
with their own matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "pad2d", "im2col", "conv_out_hw", "conv2d", "pool_windows", "maxpool", "avgpool", "onnx_reshape",
    "flatten", "softmax", "layernorm", "rmsnorm", "gelu", "gelu_tanh", "silu", "sigmoid", "erf", "onnx_slice",
]


def pad2d(x: np.ndarray, pads: Sequence[int], value: float | int | np.number[Any] = 0) -> np.ndarray:
    """Pad the last two axes of NCHW ``x`` by (top, left, bottom, right)."""
    t, left, b, r = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)), constant_values=value)


def conv_out_hw(h: int, w: int, k: Sequence[int], s: Sequence[int], pads: Sequence[int]) -> tuple[int, int]:
    return (h + pads[0] + pads[2] - k[0]) // s[0] + 1, (w + pads[1] + pads[3] - k[1]) // s[1] + 1


def im2col(x: np.ndarray, k: Sequence[int], s: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Patches of NCHW ``x`` as a matrix of shape (N*OH*OW, C*kh*kw), rows in (n, oh, ow) order."""
    n, c, h, w = x.shape
    oh, ow = conv_out_hw(h, w, k, s, pads)
    xp = pad2d(x, pads)
    win = np.lib.stride_tricks.sliding_window_view(xp, (k[0], k[1]), axis=(2, 3))[:, :, :: s[0], :: s[1]]
    win = win[:, :, :oh, :ow]  # (N, C, OH, OW, kh, kw)
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, c * k[0] * k[1])


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides: Sequence[int], pads: Sequence[int],
           matmul: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.matmul, group: int = 1) -> np.ndarray:
    """NCHW convolution as im2col followed by ``matmul`` (injectable for ring arithmetic).

    ``group > 1``: input channels and filters are split into ``group`` blocks convolved separately
    (``group`` = channels is a depthwise convolution); ``w`` is (O, C/group, kh, kw)."""
    if group > 1:
        ci, co = x.shape[1] // group, w.shape[0] // group
        ys = [conv2d(x[:, g * ci:(g + 1) * ci], w[g * co:(g + 1) * co], None if b is None else b[g * co:(g + 1) * co],
                     strides, pads, matmul) for g in range(group)]
        return np.concatenate(ys, axis=1)
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = conv_out_hw(h, wd, (kh, kw), strides, pads)
    cols = im2col(x, (kh, kw), strides, pads)
    y = matmul(cols, w.reshape(o, -1).T)  # (N*OH*OW, O)
    if b is not None:
        y = y + b
    return np.ascontiguousarray(y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2))


def pool_windows(x: np.ndarray, k: Sequence[int], s: Sequence[int], pads: Sequence[int],
                 pad_value: float | int | np.number[Any]) -> np.ndarray:
    """Pooling windows of NCHW ``x``: shape (N, C, OH, OW, kh*kw)."""
    n, c, h, w = x.shape
    oh, ow = conv_out_hw(h, w, k, s, pads)
    xp = pad2d(x, pads, pad_value)
    win = np.lib.stride_tricks.sliding_window_view(xp, (k[0], k[1]), axis=(2, 3))[:, :, :: s[0], :: s[1]]
    return win[:, :, :oh, :ow].reshape(n, c, oh, ow, k[0] * k[1])


def maxpool(x: np.ndarray, k: Sequence[int], s: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    return pool_windows(x, k, s, pads, -np.inf).max(axis=-1)


def avgpool(x: np.ndarray, k: Sequence[int], s: Sequence[int], pads: Sequence[int], count_include_pad: bool) -> np.ndarray:
    total = pool_windows(x, k, s, pads, 0).sum(axis=-1)
    if count_include_pad or not any(pads):
        return total / (k[0] * k[1])
    counts = pool_windows(np.ones((1, 1) + x.shape[2:], x.dtype), k, s, pads, 0).sum(axis=-1)
    return total / counts


def onnx_reshape(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Reshape with ONNX semantics: 0 copies the input dim, -1 is inferred."""
    target = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(target)


def flatten(x: np.ndarray, axis: int) -> np.ndarray:
    axis = axis % x.ndim if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def softmax(x: np.ndarray, axis: int, mask: np.ndarray | None = None) -> np.ndarray:
    """``softmax(x + mask)`` along ``axis``; ``-inf`` mask entries get probability 0."""
    if mask is not None:
        x = x + mask.astype(x.dtype)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def rmsnorm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * gamma


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


def silu(x: np.ndarray) -> np.ndarray:
    return (x * sigmoid(x)).astype(x.dtype)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = np.sqrt(2.0 / np.pi)
    return (0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x ** 3)))).astype(x.dtype)


def onnx_slice(x: np.ndarray, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int],
               steps: Sequence[int]) -> np.ndarray:
    """ONNX Slice with non-negative ``axes`` (Python slicing clamps out-of-range bounds the same way)."""
    idx: list[slice] = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        idx[a] = slice(int(s), int(e), int(st))
    return x[tuple(idx)]


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised error function (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, below float32 eps)."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(x.dtype)


def gelu(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0).astype(x.dtype)))).astype(x.dtype)
