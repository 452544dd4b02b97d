"""Every mpc kernel against plaintext, its declared cost against the channel counters, and the
statistics of truncation. Kernels run on two in-process servers (veil.mpc.simulate).

Tolerances: outputs at scale f carry the input encoding error (2^-17) plus at most one ulp (2^-16)
per truncation; comparisons and selections are exact on the encoded values.
"""

import numpy as np
import pytest

from veil.mpc import dealer as D
from veil.mpc import sharing as S
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import (
    Ctx,
    argmax_a,
    argmax_a_cost,
    beaver_cost,
    matmul_aa,
    maxpool_a,
    maxpool_a_cost,
    mul_aa,
    product_aw_cost,
    relu_a,
    select_a_cost,
    trunc_a,
    trunc_a_cost,
)
from veil.mpc.kernels.compare import and_bb, monomials_bb
from veil.mpc.kernels.pool import tournament_sizes
from veil.mpc.kernels.products import FixedWeight, linear_aw, prepare_aw, weight_op
from veil.mpc.simulate import simulate
from veil.plain import kernels as PK

FP = FixedPoint(16)
F = FP.frac_bits
ULP = 2.0**-F
RNG = np.random.default_rng(11)


def split(v):
    return S.share(v, RNG.integers(0, 2**64, v.shape, dtype=np.uint64))


def check_cost(chans, cost):
    """Declared rounds, messages and bytes equal what each server's channel counted."""
    for name in ("server0", "server1"):
        st = chans[name].stats
        assert (st.rounds, st.msgs_sent, st.bytes_sent) == (cost.rounds, cost.msgs, cost.bytes), name


def test_trunc_a_values_and_cost():
    x = RNG.normal(0, 50, 5000)
    a, b = split(FP.encode(x, scale=2 * F))
    out, ch, _ = simulate(lambda ctx, m, s: trunc_a(ctx, s, m), lambda side: D.trunc(side, "t", 5000, F), [[a], [b]])
    y = FP.decode(S.reconstruct(*out))
    assert np.abs(y - x).max() <= ULP + 2**-32
    check_cost(ch, trunc_a_cost(5000))


def test_trunc_a_error_statistics():
    """Error over many draws: |error| < 1 ulp always, and unbiased (stochastic rounding).

    For 200,000 draws of a value with fractional part 0.3 ulp the rounding error is -0.3 ulp w.p. 0.7
    and +0.7 ulp w.p. 0.3 (mean 0, sd 0.46 ulp), so |mean| < 5 sd/sqrt(n) = 0.005 ulp fails by
    chance with probability < 1e-6. A floor (SecureML-style) truncation would give mean -0.3 ulp."""
    n = 200_000
    raw = (np.full(n, 12345, np.int64) << (2 * F)) + int(0.3 * 2**F)  # 12345 + 0.3 ulp at scale 2f
    a, b = split(raw.view(np.uint64))
    out, _, _ = simulate(lambda ctx, m, s: trunc_a(ctx, s, m), lambda side: D.trunc(side, "t", n, F), [[a], [b]])
    got = S.reconstruct(*out).view(np.int64)
    err = got - (12345 << F) - 0.3  # in ulps
    assert set(np.unique(got - (12345 << F))) <= {0, 1}
    assert np.abs(err).max() < 1
    assert abs(err.mean()) < 0.005
    assert abs((got - (12345 << F)).mean() - 0.3) < 0.005  # rounds up with probability = fractional part
    neg = -raw
    a, b = split(neg.view(np.uint64))
    out, _, _ = simulate(lambda ctx, m, s: trunc_a(ctx, s, m), lambda side: D.trunc(side, "t", n, F), [[a], [b]])
    got = S.reconstruct(*out).view(np.int64)
    assert abs((got + (12345 << F) + 0.3).mean()) < 0.005 and np.abs(got + (12345 << F) + 0.3).max() < 1


@pytest.mark.parametrize("trunc", [False, True])
def test_relu_a_exact_sign_and_cost(trunc):
    n = 3001
    x = np.concatenate([RNG.normal(0, 100, n - 5), [0.0, -ULP, ULP, 1e6, -1e6]])
    scale = 2 * F if trunc else F
    a, b = split(FP.encode(x, scale=scale))
    out, ch, _ = simulate(lambda ctx, m, s: relu_a(ctx, s, m, trunc=trunc),
                          lambda side: D.compare(side, "r", n, 1, F if trunc else None), [[a], [b]])
    y = FP.decode(S.reconstruct(*out), F if trunc else scale)
    want = np.maximum(FP.decode(FP.encode(x, scale=scale), scale), 0)
    assert np.abs(y - want).max() <= (ULP if trunc else 0)
    assert (y[x < 0] == 0).all()  # exact: no polynomial stand-in
    check_cost(ch, select_a_cost(n))
    assert select_a_cost(n).rounds == 4


