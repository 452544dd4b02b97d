"""Forward and backward of every layer kind offload training supports, run on veil's graph.

The enclave runs the non-linear layers (ReLU, sigmoid, tanh, max and average pooling, flatten,
reshape, residual add, constant scale/shift, softmax) and the losses in float64. Every product of a
linear or convolution layer goes through a :class:`~veil.offload.training.protocol.MatmulEngine`:
forward ``Y = X W^T``, backward ``dX = dY W`` and ``dW = dY^T X`` (the backward pair in one round).
Convolutions go to the engine as convolutions (:meth:`MatmulEngine.conv_forward`,
:meth:`MatmulEngine.conv_backward`): enclave-only, by im2col and col2im here; offloaded, the enclave masks
the tensors and the accelerators do im2col and col2im in the field (:mod:`veil.offload.training.conv_field`).

Max pooling, and the backward of both poolings, work on the kh*kw strided views of the (padded) input, one
per window offset, without copying the windows: max pooling takes an elementwise maximum over the views and
the index of the first view equal to it (torch's choice on ties); the backwards add each offset's share into
a zero array through the same views, in window order (max pooling with disjoint windows and finite gradients
writes each share once). The results are the same bits as ``argmax`` over :func:`patches` and
:func:`col2im` of the one-hot (or repeated) windows (tested). Average pooling's forward still sums copied
windows (:func:`patches`): a sum over the views would round differently. :func:`col2im` sums in its
input's memory layout, a few samples at a time.

Trainable parameters: ``W`` and ``b`` of every ``linear`` and ``conv2d`` node. The constants of
``add_const``/``mul_const`` (e.g. folded normalisation) stay fixed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from veil.errors import InputError, UnsupportedOpError
from veil.graph import Graph, Node
from veil.offload.training.protocol import MatmulEngine
from veil.plain import kernels as K

__all__ = ["TRAIN_OPS", "TrainGraph", "softmax_cross_entropy", "binary_cross_entropy", "LOSSES",
           "patches", "col2im", "maxpool_forward", "maxpool_backward"]

TRAIN_OPS = frozenset({"linear", "conv2d", "relu", "sigmoid", "tanh", "maxpool", "avgpool", "global_avgpool",
                       "flatten", "reshape", "add", "add_const", "mul_const", "softmax"})


def patches(x: np.ndarray, k: Sequence[int], s: Sequence[int], pads: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """NCHW ``x`` -> (N, C, OH, OW, kh*kw) windows (a copy), padding with ``fill``."""
    n, c, h, w = x.shape
    oh, ow = K.conv_out_hw(h, w, k, s, pads)
    xp = K.pad2d(x, pads, fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, (k[0], k[1]), axis=(2, 3))[:, :, :: s[0], :: s[1]]
    return np.ascontiguousarray(win[:, :, :oh, :ow]).reshape(n, c, oh, ow, k[0] * k[1])


def _offsets(k: Sequence[int], s: Sequence[int], oh: int, ow: int) -> list[tuple[slice, slice]]:
    """Per window offset ``(i, j)`` in window order (``i * kw + j``), the (rows, columns) of the padded input
    that offset covers across the OH x OW windows."""
    return [(slice(i, i + s[0] * (oh - 1) + 1, s[0]), slice(j, j + s[1] * (ow - 1) + 1, s[1]))
            for i in range(k[0]) for j in range(k[1])]


def _scatter_windows(parts: Iterable[np.ndarray], shape: Sequence[int], k: Sequence[int], s: Sequence[int],
                     pads: Sequence[int]) -> np.ndarray:
    """Sum of per-offset parts (each N x C x OH x OW, in window order) into an NCHW array of ``shape``: the
    adjoint of taking the window views. Starts from zeros and adds in window order, as :func:`col2im` does."""
    out = _padded_zeros(shape, pads)
    oh, ow = K.conv_out_hw(shape[2], shape[3], k, s, pads)
    for (rows, cols), part in zip(_offsets(k, s, oh, ow), parts, strict=True):
        out[:, :, rows, cols] += part
    return _unpad(out, shape, pads)


def _padded_zeros(shape: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Zeros of the NCHW ``shape`` padded by ``pads`` (top, left, bottom, right)."""
    n, c, h, w = shape
    t, left, b, r = pads
    return np.zeros((n, c, h + t + b, w + left + r))


