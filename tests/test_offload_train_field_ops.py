"""The offload-training enclave's fast field kernels (veil.offload.training.field_ops) equal the plain int64 /
float64 formulas bit for bit: random operands, edge values (0, p - 1, +-(p - 1)/2, -p, masks 0 and p - 1,
values outside the fast range), sizes across block boundaries, C and non-C layouts."""

from __future__ import annotations

import numpy as np
import pytest

from veil.offload import field as field_mod
from veil.offload.errors import FieldRangeError
from veil.offload.field import HALF, P, uniform_field
from veil.offload.training import field_ops as F
from veil.offload.training import protocol
from veil.offload.training.conv_field import ConvSpec, conv_norms
from veil.offload.training.protocol import field_matvec

SIZES = [0, 1, 7, F.CHUNK - 1, F.CHUNK, 2 * F.CHUNK + 5]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def ref_masked(q: np.ndarray, m0: np.ndarray, m1: np.ndarray) -> np.ndarray:
    return ((q.astype(np.int64) - m0.astype(np.int64) - m1.astype(np.int64)) % P).astype(np.uint32)


def ref_lift(zs: list[np.ndarray]) -> np.ndarray:
    s = sum(z.astype(np.int64) for z in zs) % P
    return np.where(s > HALF, s - P, s).astype(np.float64)


EDGE_Q = np.array([0, 1, -1, HALF, -HALF, HALF + 1, -HALF - 1, P - 1, -(P - 1), -P, P - 2], np.float64)
EDGE_M = np.array([0, 1, P - 1, HALF, HALF + 1], np.uint32)


