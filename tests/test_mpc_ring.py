"""mpc building blocks without parties: fixed point, ring matmul/conv, PRG, sharing, bit slicing."""

import numpy as np
import pytest

from veil.errors import InputRangeError, ProtocolError
from veil.mpc import ring
from veil.mpc import sharing as S
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.prg import Prg, new_seed
from veil.plain.kernels import conv2d as plain_conv2d

RNG = np.random.default_rng(7)


def rand_ring(*shape):
    return RNG.integers(0, 2**64, shape, dtype=np.uint64)


def test_fixed_point_roundtrip_and_bounds():
    fp = FixedPoint(16)
    x = RNG.normal(0, 1000, 1000)
    assert np.abs(fp.decode(fp.encode(x)) - x).max() <= 2**-17  # half an ulp
    assert fp.max_abs() == 2.0**30 and fp.max_abs(16) == 2.0**46
    neg = fp.encode(np.array([-1.5]))
    assert neg.dtype == np.uint64 and fp.decode(neg)[0] == -1.5
    with pytest.raises(InputRangeError, match="fixed point"):
        fp.encode(np.array([2.0**47]))
    with pytest.raises(InputRangeError, match="NaN"):
        fp.encode(np.array([np.nan]))
    with pytest.raises(ValueError):
        FixedPoint(40)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 4), (17, 300, 9), (5, 2 * ring.CHUNK + 3, 3)])
def test_ring_matmul_exact(m, k, n):
    a, b = rand_ring(m, k), rand_ring(k, n)
    assert (ring.matmul(a, b) == a @ b).all()  # numpy's uint64 matmul wraps mod 2^64
    assert (ring.matmul(a, ring.Limbs(b)) == a @ b).all()


def test_ring_matmul_extreme_values():
    for v in (0, 1, 2**63, 2**64 - 1, 2**21, 2**43 - 1):
        a = np.full((4, 2048), v, np.uint64)
        b = np.full((2048, 3), 2**64 - 1 - v, np.uint64)
        assert (ring.matmul(a, b) == a @ b).all()


def test_ring_conv2d_matches_integer_conv():
    x, w = rand_ring(2, 3, 9, 8), rand_ring(4, 3, 3, 2)
    for strides, pads in (((1, 1), (0, 0, 0, 0)), ((2, 1), (1, 0, 1, 2))):
        assert (ring.conv2d(x, w, strides, pads) == plain_conv2d(x, w, None, strides, pads)).all()


def test_prg_is_deterministic_labelled_and_never_reuses():
    seed = new_seed()
    a, b = Prg(seed), Prg(seed)
    assert (a.words("x", 5) == b.words("x", 5)).all()
    assert not (a.words("y", 5) == b.words("z", 5)).all()
    with pytest.raises(ProtocolError, match="drawn twice"):
        a.words("x", 5)
    assert "x" in a.labels and "seed" not in repr(a).lower().replace("<seed>", "")
    w = Prg(new_seed()).words("u", 200_000)
    assert abs(float((w >> np.uint64(63)).mean()) - 0.5) < 0.01  # top bit balanced


def test_sharing_roundtrip_and_share_is_uniform_looking():
    x = rand_ring(1000)
    r = rand_ring(1000)
    x0, x1 = S.share(x, r)
    assert (S.reconstruct(x0, x1) == x).all()
    zeros = np.zeros(100_000, np.uint64)
    s0, s1 = S.share(zeros, rand_ring(100_000))
    assert abs(float((s1 >> np.uint64(63)).mean()) - 0.5) < 0.01  # a share of zeros looks uniform
    bits = RNG.integers(0, 256, 50, dtype=np.uint8)
    b0, b1 = S.share_bits(bits, RNG.integers(0, 256, 50, dtype=np.uint8))
    assert (S.reconstruct_bits(b0, b1) == bits).all()


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000])
def test_bitslice_matches_bit_by_bit(n):
    x = rand_ring(n)
    rows = S.bitslice(x)
    assert rows.shape == (64, (n + 7) // 8)
    for j in (0, 1, 31, 62, 63):
        want = ((x >> np.uint64(j)) & np.uint64(1)).astype(np.uint64)
        assert (S.unslice_row(rows[j], n) == want).all()
    assert (S.unpack_bits(S.pack_bits(np.arange(n) % 2), n) == np.arange(n) % 2).all()


@pytest.mark.parametrize("backend", ["int64", "limbs"])
def test_ring_products_agree_on_both_backends(backend, monkeypatch):
    """The int64 GEMM (torch) and the float64 limbs give the same exact products mod 2^64."""
    if backend == "int64" and ring.int64_backend() is None:
        pytest.skip("torch is not installed: the int64 product needs it")
    if backend == "limbs":
        monkeypatch.setattr(ring, "_BACKEND", [None])
    else:
        monkeypatch.setattr(ring, "TORCH_MIN_MACS", 0)  # every product of this test on the int64 GEMM
    a, b = rand_ring(5, 2 * ring.CHUNK + 3), rand_ring(2 * ring.CHUNK + 3, 4)
    assert (ring.matmul(a, b) == a @ b).all()
    assert (ring.matmul(a, ring.Limbs(b)) == a @ b).all()
    x, y = rand_ring(2, 3, 4, 7), rand_ring(1, 3, 7, 5)
    assert (ring.bmatmul(x, y) == np.matmul(x, y)).all()
    ro = rand_ring(3, 6)
    ro.setflags(write=False)  # arrays decoded from the wire are read-only
    assert (ring.matmul(ro, rand_ring(6, 2)[:, :1]).shape == (3, 1))
