"""Non-linear functions on shares: piecewise polynomials chosen by exact comparisons, range-normalised
reciprocal and inverse square root, softmax, LayerNorm, RMSNorm. All are compound kernels over a
:class:`~veil.mpc.kernels.steps.Runner` (their cost is that of their steps); inputs at scale ``f``.

**Piecewise polynomials** (``gelu``, ``gelu_tanh``, ``sigmoid``, ``tanh``, ``silu``, ``erf``,
``exp`` for x <= 0), in the manner of PUMA (Dong et al. 2023) and SIGMA (Gupta et al. 2023), with
veil's exact comparisons choosing the segment:

1. powers ``x^2 .. x^d`` by repeated Beaver products, each level one product and one truncation
   (2 rounds per level: 4 rounds for d <= 4, 6 for d <= 8);
2. every segment's polynomial ``P_i(x) = sum_k c_ik x^k``, locally, with coefficients encoded at
   ``2f`` fractional bits (so ``c x^6`` keeps its precision for |x| up to 16);
3. one vectorised comparison of ``x - t_i`` for all K thresholds (4 rounds, 3 for small layers)
   selecting ``P_i - P_(i-1)``: ``y = P_0 + sum_i [x >= t_i] (P_i - P_(i-1))``;
4. one truncation back to ``f`` (1 round).
The sum telescopes exactly in the ring, so polynomials evaluated far outside their segment (whose
powers overflow and are garbage) cancel out: only the segment containing x contributes, and no
clipping is needed. Outer segments are constants or ``x``. Error bound: :attr:`Piecewise.bound`
(approximation plus fixed point at f = 16), checked over the whole line by the tests.

**Reciprocal and inverse square root** for ``x`` in ``[2^lo, 2^hi)``: one comparison call finds the
magnitude, ``b_j = [x >= 2^j]`` for every j in (lo, hi) in steps of 1/4; the normalisers ``c = 2^-e`` (and
``2^(-e/2)``) are linear in the bits (telescoping sums selected with public coefficients), so
``x_n = x c`` comes out of the same selection (ys = ``x * delta_j``) without a product.
With 4 thresholds per octave ``x_n`` lies in [1, 2^(1/4)), where a linear start is already close:
Goldschmidt for the reciprocal from ``|1 - x_n y0| < 4e-3`` with two steps (relative error 2e-10), for
the inverse square root from ``|1 - x_n y0^2| < 3e-3`` with one step (relative error 3e-6).
Rounds: reciprocal 4 + 1 + 6, rsqrt 4 + 1 + 6.

**Softmax** over an axis with an optional public mask: masked entries are set to a public very
negative value, the maximum is found by a tournament of exact comparisons (ceil(log2 k) levels),
``exp(x - max)`` (piecewise, x <= 0), masked entries zeroed (public multiply), the sum's reciprocal
(``lo = 0``: the sum is at least exp(0) = 1), one product. A fully masked row gives zeros.

**LayerNorm / RMSNorm** over the last axis of n: the centred row ``d`` (1 truncation), its sum of
squares ``S`` (1 product, 1 truncation together with ``d * gamma * sqrt(n)``), ``rsqrt(S + n eps)``
with the normaliser ``2^(-e/2)`` folded into the row (``q = d gamma sqrt(n) 2^(-e/2)``) so the
result keeps its relative precision for any variance, then the Goldschmidt steps applied to ``q``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from math import erf, exp, sqrt, tanh
from typing import Any

import numpy as np
from numpy.polynomial import Polynomial

from veil.mpc.kernels.steps import Runner

__all__ = ["Piecewise", "FUNCTIONS", "piecewise_a", "powers_a", "reciprocal_a", "rsqrt_a", "softmax_a",
           "layernorm_a", "rmsnorm_a", "exp_neg_a", "working_scale", "NEG_MASK", "sqrt_a", "coef_scale",
           "NORM_SQUARE_DROP", "ALL_PAIRS_MAX"]

# a masked softmax entry: far below every threshold of exp, far inside the ring
NEG_MASK = -(2.0**20)
# LayerNorm squares the centred row at scale f - NORM_SQUARE_DROP: sums of squares up to 2^(61-2f+4)
NORM_SQUARE_DROP = 2


@dataclass(frozen=True)
class Piecewise:
    """``thresholds`` t_1 < ... < t_K and K+1 power-basis polynomials (segment i is [t_i, t_(i+1)));
    ``bound``: max |error| against float over the real line (x <= 0 for exp) at f = 16."""

    name: str
    thresholds: tuple[float, ...]
    polys: tuple[tuple[float, ...], ...]
    bound: float

    @property
    def degree(self) -> int:
        return max(len(p) for p in self.polys) - 1


def _fit(fn: Callable[[float], float], a: float, b: float, deg: int) -> tuple[float, ...]:
    """Near-minimax fit on [a, b] (least squares on Chebyshev points), in the power basis of x."""
    xs = np.cos(np.linspace(0.0, np.pi, 2001)) * (b - a) / 2 + (a + b) / 2
    ys = np.vectorize(fn)(xs)
    return tuple(float(c) for c in Polynomial.fit(xs, ys, deg).convert().coef)


def _piecewise(name: str, fn: Callable[[float], float], breaks: list[float], deg: int, low: tuple[float, ...],
               high: tuple[float, ...] | None, bound: float) -> Piecewise:
    polys = [low] + [_fit(fn, a, b, deg) for a, b in zip(breaks[:-1], breaks[1:], strict=True)]
    if high is not None:
        polys.append(high)
        ths = tuple(breaks)
    else:  # the last fitted segment extends to +inf (exp: only x <= 0 is in the domain)
        ths = tuple(breaks[:-1])
    return Piecewise(name, ths, tuple(polys), bound)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + erf(x / sqrt(2.0)))


def _gelu(x: float) -> float:
    return x * _phi(x)


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + exp(-x))


def _silu(x: float) -> float:
    return x * _sigmoid(x)


_GELU = [-4.0, 0.0, 4.0]
FUNCTIONS: dict[str, Piecewise] = {
    # GELU: 3 thresholds, degree 7 (still 3 product levels): 3/5 of the comparisons of 5 segments of
    # degree 6 (error 3e-5) for an error of 2.2e-4 (|gelu| < 1.4e-4 below -4, |gelu - x| above 4)
    "gelu": _piecewise("gelu", _gelu, _GELU, 7, (0.0,), (0.0, 1.0), 3e-4),
    "gelu_tanh": _piecewise("gelu_tanh", _gelu_tanh, _GELU, 7, (0.0,), (0.0, 1.0), 3e-4),
    "tanh": _piecewise("tanh", tanh, [-5.0, -3.0, -1.5, 0.0, 1.5, 3.0, 5.0], 6, (-1.0,), (1.0,), 2e-4),
    "sigmoid": _piecewise("sigmoid", _sigmoid, [-12.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0, 12.0], 5,
                          (0.0,), (1.0,), 1e-4),
    # SiLU: degree 4 (2 product levels: 2 rounds fewer than degree 5) on 12 segments, error 7.4e-5
    "silu": _piecewise("silu", _silu, [-12.0, -8.0, -5.0, -3.0, -1.0, 1.0, 3.0, 5.0, 8.0, 12.0, 16.0], 4, (0.0,),
                       (0.0, 1.0), 1.5e-4),
    "erf": _piecewise("erf", erf, [-3.0, -1.5, 0.0, 1.5, 3.0], 6, (-1.0,), (1.0,), 2e-4),
    # exp on x <= 0 (max-subtracted softmax inputs); below -11 it is 0 (exp(-11) = 1.7e-5); degree 4
    # (2 product levels: 2 rounds fewer than degree 5) on 4 segments (4 comparisons per element, was 5:
    # fit error 3.7e-5, was 2.3e-5)
    "exp": _piecewise("exp", exp, [-11.0, -5.5, -3.0, -1.3, 0.0], 4, (0.0,), None, 1e-4),
}


def working_scale(f: int) -> int:
    """Fractional bits of the Goldschmidt iterations: ``min(f + 8, 24)`` (products at 2W <= 48 bits)."""
    return min(f + 8, 24)


def _enc(v: float | np.ndarray, scale: int) -> np.ndarray:
    return np.asarray(np.round(np.asarray(v, np.float64) * 2.0**scale), np.float64).astype(np.int64).view(np.uint64)


def powers_a(run: Runner, x: np.ndarray, d: int, open_also: dict[str, Any] | None = None) -> dict[int, np.ndarray]:
    """``{k: x^k}`` for k = 1..d at scale f: one product and one truncation per doubling level
    (``open_also`` rides with the first product)."""
    f = run.fp.frac_bits
    pw = {1: x}
    top = 1
    while top < d:
        ks = list(range(top + 1, min(2 * top, d) + 1))
        prods = run.mul_many([(pw[k - top], pw[top]) for k in ks], open_also if top == 1 else None)
        for k, v in zip(ks, run.trunc_many([(p, f) for p in prods]), strict=True):
            pw[k] = v
        top = ks[-1]
    return pw


def coef_scale(f: int) -> int:
    """Fractional bits of polynomial coefficients: sums at ``f + coef_scale`` <= 47 bits."""
    return min(2 * f, 47 - f)


@lru_cache(maxsize=64)
def _encoded(spec: Piecewise, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``spec``'s ring constants at ``f``: thresholds (K,) at f; ``c`` (K+1, d+1), every segment's
    coefficients at ``f + sc`` (constant term) and ``sc`` (the others); ``dc`` (K, d+1) = ``c[i] -
    c[i-1]`` in the ring (encodings subtracted mod 2^64: the same ring values as subtracting the
    evaluated polynomials)."""
    sc = coef_scale(f)
    d = spec.degree
    c = np.zeros((len(spec.polys), d + 1), np.uint64)
    for i, poly in enumerate(spec.polys):
        for k, ck in enumerate(poly):
            c[i, k] = _enc(ck, f + sc if k == 0 else sc)
    ts = np.array([_enc(t, f) for t in spec.thresholds], np.uint64)
    for a in (c, ts):
        a.setflags(write=False)
    dc = c[1:] - c[:-1]
    dc.setflags(write=False)
    return ts, c, dc