def test_relu_a_full_range_signs():
    """Signs are exact across the whole admissible range |x| < 2^62 (raw ring values)."""
    raw = np.concatenate([RNG.integers(-(2**62) + 1, 2**62, 4000), [2**62 - 1, -(2**62) + 1, 1, -1, 0]]).astype(np.int64)
    a, b = split(raw.view(np.uint64))
    out, _, _ = simulate(lambda ctx, m, s: relu_a(ctx, s, m), lambda side: D.compare(side, "r", raw.size), [[a], [b]])
    assert (S.reconstruct(*out).view(np.int64) == np.maximum(raw, 0)).all()


def test_maxpool_a_and_cost():
    x = RNG.normal(0, 3, (2, 3, 7, 7))
    a, b = split(FP.encode(x))
    k, s, p = (3, 3), (2, 2), (1, 1, 1, 1)
    n_out = 2 * 3 * 4 * 4
    mats = lambda side: [D.compare(side, f"m{i}", n_out * q) for i, q in enumerate(tournament_sizes(9))]  # noqa: E731
    out, ch, _ = simulate(lambda ctx, m, v: maxpool_a(ctx, v, k, s, p, m), mats, [[a], [b]])
    want = PK.maxpool(FP.decode(FP.encode(x)), k, s, p)
    assert np.array_equal(FP.decode(S.reconstruct(*out)), want)
    check_cost(ch, maxpool_a_cost(n_out, 9))


def test_argmax_a_and_cost():
    x = RNG.normal(0, 1, (40, 10))
    x[0, 3] = x[0, 7] = 5.0  # tie: the lower index wins, as in numpy
    a, b = split(FP.encode(x))
    mats = lambda side: [D.compare(side, f"a{i}", 40 * q, 2) for i, q in enumerate(tournament_sizes(10))]  # noqa: E731
    out, ch, _ = simulate(lambda ctx, m, v: argmax_a(ctx, v, 1, m), mats, [[a], [b]])
    assert np.array_equal(S.reconstruct(*out).astype(np.int64), x.argmax(1))
    check_cost(ch, argmax_a_cost(40, 10))


def test_mul_aa_and_matmul_aa():
    x, y = RNG.normal(0, 2, (6, 5)), RNG.normal(0, 2, (6, 5))
    ex, ey = FP.encode(x), FP.encode(y)
    xa, ya = split(ex), split(ey)
    out, ch, _ = simulate(lambda ctx, m, u, v: mul_aa(ctx, u, v, m),
                          lambda side: D.beaver(side, "b", (6, 5), (6, 5), (6, 5), np.multiply),
                          [[xa[0], ya[0]], [xa[1], ya[1]]])
    assert np.array_equal(S.reconstruct(*out), ex * ey)
    check_cost(ch, beaver_cost((6, 5), (6, 5)))
    w = RNG.normal(0, 2, (5, 4))
    ew = FP.encode(w)
    wa = split(ew)
    out, ch, _ = simulate(lambda ctx, m, u, v: matmul_aa(ctx, u, v, m),
                          lambda side: D.beaver(side, "m", (6, 5), (5, 4), (6, 4), lambda p, q: p @ q),
                          [[xa[0], wa[0]], [xa[1], wa[1]]])
    assert np.array_equal(S.reconstruct(*out), ex @ ew)
    check_cost(ch, beaver_cost((6, 5), (5, 4)))