def _unpad(out: np.ndarray, shape: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """The NCHW ``shape`` inside a padded ``out`` (a view)."""
    t, left = pads[0], pads[1]
    return out[:, :, t:t + shape[2], left:left + shape[3]]


def _maxpool_by_window_copies(x: np.ndarray, k: Sequence[int], s: Sequence[int],
                        pads: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    win = patches(x, k, s, pads, -np.inf)
    arg = win.argmax(-1)
    return np.take_along_axis(win, arg[..., None], -1)[..., 0], arg


def maxpool_forward(x: np.ndarray, k: Sequence[int], s: Sequence[int],
                    pads: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Max pooling of NCHW ``x`` (padding -inf, ONNX floor mode): ``(y, idx)``, ``idx`` the offset
    ``i * kw + j`` of each window's first maximum (torch's choice on ties; NumPy ``argmax`` over the window).

    Works on the kh*kw strided views of the input (one per window offset) instead of copying the windows:
    the maximum is an elementwise ``np.maximum`` over the column offsets then the row offsets, ``idx`` the
    number of leading views that differ from it. Windows holding a NaN go the window-copy way (``argmax``
    semantics); where the input has a negative zero, a zero maximum takes the sign of the first maximum. Same
    bits as ``argmax`` and ``take_along_axis`` over :func:`patches`."""
    n, c, h, w = x.shape
    oh, ow = K.conv_out_hw(h, w, k, s, pads)
    xp = K.pad2d(x, pads, -np.inf)
    offsets = _offsets(k, s, oh, ow)
    views = [xp[:, :, rows, cols] for rows, cols in offsets]
    across = xp[:, :, :, offsets[0][1]].copy()  # maximum over the window's columns, then over its rows
    for _, cols in offsets[1:k[1]]:
        np.maximum(across, xp[:, :, :, cols], out=across)
    m = across[:, :, offsets[0][0]].copy()
    for rows, _ in offsets[k[1]::k[1]]:
        np.maximum(m, across[:, :, rows], out=m)
    if np.isnan(m).any():
        return _maxpool_by_window_copies(x, k, s, pads)
    idx = np.zeros(m.shape, dtype=np.uint8 if len(views) <= 256 else np.intp)
    if len(views) > 1:
        ahead = views[0] != m  # the first maximum is further on
        idx += ahead
        diff = np.empty_like(ahead)
        for v in views[1:-1]:
            ahead &= np.not_equal(v, m, out=diff)
            idx += ahead
    if bool(np.signbit(x).any()) and bool(((x == 0) & np.signbit(x)).any()):  # ReLU outputs skip the second
        zero = m == 0
        for t, v in enumerate(views):
            sel = zero & (idx == t)
            m[sel] = v[sel]
    return m, idx


def maxpool_backward(g: np.ndarray, idx: np.ndarray, shape: Sequence[int], k: Sequence[int], s: Sequence[int],
                     pads: Sequence[int]) -> np.ndarray:
    """Gradient of :func:`maxpool_forward`: each window's ``g`` to its first maximum ``idx``, summed over
    overlapping windows in window order (the same bits as :func:`col2im` of the one-hot windows)."""
    finite = bool(np.isfinite(g).all())  # g * False is 0 (of either sign, which the sum from +0 drops)
    if finite and s[0] >= k[0] and s[1] >= k[1]:  # disjoint windows: one share at most per input element
        out = _padded_zeros(shape, pads)
        for o, (rows, cols) in enumerate(_offsets(k, s, *g.shape[2:])):
            np.multiply(g, idx == o, out=out[:, :, rows, cols])
        out += 0.0  # -0.0 to 0.0, as the sum from zero makes it
        return _unpad(out, shape, pads)
    parts = ((g * (idx == o) if finite else np.where(idx == o, g, 0.0)) for o in range(k[0] * k[1]))
    return _scatter_windows(parts, shape, k, s, pads)


def col2im(d: np.ndarray, shape: Sequence[int], k: Sequence[int], s: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Adjoint of :func:`patches`: ``d`` (N, C, OH, OW, kh*kw) summed back into a C-contiguous NCHW array of
    ``shape``.

    Every output element is summed from zero in window order (``i * kw + j``), whatever the path, so the
    bits do not depend on it. The sum runs in ``d``'s memory layout (channels last when ``d`` is a view of a
    ``(N OH OW) x (C kh kw)`` product, as a convolution's data gradient is) and a few samples at a time, so
    each chunk of ``d`` is read from cache ``kh * kw`` times."""
    n, c, h, w = shape
    t, left, b, r = pads
    oh, ow = d.shape[2], d.shape[3]
    d6 = d.reshape(n, c, oh, ow, k[0], k[1])
    channels_last = d6.strides[1] < d6.strides[3]
    if channels_last:
        d6 = d6.transpose(0, 2, 3, 1, 4, 5)  # (N, OH, OW, C, kh, kw)
        out = np.zeros((n, h + t + b, w + left + r, c), dtype=d.dtype)
    else:
        out = np.zeros((n, c, h + t + b, w + left + r), dtype=d.dtype)
    step = max(1, _COL2IM_CHUNK_BYTES // max(d6[:1].nbytes, 1))
    offsets = _offsets(k, s, oh, ow)
    for n0 in range(0, n, step):
        o, dd = out[n0:n0 + step], d6[n0:n0 + step]
        for (rows, cols), (i, j) in zip(offsets, np.ndindex(k[0], k[1]), strict=True):
            if channels_last:
                o[:, rows, cols, :] += dd[:, :, :, :, i, j]
            else:
                o[:, :, rows, cols] += dd[:, :, :, :, i, j]
    if channels_last:
        return np.ascontiguousarray(out[:, t:t + h, left:left + w, :].transpose(0, 3, 1, 2))
    return np.ascontiguousarray(out[:, :, t:t + h, left:left + w])


_COL2IM_CHUNK_BYTES = 1 << 20  # about an L2 cache


def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    while g.ndim > len(shape):
        g = g.sum(0)
    for ax, dim in enumerate(shape):
        if dim == 1 and g.shape[ax] != 1:
            g = g.sum(ax, keepdims=True)
    return g


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and d loss / d logits."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    n = logits.shape[0]
    lab = labels.astype(np.int64).reshape(-1)
    loss = float(-logp[np.arange(n), lab].mean())
    g = np.exp(logp)
    g[np.arange(n), lab] -= 1.0
    return loss, g / n


def binary_cross_entropy(prob: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy of probabilities (clamped like torch: log >= -100) and its gradient."""
    p = prob.reshape(labels.shape[0], -1)[:, 0]
    y = labels.astype(np.float64).reshape(-1)
    lp, l1p = np.maximum(np.log(np.maximum(p, 1e-300)), -100.0), np.maximum(np.log(np.maximum(1 - p, 1e-300)), -100.0)
    loss = float(-(y * lp + (1 - y) * l1p).mean())
    eps = 1e-12
    g = (-(y / np.maximum(p, eps)) + (1 - y) / np.maximum(1 - p, eps)) / len(y)
    return loss, g.reshape(prob.shape)


LOSSES = {"cross_entropy": softmax_cross_entropy, "bce": binary_cross_entropy}


class TrainGraph:
    """A veil graph with float64 trainable parameters; ``forward`` and ``backward`` over an engine."""

    def __init__(self, graph: Graph):
        graph.require_ops(TRAIN_OPS, where="offload training")
        if len(graph.outputs) != 1:
            raise UnsupportedOpError(graph.outputs[0] if graph.outputs else "?", f"{len(graph.outputs)} outputs",
                                     ["one output"], where="offload training")
        for nd in graph.nodes:
            if nd.op == "conv2d" and int(nd.attrs.get("group", 1)) != 1:
                raise UnsupportedOpError(nd.name, "grouped conv2d", ["conv2d with group 1"], where="offload training")
        self.graph = graph
        self.input_names = frozenset(s.name for s in graph.inputs)
        self.params: dict[str, np.ndarray] = {}
        for nd in graph.nodes:
            if nd.op in ("linear", "conv2d"):
                for key in ("W", "b"):
                    if key in nd.params:
                        self.params[f"{nd.name}/{key}"] = np.asarray(nd.params[key], dtype=np.float64).copy()

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, feeds: dict[str, np.ndarray], engine: MatmulEngine) -> tuple[np.ndarray, dict[str, Any]]:
        env: dict[str, np.ndarray] = {}
        for spec in self.graph.inputs:
            if spec.name not in feeds:
                raise InputError(f"training data lacks the model input {spec.name!r}")
            env[spec.name] = np.asarray(feeds[spec.name], dtype=np.float64)
        cache: dict[str, Any] = {"env": env}
        for nd in self.graph.nodes:
            env[nd.output] = self._fwd(nd, [env[t] for t in nd.inputs], engine, cache)
        return env[self.graph.outputs[0]], cache

    def _fwd(self, nd: Node, xs: list[np.ndarray], engine: MatmulEngine, cache: dict[str, Any]) -> np.ndarray:
        x, op, at = xs[0], nd.op, nd.attrs
        if op == "linear":
            w = self.params[f"{nd.name}/W"]
            x2 = x.reshape(-1, x.shape[-1])
            y = engine.matmul(x2, w.T).reshape(*x.shape[:-1], w.shape[0])
            b = self.params.get(f"{nd.name}/b")
            return y + b if b is not None else y
        if op == "conv2d":
            w = self.params[f"{nd.name}/W"]
            y, cache[nd.name] = engine.conv_forward(x, w, tuple(at["strides"]), tuple(at["pads"]))
            b = self.params.get(f"{nd.name}/b")
            return np.ascontiguousarray(y + b.reshape(1, -1, 1, 1) if b is not None else y)
        if op == "relu":
            return np.maximum(x, 0.0)
        if op == "sigmoid":
            return K.sigmoid(x)
        if op == "tanh":
            return np.tanh(x)
        if op == "maxpool":
            y, cache[nd.name] = maxpool_forward(x, at["kernel"], at["strides"], at["pads"])
            return y
        if op == "avgpool":
            win = patches(x, at["kernel"], at["strides"], at["pads"])
            if at.get("count_include_pad", False):
                cnt = np.full(win.shape[:4], float(win.shape[-1]))
            else:
                cnt = patches(np.ones_like(x[:1, :1]), at["kernel"], at["strides"], at["pads"]).sum(-1)
            cache[nd.name] = cnt
            return win.sum(-1) / cnt
        if op == "global_avgpool":
            return x.mean(axis=(2, 3), keepdims=True)
        if op == "flatten":
            return K.flatten(x, int(at["axis"]))
        if op == "reshape":
            return K.onnx_reshape(x, at["shape"])
        if op == "add":
            return x + xs[1]
        if op == "add_const":
            return x + nd.params["c"]
        if op == "mul_const":
            return x * nd.params["c"]
        if op == "softmax":
            return K.softmax(x, int(at["axis"]))
        raise UnsupportedOpError(nd.name, op, TRAIN_OPS, where="offload training")

    # --- backward ---------------------------------------------------------------------------------
    def backward(self, dout: np.ndarray, cache: dict[str, Any], engine: MatmulEngine) -> dict[str, np.ndarray]:
        """Gradients of every parameter, given d loss / d output."""
        env = cache["env"]
        grads: dict[str, np.ndarray] = {}
        dt: dict[str, np.ndarray] = {self.graph.outputs[0]: dout}
        for nd in reversed(self.graph.nodes):
            g = dt.pop(nd.output, None)
            if g is None:
                continue
            xs = [env[t] for t in nd.inputs]
            for name, gi in zip(nd.inputs, self._bwd(nd, xs, env[nd.output], g, engine, cache, grads), strict=True):
                if gi is not None and name not in self.input_names:
                    dt[name] = dt[name] + gi if name in dt else gi
        return grads

    def _bwd(self, nd: Node, xs: list[np.ndarray], y: np.ndarray, g: np.ndarray, engine: MatmulEngine,
             cache: dict[str, Any], grads: dict[str, np.ndarray]) -> list[np.ndarray | None]:
        x, op, at = xs[0], nd.op, nd.attrs
        if op == "linear":
            w = self.params[f"{nd.name}/W"]
            g2, x2 = g.reshape(-1, w.shape[0]), x.reshape(-1, x.shape[-1])
            if nd.inputs[0] in self.input_names:  # no gradient needed for the data itself
                (dw,) = engine.matmuls([(g2.T, x2)])
                dx = None
            else:
                dx, dw = engine.matmuls([(g2, w), (g2.T, x2)])
            grads[f"{nd.name}/W"] = dw
            if f"{nd.name}/b" in self.params:
                grads[f"{nd.name}/b"] = g2.sum(0)
            return [None if dx is None else dx.reshape(x.shape)]
        if op == "conv2d":
            w = self.params[f"{nd.name}/W"]
            need_dx = nd.inputs[0] not in self.input_names  # no gradient needed for the data itself
            dx, dw = engine.conv_backward(x, w, g, tuple(at["strides"]), tuple(at["pads"]), cache[nd.name], need_dx)
            grads[f"{nd.name}/W"] = dw
            if f"{nd.name}/b" in self.params:
                grads[f"{nd.name}/b"] = g.transpose(0, 2, 3, 1).reshape(-1, w.shape[0]).sum(0)
            return [dx]
        if op == "relu":
            return [g * (x > 0)]
        if op == "sigmoid":
            return [g * y * (1.0 - y)]
        if op == "tanh":
            return [g * (1.0 - y * y)]
        if op == "maxpool":
            return [maxpool_backward(g, cache[nd.name], x.shape, at["kernel"], at["strides"], at["pads"])]
        if op == "avgpool":
            k = tuple(at["kernel"])
            share = g / cache[nd.name]  # the same share to every offset of the window
            return [_scatter_windows([share] * (k[0] * k[1]), x.shape, k, at["strides"], at["pads"])]
        if op == "global_avgpool":
            return [np.broadcast_to(g / (x.shape[2] * x.shape[3]), x.shape).copy()]
        if op in ("flatten", "reshape"):
            return [g.reshape(x.shape)]
        if op == "add":
            return [_unbroadcast(g, x.shape), _unbroadcast(g, xs[1].shape)]
        if op == "add_const":
            return [_unbroadcast(g, x.shape)]
        if op == "mul_const":
            return [_unbroadcast(g * nd.params["c"], x.shape)]
        if op == "softmax":
            ax = int(at["axis"])
            return [y * (g - (g * y).sum(ax, keepdims=True))]
        raise UnsupportedOpError(nd.name, op, TRAIN_OPS, where="offload training")