def _poly_rows(run: Runner, coef: np.ndarray, pw: dict[int, np.ndarray], n: int) -> np.ndarray:
    """``sum_k coef[:, k] x^k`` for shares of the powers (rows (R, n)); the constant terms are public."""
    out = np.empty((coef.shape[0], n), np.uint64)
    out[:] = coef[:, :1] if run.party == 0 else np.uint64(0)
    tmp = np.empty_like(out)
    for k in range(1, coef.shape[1]):
        if not coef[:, k].any():  # e.g. GELU's zero segment
            continue
        np.multiply(coef[:, k : k + 1], pw[k][None, :], out=tmp)
        out += tmp
    return out


def piecewise_a(run: Runner, x: np.ndarray, spec: Piecewise) -> np.ndarray:
    """``spec`` applied element-wise to shares ``x`` (scale f); result at scale f."""
    f = run.fp.frac_bits
    sc = coef_scale(f)
    shape = x.shape
    flat = x.reshape(-1)
    ts, coef, dcoef = _encoded(spec, f)
    pending = run.begin_select_thresholds(flat, ts) if spec.degree >= 2 else None
    pw = powers_a(run, flat, spec.degree, pending) if spec.degree >= 2 else {1: flat}
    p0 = _poly_rows(run, coef[:1], pw, flat.size)[0]
    ys = _poly_rows(run, dcoef, pw, flat.size)  # (K, n): P_i - P_(i-1)
    if pending is not None:  # the comparison's opening rode with the first product of the powers
        sel = run.finish_select_thresholds(pending, ys)
    else:
        sel = run.select_thresholds(flat, ts, ys)
    out = p0 + sel.sum(axis=0)
    return run.trunc(out, sc).reshape(shape)