@pytest.mark.parametrize("conv", [False, True])
def test_fixed_weight_products(conv):
    """linear_aw / conv_aw: W fixed and masked once by B; per query only the input is opened."""
    if conv:
        x, w = RNG.normal(0, 1, (2, 3, 8, 8)), RNG.normal(0, 0.5, (4, 3, 3, 3))
        spec = ((1, 1), (1, 1, 1, 1), (3, 3), 4)
    else:
        x, w = RNG.normal(0, 1, (5, 7)), RNG.normal(0, 0.5, (3, 7))
        spec = None
    op = weight_op(spec)
    ex, ew = FP.encode(x), FP.encode(w)
    want = op(ex, ew)
    mask = RNG.integers(0, 2**64, w.shape, dtype=np.uint64)
    fopen = ew - mask
    w0, w1 = split(ew)
    xa = split(ex)
    fws = [FixedWeight.build(w0, fopen, spec), FixedWeight.build(w1, fopen, spec)]

    def fn(ctx: Ctx, m, v):
        fw = fws[ctx.party]
        return linear_aw(ctx, v, fw, prepare_aw(fw, m))

    out, ch, _ = simulate(fn, lambda side: D.fixed_product(side, "p", ex.shape, want.shape, op, mask),
                          [[xa[0]], [xa[1]]])
    assert np.array_equal(S.reconstruct(*out), want)
    check_cost(ch, product_aw_cost(ex.shape))


def test_and_bb_and_one_round_monomials():
    """Beaver AND on packed rows, and products of up to four shared bits in one round."""
    bits = [RNG.integers(0, 256, (3, 9), dtype=np.uint8) for _ in range(4)]
    shares = [S.share_bits(b, RNG.integers(0, 256, b.shape, dtype=np.uint8)) for b in bits]
    monos = ((0, 1), (3, 2, 1), (0, 1, 2, 3))

    def mat(side):
        return D.monomials(side, "m", 4, monos, (3, 9))

    out, ch, _ = simulate(lambda ctx, m, *xs: monomials_bb(ctx, list(xs), monos, m)[0], mat,
                          [[s[0] for s in shares], [s[1] for s in shares]])
    for k, t in enumerate(monos):
        want = bits[t[0]].copy()
        for i in t[1:]:
            want &= bits[i]
        assert np.array_equal(out[0][k] ^ out[1][k], want)
    assert ch["server0"].stats.rounds == 1

    def trip(side):
        a, b = side.rand_bits("a", (3, 9)), side.rand_bits("b", (3, 9))
        return (a, b, side.share_bits("c", lambda: a & b, (3, 9)))

    out, ch, _ = simulate(lambda ctx, m, x, y: and_bb(ctx, x, y, m)[0], trip,
                          [[shares[0][0], shares[1][0]], [shares[0][1], shares[1][1]]])
    assert np.array_equal(out[0] ^ out[1], bits[0] & bits[1]) and ch["server1"].stats.rounds == 1


@pytest.mark.parametrize("trunc", [False, True])
def test_select3_a_three_rounds_exact_and_cost(trunc):
    """The 3-round variant used for small layers: same results, declared cost matches the channels."""
    from veil.mpc.kernels.select3 import select3_a_cost

    n = 2001
    x = np.concatenate([RNG.normal(0, 100, n - 5), [0.0, -ULP, ULP, 1e6, -1e6]])
    scale = 2 * F if trunc else F
    a, b = split(FP.encode(x, scale=scale))
    out, ch, _ = simulate(lambda ctx, m, s: relu_a(ctx, s, m, trunc=trunc),
                          lambda side: D.compare3(side, "r", n, 1, F if trunc else None), [[a], [b]])
    y = FP.decode(S.reconstruct(*out), F if trunc else scale)
    want = np.maximum(FP.decode(FP.encode(x, scale=scale), scale), 0)
    assert np.abs(y - want).max() <= (ULP if trunc else 0) and (y[x < 0] == 0).all()
    check_cost(ch, select3_a_cost(n))
    assert select3_a_cost(n).rounds == 3
    raw = np.concatenate([RNG.integers(-(2**62) + 1, 2**62, 3000), [2**62 - 1, -(2**62) + 1, 1, -1, 0]]).astype(np.int64)
    a, b = split(raw.view(np.uint64))
    out, _, _ = simulate(lambda ctx, m, s: relu_a(ctx, s, m), lambda side: D.compare3(side, "r", raw.size), [[a], [b]])
    assert (S.reconstruct(*out).view(np.int64) == np.maximum(raw, 0)).all()


def test_argmax_with_three_round_comparisons():
    x = RNG.normal(0, 1, (30, 7))
    a, b = split(FP.encode(x))
    mats = lambda side: [D.compare3(side, f"a{i}", 30 * q, 2) for i, q in enumerate(tournament_sizes(7))]  # noqa: E731
    out, _, _ = simulate(lambda ctx, m, v: argmax_a(ctx, v, 1, m), mats, [[a], [b]])
    assert np.array_equal(S.reconstruct(*out).astype(np.int64), x.argmax(1))
