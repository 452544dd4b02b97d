"""Exact products of two field matrices on every backend (offload training's accelerator work):
against Python big-integer references, at and beyond the Karatsuba limit, uint32 and int64 operands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veil.offload.backend import MAX_INNER_KARATSUBA, NumpyBackend, TorchBackend
from veil.offload.errors import FieldRangeError
from veil.offload.field import MAX_INNER_FULL, P

BACKENDS = [NumpyBackend(), TorchBackend("cpu")] + ([TorchBackend("cuda")] if torch.cuda.is_available() else [])


def exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a @ b) mod p with Python integers: the reference."""
    return ((a.astype(object) @ b.astype(object)) % P).astype(np.int64)


def field(rng: np.random.Generator, shape: tuple[int, int], dtype=np.int64) -> np.ndarray:
    a = rng.integers(0, P, shape, dtype=np.int64)
    a.flat[: min(a.size, 3)] = [P - 1, 0, 1][: min(a.size, 3)]  # the extremes of the field
    return a.astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [np.int64, np.uint32], ids=["int64", "uint32"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (40, 300, 9)])
def test_field_matmul_matches_big_integers(backend, dtype, shape) -> None:
    rng = np.random.default_rng(sum(shape))
    n, k, m = shape
    u, v = field(rng, (n, k), dtype), field(rng, (k, m), dtype)
    u0, v0 = u.copy(), v.copy()
    want = exact(u, v)
    for out_dtype in (np.int64, np.uint32):
        got = backend.field_matmul(u, v, dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == (n, m)
        assert np.array_equal(got.astype(np.int64), want)
    assert np.array_equal(u, u0) and np.array_equal(v, v0)  # inputs untouched


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_field_matmul_sum_with_summed_operands(backend) -> None:
    """What a share holder computes: E (F + B0) + A0 F, without forming F + B0 or the concatenation on the host."""
    rng = np.random.default_rng(3)
    e, a0 = field(rng, (11, 17), np.uint32), field(rng, (11, 17), np.uint32)
    f, b0 = field(rng, (17, 6), np.uint32), field(rng, (17, 6), np.uint32)
    want = (exact(e, (f.astype(np.int64) + b0) % P) + exact(a0, f)) % P
    got = backend.field_matmul_sum([(e, (f, b0)), (a0, f)], dtype=np.uint32)
    assert np.array_equal(got.astype(np.int64), want)
    # the same with the operands joined on the host (how the accelerator did it before)
    joined = backend.field_matmul(np.concatenate([e, a0], 1), np.concatenate([(f.astype(np.int64) + b0) % P, f], 0))
    assert np.array_equal(joined, want)
    # the triple helper's form: (A0 + A1)(B0 + B1)
    a1, b1 = field(rng, (11, 17), np.uint32), field(rng, (17, 6), np.uint32)
    c = backend.field_matmul((a0, a1), (b0, b1))
    assert np.array_equal(c, exact((a0.astype(np.int64) + a1) % P, (b0.astype(np.int64) + b1) % P))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("k", [MAX_INNER_KARATSUBA - 1, MAX_INNER_KARATSUBA, MAX_INNER_FULL - 1],
                         ids=["karatsuba-limit", "four-limbs", "full-limit"])
def test_worst_case_values_at_the_exactness_limits(backend, k) -> None:
    """All entries p - 1 (largest limbs and limb sums): (p - 1)^2 = 1 (mod p), so row i of u @ v is k mod p
    where every factor is p - 1; a few random columns check the rest against big integers."""
    rng = np.random.default_rng(k)
    u = np.full((2, k), P - 1, np.uint32)
    u[1] = rng.integers(0, P, k, dtype=np.int64)
    v = np.full((k, 2), P - 1, np.uint32)
    v[:, 1] = rng.integers(0, P, k, dtype=np.int64)
    got = backend.field_matmul(u, v)
    assert got[0, 0] == k % P
    # int64 reference: each product (< 2^62) reduced before summing (k terms < 2^31 stay below 2^63)
    ref = [[int(((u[i].astype(np.int64) * v[:, j].astype(np.int64)) % P).sum() % P) for j in range(2)] for i in range(2)]
    assert got.tolist() == ref


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_backends_agree_bit_for_bit_on_training_shapes(backend) -> None:
    """A conv-like product (many rows, small inner dimension) and a dense one, compared with NumPy's."""
    rng = np.random.default_rng(5)
    for n, k, m in [(3000, 25, 16), (64, 1000, 120)]:
        u, v = field(rng, (n, k), np.uint32), field(rng, (k, m), np.uint32)
        assert np.array_equal(backend.field_matmul(u, v), NumpyBackend().field_matmul(u.astype(np.int64), v))


@pytest.mark.parametrize("backend", BACKENDS[:2], ids=lambda b: b.name)
def test_bad_operands_are_refused(backend) -> None:
    u = np.zeros((3, 4), np.uint32)
    with pytest.raises(ValueError, match="do not chain"):
        backend.field_matmul(u, np.zeros((5, 2), np.uint32))
    with pytest.raises(ValueError, match="uint32 or int64"):
        backend.field_matmul(u, np.zeros((4, 2), np.float64))
    with pytest.raises(ValueError, match="2-D"):
        backend.field_matmul(u, np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match="one shape"):
        backend.field_matmul(u, (np.zeros((4, 2), np.uint32), np.zeros((4, 3), np.uint32)))
    with pytest.raises(FieldRangeError, match="too large"):
        backend.field_matmul_sum([(np.zeros((1, MAX_INNER_FULL // 2), np.uint32), np.zeros((MAX_INNER_FULL // 2, 1), np.uint32))] * 2)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_read_only_operands_from_the_wire(backend, recwarn) -> None:
    """Arrays decoded from a channel are read-only views of the message: accepted, untouched, no warning."""
    from veil.net.wire import decode, encode

    rng = np.random.default_rng(9)
    u, v = field(rng, (6, 8), np.uint32), field(rng, (8, 4), np.int64)
    ru, rv = decode(encode([u, v]))
    assert not ru.flags.writeable and not rv.flags.writeable
    got = backend.field_matmul_sum([(ru, (rv, rv)), (ru, rv)], dtype=np.uint32)
    assert np.array_equal(got.astype(np.int64), (exact(u, (2 * v) % P) + exact(u, v)) % P)
    assert np.array_equal(ru, u) and np.array_equal(rv, v)
    assert not [w for w in recwarn if "writable" in str(w.message)]


CONV_SPECS = [((2, 3, 7, 6), (3, 2), (2, 1), (1, 0, 2, 1)), ((3, 1, 12, 12), (5, 5), (1, 1), (0, 0, 0, 0)),
              ((2, 4, 6, 6), (3, 3), (2, 2), (1, 1, 1, 1))]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("geom", CONV_SPECS, ids=["asym-pads-stride21", "5x5", "3x3-stride2"])
def test_im2col_operands_and_col2im_results_match_the_host_transforms(backend, geom) -> None:
    """cols() built on the device from the tensor, and col2im of the result folded there, bit for bit as
    conv_field.cols / col2im_field on the host followed by the plain product: forward, dW and dX shapes."""
    from veil.offload.backend import Im2col
    from veil.offload.training.conv_field import ConvSpec, col2im_field, cols

    x_shape, kernel, strides, pads = geom
    rng = np.random.default_rng(len(x_shape) + kernel[0])
    x, x2 = field(rng, x_shape, np.uint32), field(rng, x_shape, np.uint32)
    o = 5
    fwd = ConvSpec("fwd", x_shape, kernel, strides, pads)
    rows, k = fwd.rows, fwd.k
    w = field(rng, (k, o), np.uint32)
    # forward: cols(X) W, X given as a tuple (sum mod p)
    xs = (x.astype(np.int64) + x2) % P
    want = exact(cols(xs, fwd), w)
    assert np.array_equal(backend.field_matmul(Im2col((x, x2), fwd), w), want)
    # weight gradient: dY^T cols(X), with an extra plain pair joined along the inner dimension
    dw = ConvSpec("dw", x_shape, kernel, strides, pads)
    g, h = field(rng, (o, rows), np.uint32), field(rng, (o, 3), np.uint32)
    hv = field(rng, (3, k), np.uint32)
    got = backend.field_matmul_sum([(g, Im2col(x, dw)), (h, hv)], dtype=np.uint32)
    assert np.array_equal(got.astype(np.int64), (exact(g, cols(x, dw)) + exact(h, hv)) % P)
    # data gradient: col2im(dY W) folded on the device
    dx = ConvSpec("dx", x_shape, kernel, strides, pads)
    gy, wm = field(rng, (rows, o), np.uint32), field(rng, (o, k), np.uint32)
    got = backend.field_matmul(gy, wm, dtype=np.uint32, col2im=dx)
    assert got.shape == x_shape and got.dtype == np.uint32
    assert np.array_equal(got.astype(np.int64), col2im_field(exact(gy, wm), dx))


@pytest.mark.parametrize("backend", BACKENDS[:2], ids=lambda b: b.name)
def test_bad_convolution_operands_are_refused(backend) -> None:
    from veil.offload.backend import Im2col
    from veil.offload.training.conv_field import ConvSpec

    spec = ConvSpec("fwd", (2, 3, 7, 6), (3, 2), (2, 1), (1, 0, 2, 1))
    with pytest.raises(ValueError, match="tensors of shape"):
        backend.field_matmul(Im2col(np.zeros((2, 3, 7, 5), np.uint32), spec), np.zeros((spec.k, 2), np.uint32))
    with pytest.raises(ValueError, match="not cols"):
        backend.field_matmul(np.zeros((4, 3), np.uint32), np.zeros((3, 2), np.uint32), col2im=spec)