def exp_neg_a(run: Runner, x: np.ndarray) -> np.ndarray:
    """``exp(x)`` for shares of ``x <= 0`` (scale f, result scale f)."""
    return piecewise_a(run, x, FUNCTIONS["exp"])


OCTAVE_STEPS = 4  # normalisation thresholds per octave: x_n in [1, 2^(1/4))


def _magnitude(run: Runner, x: np.ndarray, lo: int, hi: int, sc2: int, half: bool,
               cmul: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """For shares ``x`` (flat, scale f) in [2^lo, 2^hi): ``x_n = x 2^-e`` in [1, 2^(1/4)) at the working
    scale W and ``c = cmul 2^-e`` (or ``cmul 2^(-e/2)`` when ``half``) at scale ``sc2``, where e is the
    largest of lo, lo + 1/4, ... with 2^e <= x (one comparison call against 4 thresholds per octave)."""
    f = run.fp.frac_bits
    w = working_scale(f)
    sc1 = 59 - f  # scale of the public deltas of 2^-e: x * 2^-e < 2 stays below 2^62
    ts, d1, d2, base1, base2 = _magnitude_consts(f, lo, hi, sc2, half, cmul)
    n = x.shape[0]
    base_x = x * base1
    base_c = run.public(np.full(n, base2, np.uint64))
    if len(ts):
        ys = np.empty((2, len(ts), n), np.uint64)  # width 2: x * delta_j and the public delta of c
        np.multiply(d1[:, None], x[None, :], out=ys[0])
        ys[1] = d2[:, None] if run.party == 0 else np.uint64(0)
        sel = run.select_thresholds(x, ts, ys).sum(axis=1)
        base_x += sel[0]
        base_c += sel[1]
    xn = run.trunc(base_x, f + sc1 - w)
    return xn, base_c


@lru_cache(maxsize=64)
def _magnitude_consts(f: int, lo: int, hi: int, sc2: int, half: bool,
                      cmul: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.uint64, np.uint64]:
    """Ring constants of :func:`_magnitude`: thresholds ``2^e`` (at f), the deltas of ``2^-e`` (at
    59 - f) and of ``cmul 2^(-p e)`` (at ``sc2``), and the bases at ``e = lo``."""
    sc1 = 59 - f
    es = lo + np.arange(1, (hi - lo) * OCTAVE_STEPS) / OCTAVE_STEPS
    prev = np.concatenate([[lo], es[:-1]])
    p = 0.5 if half else 1.0
    ts = _enc(2.0**es, f)
    d1 = _enc(2.0**-es - 2.0**-prev, sc1)
    d2 = _enc(cmul * (2.0 ** (-p * es) - 2.0 ** (-p * prev)), sc2)
    for a in (ts, d1, d2):
        a.setflags(write=False)
    return ts, d1, d2, np.uint64(_enc(2.0**-lo, sc1)), np.uint64(_enc(cmul * 2.0 ** (-p * lo), sc2))


def _c_scale(f: int, lo: int, half: bool) -> int:
    """Scale of the normaliser c: as fine as possible with ``c * y`` (y < 2 at W + 8 for the
    reciprocal, y < 1 at W for rsqrt) below 2^61."""
    top = -lo / 2 if half else -lo  # log2 of the largest c
    ys = working_scale(f) + (0 if half else 8)
    return int(min(61 - ys - max(top, 0) - 1, 40))


# linear starts on [1, 2^(1/4)), b a multiple of 2^-8: |1 - x y0| <= 3.9e-3 (reciprocal),
# |1 - x y0^2| <= 2.9e-3 (rsqrt)
_RC_A, _RC_B = 1.8320987, 214 / 256
_RS_A, _RS_B = 1.4360669, 112 / 256


def reciprocal_a(run: Runner, x: np.ndarray, lo: int = -8, hi: int = 24, out_scale: int | None = None) -> np.ndarray:
    """``1 / x`` for shares of ``x`` in [2^lo, 2^hi) (scale f); result at ``out_scale`` (default f; the
    iterations run at the working scale W, :func:`working_scale`): relative error < 1e-6 plus a few
    units of 2^-W. Goldschmidt from a linear start (|e0| < 4e-3), two steps: ``c y0 (1+e)(1+e^2)``."""
    f = run.fp.frac_bits
    w = working_scale(f)
    shape = x.shape
    sc = _c_scale(f, lo, False)
    xn, c = _magnitude(run, x.reshape(-1), lo, hi, sc, half=False)
    y0 = run.public(np.full(xn.shape, _enc(_RC_A, w + 8))) - xn * _enc(_RC_B, 8)  # scale W + 8
    xy, cy = run.mul_many([(xn, y0), (c, y0)])
    xy, cy = run.trunc_many([(xy, w + 8), (cy, sc + 8)])  # at W
    one = run.public(np.full(xn.shape, _enc(1.0, w)))
    e = one - xy
    e2, cy = run.mul_many([(e, e), (cy, one + e)])
    e2, cy = run.trunc_many([(e2, w), (cy, w)])
    out = run.trunc(run.mul(cy, one + e2), 2 * w - (f if out_scale is None else out_scale))
    return out.reshape(shape)




def _rsqrt_iterate(run: Runner, xn: np.ndarray, c: np.ndarray, sc: int, q: np.ndarray | None,
                   out_scale: int) -> np.ndarray:
    """Goldschmidt for ``c / sqrt(xn)``, or ``q c / sqrt(xn)`` when ``q`` (scale f, rows of shape
    (n, m)) is given with ``c`` per row: ``g = xn y``, ``h = y / 2``, ``r = 3/2 - g h``, ``g, h *= r``
    (g -> sqrt(xn), h -> 1 / (2 sqrt(xn))), one step from the linear start, tracking ``2 c h`` (times q). ``c`` at scale ``sc``; result at ``out_scale``."""
    f = run.fp.frac_bits
    w = working_scale(f)
    y0 = run.public(np.full(xn.shape, _enc(_RS_A, w + 8))) - xn * _enc(_RS_B, 8)  # scale W + 8
    if q is None:  # c h directly (c at scale sc)
        (g0,) = run.mul_many([(xn, y0)])
        g, h = run.trunc_many([(g0, w + 8), (y0, 9)])  # g = xn y0, h = y0 / 2, at W
        gh2, hs2 = run.mul_many([(g, h), (c, h)])
        gh, hs = run.trunc_many([(gh2, w), (hs2, sc - 1)])  # hs = 2 c h at W
    else:
        g0, qc = run.mul_many([(xn, y0), (q, np.broadcast_to(c[:, None], q.shape))])
        g, h, qs = run.trunc_many([(g0, w + 8), (y0, 9), (qc, f + sc - w)])  # qs = q c at W
        gh2, hs2 = run.mul_many([(g, h), (qs, np.broadcast_to(h[:, None], qs.shape))])
        gh, hs = run.trunc_many([(gh2, w), (hs2, w - 1)])  # hs = 2 q c h

    def rows(r: np.ndarray) -> np.ndarray:
        return r if q is None else np.broadcast_to(r[:, None], hs.shape)

    r = run.public(np.full(xn.shape, _enc(1.5, w))) - gh  # one step: |1 - x y^2| < 1e-5 after it
    return run.trunc(run.mul(hs, rows(r)), 2 * w - out_scale)


def rsqrt_a(run: Runner, x: np.ndarray, lo: int = -16, hi: int = 30, out_scale: int | None = None) -> np.ndarray:
    """``1 / sqrt(x)`` for shares of ``x`` in [2^lo, 2^hi) (scale f); result at ``out_scale`` (default f)."""
    shape = x.shape
    sc = _c_scale(run.fp.frac_bits, lo, True)
    xn, c = _magnitude(run, x.reshape(-1), lo, hi, sc, half=True)
    out = run.fp.frac_bits if out_scale is None else out_scale
    return _rsqrt_iterate(run, xn, c, sc, None, out).reshape(shape)


def sqrt_a(run: Runner, x: np.ndarray, lo: int = -16, hi: int = 26) -> np.ndarray:
    """``sqrt(x) = x / sqrt(x)`` for shares of ``x`` in [2^lo, 2^hi) (scale f); result at f."""
    f = run.fp.frac_bits
    flat = x.reshape(-1)
    sc = 61 - f - 14
    xn, c = _magnitude(run, flat, lo, hi, sc, half=True)
    return _rsqrt_iterate(run, xn, c, sc, flat[:, None], f).reshape(x.shape)


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def layernorm_a(run: Runner, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None, eps: float,
                centre: bool = True) -> np.ndarray:
    """LayerNorm (``centre``) or RMSNorm over the last axis of shares ``x`` (scale f) with the
    owner's secret ``gamma`` and ``beta`` (shares at scale f). Result at scale f."""
    f = run.fp.frac_bits
    shape = x.shape
    v = _rows(x)
    n = v.shape[1]
    drop = 0
    if centre:  # the centred row at f, and at f - drop for its squares (one truncation round)
        s = v.sum(axis=1, keepdims=True)
        d2 = (v << np.uint64(2 * f)) - s * _enc(1.0 / n, 2 * f)  # x - mean at scale 3f (|x| < 2^13)
        drop = NORM_SQUARE_DROP
        v, vs = run.trunc_many([(d2, 2 * f), (d2, 2 * f + drop)])
    else:
        vs = v
    sq, dg = run.mul_many([(vs, vs), (v, np.broadcast_to(gamma, v.shape))])  # scales 2f - 2 drop, 2f
    s_f, dg_f = run.trunc_many([(sq.sum(axis=1), f - 2 * drop), (dg, f)])
    s_f = s_f + run.public(np.full(s_f.shape, _enc(n * eps, f)))
    lo, hi = -f, 62 - 2 * f + 2 * drop  # S (range analysis)
    sc = 61 - f - 14  # q c = d gamma / sqrt(var): about the output, below 2^13
    xn, c = _magnitude(run, s_f, lo, hi, sc, half=True, cmul=sqrt(n))
    y = _rsqrt_iterate(run, xn, c, sc, dg_f, f)
    if beta is not None:
        y = y + np.broadcast_to(beta, y.shape)
    return y.reshape(shape)


def rmsnorm_a(run: Runner, x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return layernorm_a(run, x, gamma, None, eps, centre=False)


ALL_PAIRS_MAX = 1 << 16  # rows x k^2 up to this: the maximum by all pairs (2 comparison calls)


def _max_last(run: Runner, v: np.ndarray) -> np.ndarray:
    """Row maxima of (R, k) by exact comparisons. Small rows: all pairs at once, ``c_ij = [v_i >= v_j]``
    for i < j, the unique winner (ties to the lower index) has ``sum_(j>i) c_ij + sum_(j<i) (1 - c_ji) =
    k - 1``, found by a second comparison that selects its value: 2 calls whatever k. Larger rows: a
    tournament, one call per level (ceil(log2 k))."""
    r, k = v.shape
    if k > 2 and r * k * k <= ALL_PAIRS_MAX:
        ii, jj = np.triu_indices(k, 1)
        diff = (v[:, ii] - v[:, jj]).reshape(-1)
        c = run.select(diff, run.public(np.ones((1, diff.size), np.uint64)))[0].reshape(r, len(ii))
        m1 = np.zeros((len(ii), k), np.uint64)
        m1[np.arange(len(ii)), ii] = 1
        m2 = np.zeros((len(ii), k), np.uint64)
        m2[np.arange(len(ii)), jj] = 1
        count = c @ (m1 - m2) + run.public(np.ones((r, len(ii)), np.uint64)) @ m2  # integers, scale 0
        win = run.select((count - run.public(np.full(count.shape, k - 1, np.uint64))).reshape(-1), v.reshape(1, -1))
        return win.reshape(r, k).sum(axis=1)
    while v.shape[1] > 1:
        h = v.shape[1] // 2
        a, b = v[:, 0 : 2 * h : 2], v[:, 1 : 2 * h : 2]
        diff = (a - b).reshape(-1)
        win = b + run.select(diff, diff[None, :])[0].reshape(a.shape)
        v = np.concatenate([win, v[:, 2 * h :]], axis=1)
    return v[:, 0]


def softmax_a(run: Runner, x: np.ndarray, axis: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Softmax of shares ``x`` (scale f) along ``axis``; ``keep`` (public bool, broadcastable to x)
    marks the entries not masked out. Result at scale f."""
    f = run.fp.frac_bits
    w = working_scale(f)
    xm = np.moveaxis(x, axis, -1)
    k = xm.shape[-1]
    v = _rows(np.ascontiguousarray(xm))
    keep_r: np.ndarray | None = None
    if keep is not None:
        keep_r = _rows(np.ascontiguousarray(np.moveaxis(np.broadcast_to(keep, x.shape), axis, -1))).astype(np.uint64)
        v = v * keep_r + run.public((np.uint64(1) - keep_r) * _enc(NEG_MASK, f))
    m = _max_last(run, v)
    z = v - m[:, None]
    e = exp_neg_a(run, z)
    if keep_r is not None:
        e = e * keep_r
    s = e.sum(axis=1)
    inv = reciprocal_a(run, s, lo=0, hi=max(int(np.ceil(np.log2(k + 1))), 1), out_scale=w)
    p = run.trunc(run.mul(e, np.broadcast_to(inv[:, None], e.shape)), w)
    return np.moveaxis(p.reshape(xm.shape), -1, axis)
