"""Offload training, enclave side: max pooling on window views and ``col2im``. Ties go where torch sends
them (the first maximum in window order), the results are the same bits as the window-copy definition
(``argmax`` over the copied windows, one-hot windows summed back), and ``col2im`` gives the same bits in
either memory layout and chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offload_train_helpers import torch_mirror
from veil.graph import Graph, Node, TensorSpec
from veil.offload.training import PlainMatmul, TrainGraph
from veil.offload.training import layers as L
from veil.offload.training.layers import (
    col2im,
    maxpool_backward,
    maxpool_forward,
    patches,
    softmax_cross_entropy,
)

# (kernel, strides, pads (top, left, bottom, right), H, W): non-overlapping grid, grid with rows and columns
# cropped (floor mode), overlapping with padding, asymmetric padding
CASES = [((2, 2), (2, 2), (0, 0, 0, 0), 8, 8), ((2, 3), (2, 3), (0, 0, 0, 0), 9, 8),
         ((3, 3), (2, 2), (1, 1, 1, 1), 7, 7), ((2, 2), (1, 2), (0, 1, 1, 0), 5, 6)]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


def _reference_forward(x, k, s, pads):
    win = patches(x, k, s, pads, -np.inf)
    arg = win.argmax(-1)
    return np.take_along_axis(win, arg[..., None], -1)[..., 0], arg


def _reference_col2im(d, shape, k, s, pads):
    """(N, C, OH, OW, kh*kw) windows summed back element by element, from zero, in window order."""
    n, c, h, w = shape
    t, left, b, r = pads
    out = np.zeros((n, c, h + t + b, w + left + r))
    oh, ow = d.shape[2:4]
    for i in range(k[0]):
        for j in range(k[1]):
            for a in range(oh):
                for e in range(ow):
                    out[:, :, a * s[0] + i, e * s[1] + j] += d[:, :, a, e, i * k[1] + j]
    return out[:, :, t:t + h, left:left + w]


def _reference_backward(g, arg, shape, k, s, pads):
    """One-hot windows (``g`` at offset ``arg``) summed back by :func:`_reference_col2im`."""
    d = np.zeros((*g.shape, k[0] * k[1]))
    for o in range(k[0] * k[1]):
        hit = arg == o
        d[..., o][hit] = g[hit]
    return _reference_col2im(d, shape, k, s, pads)


def _tie_graph(k, s, pads, h, w) -> Graph:
    """x (2 channels) -> conv 1x1 with weights (1, 1) (so windows of integer x tie between positions whose
    channels differ, and dW depends on which tied position gets the gradient) -> max pool -> linear."""
    oh, ow = (h + pads[0] + pads[2] - k[0]) // s[0] + 1, (w + pads[1] + pads[3] - k[1]) // s[1] + 1
    rng = np.random.default_rng(7)
    nodes = [
        Node("c1", "conv2d", ("x",), "h", {"W": np.ones((1, 2, 1, 1), np.float32), "b": np.zeros(1, np.float32)},
             {"strides": (1, 1), "pads": (0, 0, 0, 0)}),
        Node("pool", "maxpool", ("h",), "p", {}, {"kernel": k, "strides": s, "pads": pads}),
        Node("fl", "flatten", ("p",), "f", {}, {"axis": 1}),
        Node("fc", "linear", ("f",), "logits", {"W": rng.normal(0, 0.5, (3, oh * ow)).astype(np.float32),
                                                "b": np.zeros(3, np.float32)}),
    ]
    return Graph(nodes, [TensorSpec("x", (None, 2, h, w))], ["logits"], name="tie_pool")


@pytest.mark.parametrize("k,s,pads,h,w", CASES)
def test_max_pool_ties_send_the_gradient_where_torch_autograd_does(k, s, pads, h, w):
    rng = np.random.default_rng(11)
    x = rng.integers(0, 3, (6, 2, h, w)).astype(np.float64)  # conv output x0 + x1: many ties, different parts
    labels = rng.integers(0, 3, 6)
    graph = _tie_graph(k, s, pads, h, w)
    net = TrainGraph(graph)
    eng = PlainMatmul()
    out, cache = net.forward({"x": x}, eng)
    _, dout = softmax_cross_entropy(out, labels)
    grads = net.backward(dout, cache, eng)

    tp = {name: torch.tensor(v, dtype=torch.float64, requires_grad=True) for name, v in net.params.items()}
    tout = torch_mirror(graph, tp, {"x": x})
    torch.nn.functional.cross_entropy(tout, torch.as_tensor(labels)).backward()
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    for name in tp:
        np.testing.assert_allclose(grads[name], tp[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("k,s,pads,h,w", CASES)
def test_max_pool_equals_torch_indices_and_the_window_copy_bit_for_bit(k, s, pads, h, w):
    rng = np.random.default_rng(12)
    x = rng.integers(-2, 3, (3, 4, h, w)).astype(np.float64)
    x[rng.random(x.shape) < 0.3] = -0.0  # ties between 0.0 and -0.0: the value keeps the first one's sign
    y, idx = maxpool_forward(x, k, s, pads)
    y_ref, arg_ref = _reference_forward(x, k, s, pads)
    assert np.array_equal(_bits(y), _bits(y_ref)) and np.array_equal(idx, arg_ref)

    t, left, b, r = pads
    xp = F.pad(torch.as_tensor(x), (left, r, t, b), value=-float("inf"))
    ty, tix = F.max_pool2d(xp, k, s, return_indices=True)
    oh, ow = idx.shape[2:]
    rows = np.arange(oh)[:, None] * s[0] + idx // k[1]
    cols = np.arange(ow)[None, :] * s[1] + idx % k[1]
    np.testing.assert_array_equal(rows * xp.shape[3] + cols, tix.numpy())  # torch: first maximum too
    np.testing.assert_array_equal(y, ty.numpy())

    g = rng.normal(size=y.shape)
    g[rng.random(g.shape) < 0.2] = -0.0
    g_inf = g.copy()
    g_inf[0, 0, 0, 0] = np.inf  # non-finite gradients keep exact zeros elsewhere
    for gg in (g, g_inf):
        dx = maxpool_backward(gg, idx, x.shape, k, s, pads)
        assert np.array_equal(_bits(dx), _bits(_reference_backward(gg, arg_ref, x.shape, k, s, pads)))


def test_max_pool_propagates_nan_like_argmax_over_the_window():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(2, 3, 6, 6))
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 4, 4] = x[1, 2, 5, 5] = np.nan
    y, idx = maxpool_forward(x, (2, 2), (2, 2), (0, 0, 0, 0))
    y_ref, arg_ref = _reference_forward(x, (2, 2), (2, 2), (0, 0, 0, 0))
    assert np.array_equal(_bits(y), _bits(y_ref)) and np.array_equal(idx, arg_ref)
    assert np.isnan(y).sum() == 2 and np.isnan(y[0, 1, 1, 1]) and np.isnan(y[1, 2, 2, 2])
    assert idx[0, 1, 1, 1] == 1 and idx[1, 2, 2, 2] == 0  # the (first) NaN's offset in its window


@pytest.mark.parametrize("k,s,pads,h,w", CASES + [((5, 5), (1, 1), (0, 0, 0, 0), 12, 12)])
def test_col2im_same_bits_in_either_layout_and_chunking(k, s, pads, h, w, monkeypatch):
    rng = np.random.default_rng(14)
    n, c = 5, 3
    shape = (n, c, h, w)
    oh, ow = (h + pads[0] + pads[2] - k[0]) // s[0] + 1, (w + pads[1] + pads[3] - k[1]) // s[1] + 1
    dcols = rng.normal(size=(n * oh * ow, c * k[0] * k[1]))  # a convolution's dY W: rows (n, oh, ow)
    d_last = dcols.reshape(n, oh, ow, c, k[0] * k[1]).transpose(0, 3, 1, 2, 4)  # channels-last view
    d_first = np.ascontiguousarray(d_last)
    ref = _reference_col2im(d_first, shape, k, s, pads)
    results = [col2im(d, shape, k, s, pads) for d in (d_last, d_first)]
    monkeypatch.setattr(L, "_COL2IM_CHUNK_BYTES", 1)  # one sample at a time
    results += [col2im(d, shape, k, s, pads) for d in (d_last, d_first)]
    for got in results:
        assert got.flags.c_contiguous and np.array_equal(_bits(got), _bits(ref))
    x = rng.normal(size=shape)  # adjoint of the window copy
    np.testing.assert_allclose(np.vdot(patches(x, k, s, pads), d_first), np.vdot(x, results[0]), rtol=1e-12)


@pytest.mark.parametrize("k,s,pads,h,w", CASES)
def test_average_pool_backward_equals_col2im_of_the_repeated_windows_bit_for_bit(k, s, pads, h, w):
    """Average pooling's backward (each window's share added through the window views) against the window-copy
    definition: the share repeated over the window, summed back by the element-by-element reference."""
    rng = np.random.default_rng(15)
    shape = (3, 2, h, w)
    oh, ow = (h + pads[0] + pads[2] - k[0]) // s[0] + 1, (w + pads[1] + pads[3] - k[1]) // s[1] + 1
    share = rng.normal(size=(3, 2, oh, ow))
    share[rng.random(share.shape) < 0.2] = -0.0
    ref = _reference_col2im(np.repeat(share[..., None], k[0] * k[1], axis=-1), shape, k, s, pads)
    got = L._scatter_windows([share] * (k[0] * k[1]), shape, k, s, pads)
    assert np.array_equal(_bits(got), _bits(ref))