def edge_operands(g: np.random.Generator, n: int, qmax: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = np.rint(g.uniform(-qmax, qmax, n))
    m0 = g.integers(0, P, n).astype(np.uint32)
    m1 = g.integers(0, P, n).astype(np.uint32)
    if n >= 3:  # every (q, m0, m1) combination of edge values, at random positions
        qq, a, b = np.meshgrid(EDGE_Q, EDGE_M, EDGE_M, indexing="ij")
        k = min(n, qq.size)
        pos = g.choice(n, k, replace=False)
        q[pos], m0[pos], m1[pos] = qq.ravel()[:k], a.ravel()[:k], b.ravel()[:k]
    return q, m0, m1


@pytest.mark.parametrize("n", SIZES)
def test_masked_equals_the_int64_formula(n: int) -> None:
    g = np.random.default_rng(n)
    for qmax in (HALF, P - 1):
        q, m0, m1 = edge_operands(g, n, qmax)
        assert same_bits(F.masked(q, m0, m1), ref_masked(q, m0, m1))


def test_masked_shapes_layouts_and_values_outside_the_fast_range() -> None:
    g = np.random.default_rng(1)
    for shape in [(3, 5), (128, 2, 12, 12), (700, 300)]:
        q, m0, m1 = (a.reshape(shape) for a in edge_operands(g, int(np.prod(shape)), HALF))
        got = F.masked(q, m0, m1)
        assert got.flags.c_contiguous and same_bits(got, ref_masked(q, m0, m1))
        qt = np.ascontiguousarray(q.reshape(shape[0], -1).T).T  # a transposed (Fortran-order) view
        assert same_bits(F.masked(qt, m0.reshape(qt.shape), m1.reshape(qt.shape)),
                         ref_masked(qt, m0.reshape(qt.shape), m1.reshape(qt.shape)))
    # one block with |q| >= p (the scale rule's zero-operand case can give them): the reference formula
    n = 3 * F.CHUNK
    q, m0, m1 = edge_operands(g, n, HALF)
    q[F.CHUNK + 17] = 2.0**40
    q[F.CHUNK + 18] = -(2.0**45) - 3
    q[2 * F.CHUNK] = float(P)
    q[2 * F.CHUNK + 1] = -float(P) - 1
    assert same_bits(F.masked(q, m0, m1), ref_masked(q, m0, m1))
    with pytest.raises(ValueError, match="masks"):
        F.masked(q, m0[:-1], m1)


@pytest.mark.parametrize("n", SIZES)
def test_lift_equals_the_centred_residue(n: int) -> None:
    g = np.random.default_rng(10 + n)
    zs = [g.integers(0, P, n).astype(np.uint32) for _ in range(3)]
    if n >= 3:
        edge = np.array([0, 1, HALF, HALF + 1, P - 1, P - 2], np.uint32)
        a, b, c = np.meshgrid(edge, edge, edge, indexing="ij")
        k = min(n, a.size)
        pos = g.choice(n, k, replace=False)
        for z, e in zip(zs, (a, b, c), strict=True):
            z[pos] = e.ravel()[:k]
    want = ref_lift(zs)
    got = F.lift(zs)
    assert same_bits(got, want)
    assert not np.signbit(got[got == 0]).any()  # +0.0, as z - k p gives
    old = zs[0].astype(np.float64) + zs[1] + zs[2]  # the float64 formula the kernel replaces
    old -= np.rint(old * (1.0 / P)) * P
    assert same_bits(got, old)
    assert same_bits(F.lift(zs[:2]), ref_lift(zs[:2]))


def test_lift_keeps_the_shape_and_rejects_mismatched_answers() -> None:
    g = np.random.default_rng(3)
    zs = [g.integers(0, P, (4, 5, 6)).astype(np.uint32) for _ in range(3)]
    assert same_bits(F.lift(zs), ref_lift(zs))
    with pytest.raises(ValueError):
        F.lift([zs[0], zs[1][:2]])


@pytest.mark.parametrize("n", [0, 1, 5, F.CHUNK, 2 * F.CHUNK + 3])
def test_masks_u32_is_uniform_field(n: int) -> None:
    seed = bytes(range(n % 200, n % 200 + 32))
    assert same_bits(F.masks_u32(seed, n), uniform_field(seed, n).astype(np.uint32))
    with pytest.raises(ValueError):
        F.masks_u32(b"short", 4)


class _FakeStream:
    """A CTR-like stream whose words are p at chosen positions (to exercise the rejection path)."""

    def __init__(self, bad: set[int]) -> None:
        self.pos, self.bad = 0, bad

    def _words(self, count: int) -> np.ndarray:
        i = np.arange(self.pos, self.pos + count, dtype=np.uint64)
        w = ((i * np.uint64(2654435761) + np.uint64(12345)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        for j in range(count):
            if self.pos + j in self.bad:
                w[j] = np.uint32(P) | np.uint32(1 << 31) if j % 2 else np.uint32(P)
        self.pos += count
        return w

    def update(self, data: bytes) -> bytes:
        return (np.frombuffer(bytes(data), "<u4") ^ self._words(len(data) // 4)).tobytes()

    def update_into(self, data: memoryview, out: memoryview) -> int:
        n = len(data)
        out[:n] = self.update(bytes(data))
        return n


class _FakeCipher:
    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def __call__(self, *args: object) -> _FakeCipher:
        return self

    def encryptor(self) -> _FakeStream:
        return _FakeStream(self.bad)


def test_masks_u32_rejects_p_in_the_reference_order(monkeypatch: pytest.MonkeyPatch) -> None:
    n = F.CHUNK + 100
    # p at positions in two blocks, and again among the redrawn words (positions n, n + 2)
    bad = {3, 4, F.CHUNK + 50, n, n + 2}
    monkeypatch.setattr(F, "Cipher", _FakeCipher(bad))
    monkeypatch.setattr(field_mod, "Cipher", _FakeCipher(bad))
    got = F.masks_u32(bytes(32), n)
    want = uniform_field(bytes(32), n)
    assert same_bits(got, want.astype(np.uint32))
    assert int(got.max()) < P


def reference_pair(uq: np.ndarray, vq: np.ndarray, s0: bytes, s1: bytes) -> tuple[np.ndarray, np.ndarray]:
    n, nu = uq.size + vq.size, uq.size
    r0, r1 = uniform_field(s0, n), uniform_field(s1, n)
    return (ref_masked(uq, r0[:nu].reshape(uq.shape), r1[:nu].reshape(uq.shape)),
            ref_masked(vq, r0[nu:].reshape(vq.shape), r1[nu:].reshape(vq.shape)))


@pytest.mark.parametrize(("su", "sv"), [((3, 4), (4, 5)), ((1,), (0,)), ((20, 3000), (50, 2000)),
                                        ((128, 2, 12, 12), (50, 7))])
def test_mask_pair_is_masks_then_masked(su: tuple[int, ...], sv: tuple[int, ...]) -> None:
    g = np.random.default_rng(len(su) + sum(sv))
    uq = np.rint(g.uniform(-HALF, HALF, su))
    vq = np.rint(g.uniform(-HALF, HALF, sv))
    if uq.size > 40:
        uq.ravel()[:len(EDGE_Q)] = EDGE_Q
        uq.ravel()[F.CHUNK // 2] = 2.0**40  # a block outside the fast range
    s0, s1 = bytes(range(32)), bytes(range(1, 33))
    e, f = F.mask_pair(uq, vq, s0, s1)
    we, wf = reference_pair(uq, vq, s0, s1)
    assert same_bits(e, we) and same_bits(f, wf)
    with pytest.raises(ValueError):
        F.mask_pair(uq, vq, s0, b"short")


def test_mask_pair_with_a_rejected_word_takes_the_reference_order(monkeypatch: pytest.MonkeyPatch) -> None:
    g = np.random.default_rng(8)
    uq, vq = np.rint(g.uniform(-HALF, HALF, (300, 300))), np.rint(g.uniform(-HALF, HALF, (300, 50)))
    n = uq.size + vq.size
    bad = {F.CHUNK + 7, uq.size + 3, n, n + 1}
    monkeypatch.setattr(F, "Cipher", _FakeCipher(bad))
    monkeypatch.setattr(field_mod, "Cipher", _FakeCipher(bad))
    e, f = F.mask_pair(uq, vq, bytes(32), bytes(32))
    we, wf = reference_pair(uq, vq, bytes(32), bytes(32))
    assert same_bits(e, we) and same_bits(f, wf)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rint_scaled_is_rint_of_the_scaled_value(dtype: type) -> None:
    g = np.random.default_rng(5)
    x = g.standard_normal(2 * F.CHUNK + 9).astype(dtype)
    x[:8] = [0.5, 1.5, 2.5, -0.5, -1.5, -0.4, 0.0, -0.0]  # ties to even, -0.0
    for f in (-24, 0, 1, 13, 40):
        want = np.rint(x.astype(np.float64) * 2.0**f)
        assert same_bits(F.rint_scaled(x, f), want)
        m = x[: 300 * 200].reshape(300, 200).T  # non-contiguous
        got = F.rint_scaled(m, f)
        assert got.flags.c_contiguous and same_bits(got, np.rint(m.astype(np.float64) * 2.0**f))


def test_maxabs_is_max_of_max_and_minus_min() -> None:
    g = np.random.default_rng(6)
    for n in (1, 5, 2 * F.CHUNK + 1):
        x = g.standard_normal(n) * 7
        assert F.maxabs(x) == max(float(x.max()), -float(x.min()))
        assert F.maxabs(x.reshape(-1, 1)[::1]) == max(float(x.max()), -float(x.min()))
    x = g.standard_normal((400, 500))
    x[399, 8] = -123.0
    assert F.maxabs(x) == 123.0 and F.maxabs(x.T) == 123.0 and F.maxabs(x[:, ::2]) == 123.0
    x[3, 3] = np.nan
    assert np.isnan(F.maxabs(x))
    assert F.maxabs(np.zeros((0, 3))) == 0.0


def test_fold_mod_p_equals_the_remainder() -> None:
    g = np.random.default_rng(7)
    x = np.concatenate([g.integers(0, 2**62, 10000), np.array([0, 1, P - 1, P, P + 1, 2 * P, 2**31, 2**32, 2**62 - 1,
                                                                   P * P, (2**31) * P])])
    want = x % P
    assert np.array_equal(F.fold_mod_p(x.copy()), want)


@pytest.mark.parametrize("amax", [1.0, 100.0, 3952.6, float(HALF), float(P)])
def test_exact_matvec_equals_the_int64_field_product(amax: float) -> None:
    g = np.random.default_rng(int(amax) % 1000)
    for rows, cols, t in [(1, 1, 1), (37, 20, 1), (500, 128, 2), (2000, 800, 3)]:
        top = np.floor(amax)  # the largest integer entry allowed
        a = np.clip(np.rint(g.uniform(-amax, amax, (rows, cols))), -top, top)
        a.ravel()[: min(4, a.size)] = [top, -top, 0, top][: min(4, a.size)]
        x = g.integers(0, P, (cols, t))
        x[0, 0] = P - 1
        want = field_matvec(a.astype(np.int64) % P, x)
        got = F.exact_matvec(a, amax, x)
        assert got.dtype == np.int64 and np.array_equal(got, want)
        assert np.array_equal(F.exact_matvec(np.asfortranarray(a), amax, x), want)
    with pytest.raises(FieldRangeError):
        F.exact_matvec(np.zeros((1, 4)), 2.0**52, np.zeros((4, 1), np.int64))


def test_the_protocol_calls_these_kernels() -> None:
    assert protocol.mask_pair is F.mask_pair and protocol._lift is F.lift and protocol._maxabs is F.maxabs
    assert protocol._rint_scaled is F.rint_scaled
    assert protocol.masks_u32 is F.masks_u32 and protocol.exact_matvec is F.exact_matvec


CONV_CASES = [  # (x shape, kernel, strides, pads): network C's layers and odd geometries
    ((6, 1, 28, 28), (5, 5), (1, 1), (0, 0, 0, 0)),
    ((5, 4, 12, 12), (5, 5), (1, 1), (0, 0, 0, 0)),
    ((3, 3, 9, 7), (3, 2), (2, 1), (1, 0, 2, 1)),
    ((2, 2, 8, 8), (3, 3), (3, 3), (1, 1, 1, 1)),
    ((4, 3, 6, 5), (1, 1), (1, 1), (0, 0, 0, 0)),
]


def conv_item(g: np.random.Generator, op: str, shape: tuple[int, int, int, int], kernel: tuple[int, int],
              strides: tuple[int, int], pads: tuple[int, int, int, int], o: int = 6) -> tuple[ConvSpec, np.ndarray, np.ndarray]:
    spec = ConvSpec(op, shape, kernel, strides, pads)
    n, k, m = spec.matrix_shape(o)
    su, sv = spec.raw_shapes(n, k, m)
    u = g.standard_normal(su) * np.exp(g.normal(0, 3, su))  # entries over many decades
    v = g.standard_normal(sv) * np.exp(g.normal(0, 3, sv))
    if op == "dw":
        v = np.abs(v)  # ReLU-like activations
    return spec, u, v


def exact_conv_scales(spec: ConvSpec, u: np.ndarray, v: np.ndarray) -> tuple[int, int]:
    ru, cv, length = conv_norms(spec, u, v)
    return protocol._scale_rule(ru, cv, F.maxabs(u), F.maxabs(v), length)


@pytest.mark.parametrize("op", ["fwd", "dw", "dx"])
def test_conv_norm_bounds_bracket_conv_norms_and_the_scales_are_the_same(op: str) -> None:
    g = np.random.default_rng(["fwd", "dw", "dx"].index(op))
    for shape, kernel, strides, pads in CONV_CASES:
        for _ in range(3):
            spec, u, v = conv_item(g, op, shape, kernel, strides, pads)
            ru, cv, length = conv_norms(spec, u, v)
            b = F.conv_norm_bounds(spec, u, v)
            assert b is not None
            assert b[0] <= ru <= b[1] and b[2] <= cv <= b[3] and b[4] == length
            assert b[1] - b[0] <= 1e-9 * ru and b[3] - b[2] <= 1e-9 * cv
            assert protocol.choose_conv_scales(spec, u, v) == exact_conv_scales(spec, u, v)
            assert protocol._conv_scales(spec, u, v) == (*exact_conv_scales(spec, u, v), F.maxabs(u), F.maxabs(v))


def test_conv_scales_fall_back_to_conv_norms_at_a_boundary_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Operands scaled so that ``HALF / (ru cv)`` sits on a power of two: the brackets straddle the rule's step,
    ``conv_norms`` decides, and the result is the exact rule's."""
    g = np.random.default_rng(11)
    calls = [0]
    real = protocol.conv_norms

    def counting(*a: object) -> tuple[float, float, int]:
        calls[0] += 1
        return real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(protocol, "conv_norms", counting)
    for op in ("fwd", "dw", "dx"):
        for shape, kernel, strides, pads in CONV_CASES[:3]:
            spec, u, v = conv_item(g, op, shape, kernel, strides, pads)
            ru, cv, _ = real(spec, u, v)
            for k in (20, 25, 31):
                lam = HALF / (ru * cv * 2.0**k)
                uu = u * lam
                for nudge in (1.0, 1.0 + 2.0**-50, 1.0 - 2.0**-50):
                    un = uu * nudge
                    assert protocol.choose_conv_scales(spec, un, v) == exact_conv_scales(spec, un, v)
    assert calls[0] > 0  # the ambiguous cases took the reference path


def test_conv_norm_bounds_give_up_on_non_finite_values() -> None:
    g = np.random.default_rng(12)
    spec, u, v = conv_item(g, "dw", *CONV_CASES[1])
    v[0, 0, 0, 0] = np.inf
    assert F.conv_norm_bounds(spec, u, v) is None
