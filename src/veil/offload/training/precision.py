"""Product precision of offload training: one secure field product per product ("single") or two ("double").

A secure product in F_p, p = 2^31 - 1 (:mod:`veil.offload.training.protocol`) quantises both factors
so that ``|(U_q V_q)_ij| <= ||U_q row i|| ||V_q col j|| < p/2`` (Cauchy-Schwarz): the two operands share
about 30 bits, so over an inner dimension ``k`` each entry keeps roughly ``15 - log2(sqrt k)`` bits,
and one scale per matrix costs rows of small norm further bits. The error relative to the largest
output is ~1e-3 for network C (docs/offload.md), far from float32 (6e-8).

``precision="double"`` (:class:`PrecisionMatmul`) computes every product from two secure products in the
same accelerator round (:func:`split_items`), the exact high part and one sum item for the two cross terms:

1. **row/column normalisation** (exact): ``U' = diag(2^a) U``, ``V' = V diag(2^b)`` with powers of two
   that bring every row of ``U`` and column of ``V`` to a 2-norm in [1/2, 1), so every output entry
   gets the same share of the field's bits whatever the dynamic range across rows;
2. **split**: ``U'_h`` = ``U'`` rounded to the grid ``2^-gu``, quantised at exactly ``gu`` fractional bits
   (so exactly), ``V'_h`` likewise at ``gv``, with ``gu + gv`` as large as the protocol's Cauchy-Schwarz rule
   allows for ``(U'_h, V'_h)`` (checked on ``U'_h``, ``V'_h``; else one bit lower) and the bits shared so that
   the quantised norms are equal (``2^gu max ||U'_h row|| ~ 2^gv max ||V'_h col||``, which minimises the
   rounding of the cross terms); ``U'_l = U' - U'_h``, ``V'_l = V' - V'_h``;
3. ``U' V' ~ U'_h V'_h + (U'_l V'_h + U'_h V'_l)``: the first secure product is exact; the second is one sum
   item whose terms reuse the high item's ``U'_h`` and ``V'_h`` (the same quantised values and masks,
   sent once, :class:`~veil.offload.training.protocol.SumItem`) at ``gu``, ``gv``, with ``U'_l`` at ``S - gv``
   and ``V'_l`` at ``S - gu`` fractional bits for one output scale ``S`` (:func:`cross_scale`: the largest
   with the Cauchy-Schwarz bound of the *sum*, ``(2^(S-gv) |U'_l| + d)(2^gv |V'_h| + d) + (2^gu |U'_h| +
   d)(2^(S-gu) |V'_l| + d) < (p-1)/2``, ``d = sqrt(k)/2``: one bit below a single product's rule). Only
   ``U'_l`` and ``V'_l`` are rounded, with relative error ``eps`` on operands that are themselves ``~eps`` of
   ``U'``, ``V'``, and the dropped ``U'_l V'_l`` is ``~eps^2``: the error is ``~eps^2`` relative to
   ``||U_i|| ||V_j||``;
4. undo the normalisation: ``(U V)_ij = 2^-(a_i + b_j) (U' V')_ij`` (exact).

Convolutions (engines with a tensor path, ``sum_products``: the secure engine and
:class:`FieldArithmeticMatmul`): a convolution is bilinear, so ``conv(X, W) ~ conv(X_h, W_h) +
(conv(X_l, W_h) + conv(X_h, W_l))`` with the split of step 2 on the *tensors* as sent (the forward's ``X``,
the weight gradient's ``X``) and the norms of the convolution's rule (those of
:func:`~veil.offload.training.protocol.choose_conv_scales`, bracketed from above), so ``conv(X_h, W_h)`` is
exact and the cross sum inside the field. Forward, dX and dW become two tensor items each (a backward's
four in one round); the enclave builds no im2col matrix. Row/column normalisation of ``cols(X)`` is not available on a tensor; instead, all exact powers
of two: (a) the inner dimension is balanced (forward: X's channel ``c`` times ``2^-t_c``, W's input channel
``c`` times ``2^t_c``; dW: sample ``n`` of dY and X; dX: output channel ``o`` of dY and W), which leaves the
product unchanged and brings both factors' norms to the same size along it; (b) the output's axes are
normalised where they stay whole: forward per sample of X (its largest window norm) and per output
channel of W; dX per sample of dY and per input channel of W; dW per output channel of dY and per input
channel of X. The bound is therefore step 3's ``~eps^2`` relative to ``||U_i|| ||V_j||`` with ``U_i``,
``V_j`` the balanced, normalised im2col rows/columns, where the normalisation is per block (sample,
channel) rather than per row: rows of one sample (columns of one channel) whose norms lie far below
that block's largest get correspondingly fewer bits. Measured (tests/test_offload_train_precision_conv.py,
Gaussian operands and 10 decades across samples and channels): max error / max |reference| within each
(sample or output channel, channel) block <= 2.7e-7; asserted < 1e-5.

Security: four secret operands ``U'_h, V'_h, U'_l, V'_l`` are each quantised once and masked once with
fresh uniform masks from their item's seeds, and each share holder receives each masked value once (the
sum item names the high item's ``E`` and ``F`` instead of carrying them again), so what every accelerator
receives is uniform and independent of data, weights and gradients exactly as for two products. Reusing a
masked operand in a second product is safe because the value *and* its mask are the same: the share holder
gains no second view of it, and the triple helper, which knows the masks anyway, computes ``A_l B_h + A_h
B_l`` from the same seeds. The split, the exponents and the scales stay in the enclave; the accelerators
see two products of the same shape instead of one, the second a sum of two (the precision setting is
visible, as the architecture is). Cost per offloaded product: 4 masked operands and 2 results (bytes 2x
single's), 6 of the accelerators' field products of the product's size for a share holder (2 + 4) and 3
for the helper, 2 Freivalds checks; products the engine keeps inside the enclave (``min_intensity``) are
computed once in float64 and not split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.errors import VeilError
from veil.offload.backend import NumpyBackend
from veil.offload.errors import FieldRangeError
from veil.offload.field import HALF, centered
from veil.offload.training.conv_field import ConvSpec, _window_sums, col2im_field, cols, conv_norms
from veil.offload.training.field_ops import conv_norm_bounds
from veil.offload.training.protocol import (
    SCALE_MAX,
    SCALE_MIN,
    MatmulEngine,
    Operand,
    PlainMatmul,
    SumItem,
    _conv_intensity,
    _conv_spec,
    _intensity,
    _maxabs,
    _quantise,
    _rint_scaled,
    _scale_rule,
    field_matmul,
    quantise_pair,
)

__all__ = ["PRECISIONS", "SECURE_PRODUCTS", "DEFAULT_PRECISION", "PrecisionMatmul", "FieldArithmeticMatmul",
           "split_pair", "split_items", "cross_scale", "normalise_exponents", "check_precision"]

PRECISIONS = ("single", "double")  #: one secure field product per product, or two (see module docstring)
SECURE_PRODUCTS = {"single": 1, "double": 2}  #: secure products (accelerator results) per offloaded product
DEFAULT_PRECISION = "double"
_EXP_LIMIT = 200  #: bound on the normalisation exponents (keeps 2^a finite for any float64 input)


def check_precision(precision: object) -> str:
    """The precision name, or a :class:`~veil.errors.VeilError` naming the accepted ones."""
    if precision not in PRECISIONS:
        raise VeilError(f"unknown product precision {precision!r}; choose {' or '.join(PRECISIONS)}")
    return str(precision)


def normalise_exponents(x: np.ndarray, axis: int) -> np.ndarray:
    """Integer exponents ``e`` such that ``2^e`` times each row (``axis=1``) or column (``axis=0``) of ``x``
    has a 2-norm in [1/2, 1) (0 for an all-zero row)."""
    return _exponents(np.einsum("ij,ij->i", x, x) if axis == 1 else np.einsum("ij,ij->j", x, x))


def _exponents(sq: np.ndarray) -> np.ndarray:
    """Exponents ``e`` with ``2^e sqrt(sq)`` in [1/2, 1) (0 where ``sq`` is 0), as :func:`normalise_exponents`."""
    _, e = np.frexp(np.sqrt(sq))
    return np.clip(-e, -_EXP_LIMIT, _EXP_LIMIT).astype(np.int64)


def _balance(su: np.ndarray, sv: np.ndarray) -> np.ndarray:
    """Exponents ``t`` along an inner dimension such that ``2^t sqrt(su)`` and ``2^-t sqrt(sv)`` are within a
    factor 2 (0 where either is 0): scaling ``U`` by ``2^t`` and ``V`` by ``2^-t`` there leaves ``U V`` exactly
    unchanged and brings both factors' norms to the same size."""
    _, eu = np.frexp(np.sqrt(su))
    _, ev = np.frexp(np.sqrt(sv))
    t = np.where((su > 0) & (sv > 0), (ev - eu) // 2, 0)
    return np.clip(t, -_EXP_LIMIT, _EXP_LIMIT).astype(np.int64)


def split_pair(u: np.ndarray, v: np.ndarray, spec: ConvSpec | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(U_h, U_l, V_h, V_l)`` with ``U = U_h + U_l``, ``V = V_h + V_l`` and ``U_h``, ``V_h`` on the grids
    ``2^-fu``, ``2^-fv`` at whose fractional bits :func:`split_items`' high item quantises them, so exactly
    (step 2 of the module docstring); for a convolution item (``spec``; ``u``, ``v`` as sent, tensors for
    ``cols``) with the norms of the convolution's rule, bracketed from above (:func:`_norms`)."""
    uh, vh = _split_high(u, v, spec)[:2]
    return uh, u - uh, vh, v - vh


def _norms(u: np.ndarray, v: np.ndarray, spec: ConvSpec | None) -> tuple[float, float, int, float, float]:
    """``(ru, cv, length, max|U|, max|V|)``: the largest row norm of ``U`` and column norm of ``V`` (for a
    convolution, upper bounds of the norms of :func:`~veil.offload.training.conv_field.conv_norms`, from the
    cheap bracket :func:`~veil.offload.training.field_ops.conv_norm_bounds`, within ~1e-12 relative) and the
    terms per output entry: the inputs of the Cauchy-Schwarz scale rules."""
    if spec is None:
        ru = float(np.sqrt(np.einsum("ij,ij->i", u, u).max())) if u.size else 0.0
        cv = float(np.sqrt(np.einsum("ij,ij->j", v, v).max())) if v.size else 0.0
        return ru, cv, u.shape[1], _maxabs(u), _maxabs(v)
    bounds = conv_norm_bounds(spec, u, v)
    if bounds is None:
        ru, cv, length = conv_norms(spec, u, v)
    else:
        _, ru, _, cv, length = bounds
    return ru, cv, length, _maxabs(u), _maxabs(v)


def _split_high(u: np.ndarray, v: np.ndarray, spec: ConvSpec | None
                ) -> tuple[np.ndarray, np.ndarray, int, int, tuple[float, float, int, float, float], np.ndarray,
                           np.ndarray]:
    """``(U_h, V_h, fu, fv, norms of (U_h, V_h), U_h 2^fu, V_h 2^fv)``: ``U_h = U`` rounded to the grid ``2^-fu`` (so that it is
    exact at ``fu`` fractional bits), ``V_h`` likewise, with ``fu + fv`` as large as the field bound of the pair
    ``(U_h, V_h)`` allows (the protocol's rule, Cauchy-Schwarz checked on ``U_h``, ``V_h`` themselves) and the
    bits shared so that the quantised norms are equal (``2^fu |U| ~ 2^fv |V|``, largest row and column norms):
    that minimises the rounding of the cross item, whose error is ``~ (2^-fu |V| + 2^-fv |U|)(2^fv |V| +
    2^fu |U|)``."""
    ru, cv, length, _, _ = _norms(u, v, spec)
    fu, fv = _scale_rule(ru, cv, ru, cv, length)  # the rule, balanced by the norms instead of the entries
    d = math.sqrt(length) / 2
    for _ in range(8):
        qu, qv = _rint_scaled(u, fu), _rint_scaled(v, fv)  # the quantised high parts, exact integers
        uh, vh = np.ldexp(qu, -fu), np.ldexp(qv, -fv)  # on the grids 2^-fu, 2^-fv
        nh = _norms(uh, vh, spec)
        if (math.ldexp(nh[0], fu) + d) * (math.ldexp(nh[1], fv) + d) < HALF:
            return uh, vh, fu, fv, nh, qu, qv
        if fu >= fv:
            fu -= 1
        else:
            fv -= 1
    raise FieldRangeError(f"values too large for exact field products (max |U| {nh[3]:.3g}, max |V| {nh[4]:.3g})")


def cross_scale(high: tuple[float, float, int, float, float], low: tuple[float, float, int, float, float],
                fu_h: int, fv_h: int) -> int:
    """The output scale ``S`` of the cross item ``U_l V_h + U_h V_l`` (``U_l`` at ``S - fv_h`` fractional bits,
    ``V_l`` at ``S - fu_h``; ``U_h``, ``V_h`` reused at ``fu_h``, ``fv_h``): the largest with
    ``(2^(S - fv_h) |U_l| + d)(2^fv_h |V_h| + d) + (2^fu_h |U_h| + d)(2^(S - fu_h) |V_l| + d) < (p-1)/2``, the
    Cauchy-Schwarz bound of each term summed (one bit below a single product's rule), where ``|.|`` are the
    largest row (U) and column (V) norms and ``d = sqrt(length)/2`` the rounding; ``high``/``low``: the
    :func:`_norms` of ``(U_h, V_h)`` and ``(U_l, V_l)``."""
    ru_h, cv_h, length, _, _ = high
    ru_l, cv_l, _, au_l, av_l = low
    d = math.sqrt(length) / 2
    hu, hv = math.ldexp(ru_h, fu_h) + d, math.ldexp(cv_h, fv_h) + d

    def bound(t: int) -> float:
        return (math.ldexp(ru_l, t - fv_h) + d) * hv + hu * (math.ldexp(cv_l, t - fu_h) + d)

    top = SCALE_MAX + min(fu_h, fv_h)
    den = ru_l * hv * 2.0 ** -fv_h + cv_l * hu * 2.0 ** -fu_h
    rest = HALF - d * (hu + hv)
    t = top if den == 0.0 or rest <= 0 else min(top, math.floor(math.log2(rest / den)))
    while bound(t) >= HALF:
        t -= 1
        if t - max(fu_h, fv_h) < SCALE_MIN:
            raise FieldRangeError(f"values too large for exact field products (max |U_l| {au_l:.3g}, "
                                  f"max |V_l| {av_l:.3g})")
    return t


def split_items(u: np.ndarray, v: np.ndarray, spec: ConvSpec | None = None) -> tuple[SumItem, SumItem]:
    """The two secure products that make ``U V`` at precision ``double``: ``(U_h V_h, U_l V_h + U_h V_l)`` with
    the split of :func:`split_pair`; the high item is exact, and the cross item reuses the high item's
    ``U_h`` and ``V_h`` (same objects: sent once, same masks) at the same fractional bits, at the one output
    scale of :func:`cross_scale`."""
    uh, vh, fu_h, fv_h, nh, q_uh, q_vh = _split_high(u, v, spec)
    ul, vl = u - uh, v - vh
    nl = _norms(ul, vl, spec)
    t = cross_scale(nh, nl, fu_h, fv_h)
    o_uh, o_vh = Operand(uh, fu_h, nh[3], q_uh), Operand(vh, fv_h, nh[4], q_vh)
    o_ul, o_vl = Operand(ul, t - fv_h, nl[3]), Operand(vl, t - fu_h, nl[4])
    return SumItem([(o_uh, o_vh)], spec), SumItem([(o_ul, o_vh), (o_uh, o_vl)], spec)


def _dw_operands(g2: np.ndarray, g2t: np.ndarray, x: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The weight gradient ``dW = dY^T cols(X)`` (``g2`` = dY as (N OH OW) x O, ``g2t`` its transpose) as a
    normalised tensor item: ``(U, X', a, b)`` with ``dW = 2^-(a_o + b_c) (U cols(X'))``. The inner dimension
    (n, oh, ow) is balanced (dY's sample n times ``2^t_n``, X's times ``2^-t_n``), then ``2^a`` per output
    channel (rows of dY^T) and ``2^b`` per input channel c of X (columns (c, i, j) of cols(X))."""
    n = x.shape[0]
    rows = g2.shape[0] // n
    t = _balance(np.einsum("ij,ij->i", g2, g2).reshape(n, -1).sum(1), np.einsum("nchw,nchw->n", x, x))
    uw = np.ldexp(g2t, np.repeat(t, rows)[None, :])
    xw = np.ldexp(x, -t[:, None, None, None])
    a = normalise_exponents(uw, 1)
    b = _exponents(np.einsum("nchw,nchw->c", xw, xw))
    return np.ldexp(uw, a[:, None]), np.ldexp(xw, b[None, :, None, None]), a, b


def _dx_operands(g2: np.ndarray, wm: np.ndarray, n: int, c: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The data gradient ``dX = col2im(dY W)`` (``g2`` = dY as (N OH OW) x O, ``wm`` = W as O x (C kh kw), ``n``
    samples, ``c`` input channels) as a normalised tensor item: ``(U, W', a, b)`` with ``dX[n, c] = 2^-(a_n +
    b_c) col2im(U W')[n, c]``. The inner dimension o is balanced, then ``2^a`` per sample of dY and ``2^b``
    per input channel c of W."""
    o = wm.shape[0]
    rows = g2.shape[0] // n
    t = _balance(np.einsum("ij,ij->j", g2, g2), np.einsum("ij,ij->i", wm, wm))
    ux = np.ldexp(g2, t[None, :])
    w3 = np.ldexp(wm, -t[:, None]).reshape(o, c, -1)
    a = _exponents(np.einsum("ij,ij->i", ux, ux).reshape(n, -1).max(1))
    b = _exponents(np.einsum("ocx,ocx->c", w3, w3))
    return np.ldexp(ux, np.repeat(a, rows)[:, None]), np.ldexp(w3, b[None, :, None]).reshape(o, -1), a, b


class PrecisionMatmul(MatmulEngine):
    """Wraps an engine with ``sum_products`` (:class:`~veil.offload.training.protocol.SecureMatmul`,
    :class:`FieldArithmeticMatmul`): ``single`` passes products through, ``double`` turns each into two secure
    products in the same round, the exact ``U_h V_h`` and the cross sum ``U_l V_h + U_h V_l`` that reuses its
    operands (module docstring). Shares the wrapped engine's ``counters``: ``products`` counts the secure
    products sent, and ``split_products`` the model's products that became two of them. Other engines
    compute every product at their own precision."""

    name = "precision"

    def __init__(self, inner: MatmulEngine, precision: str = DEFAULT_PRECISION):
        super().__init__()
        self.inner = inner
        self.precision = check_precision(precision)
        self.counters = inner.counters
        self.counters.setdefault("split_products", 0)

    def matmul(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.matmuls([(u, v)])[0]

    def _offloads_split(self, u: np.ndarray, v: np.ndarray) -> bool:
        """Whether the product ``U V`` becomes two secure products (double, an engine with ``sum_products``,
        intensity at least the engine's ``min_intensity``)."""
        if self.precision == "single" or not hasattr(self.inner, "sum_products") or not u.size or not v.size:
            return False
        return _intensity(u, v) >= float(getattr(self.inner, "min_intensity", 0.0))

    def matmuls(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        split = [self._offloads_split(u, v) for u, v in pairs]
        if not any(split):
            return self.inner.matmuls(pairs)
        t0 = time.perf_counter()
        normalised: list[tuple[np.ndarray, np.ndarray, ConvSpec | None]] = []
        exps: list[tuple[np.ndarray, np.ndarray] | None] = []
        for (u, v), sp in zip(pairs, split, strict=True):
            if not sp:
                exps.append(None)
                continue
            u = np.asarray(u, dtype=np.float64)
            v = np.asarray(v, dtype=np.float64)
            a, b = normalise_exponents(u, 1), normalise_exponents(v, 0)
            normalised.append((np.ldexp(u, a[:, None]), np.ldexp(v, b[None, :]), None))
            exps.append((a, b))
        self.counters["enclave_s"] += time.perf_counter() - t0
        rest = [pr for pr, sp in zip(pairs, split, strict=True) if not sp]  # kept in the enclave (or empty)
        kept = iter(self.inner.matmuls(rest) if rest else [])
        sums = iter(self._split_round(normalised))
        t1 = time.perf_counter()
        res = []
        for e in exps:
            if e is None:
                res.append(next(kept))
                continue
            res.append(np.ldexp(next(sums), -(e[0][:, None] + e[1][None, :])))
        self.counters["enclave_s"] += time.perf_counter() - t1
        return res

    def _split_round(self, items: Sequence[tuple[np.ndarray, np.ndarray, ConvSpec | None]]) -> list[np.ndarray]:
        """Each product ``(U, V, spec)`` (a matrix product, ``spec`` None, or a convolution item) as two secure
        products, all in one round: ``U V ~ U_h V_h + (U_l V_h + U_h V_l)`` (:func:`split_items`)."""
        t0 = time.perf_counter()
        sent: list[SumItem] = []
        for u, v, spec in items:
            sent += split_items(u, v, spec)
        self.counters["split_products"] += len(items)
        self.counters["enclave_s"] += time.perf_counter() - t0
        outs = self.inner.sum_products(sent)  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        res = [outs[2 * i] + outs[2 * i + 1] for i in range(len(items))]
        self.counters["enclave_s"] += time.perf_counter() - t1
        return res

    # --- convolutions ------------------------------------------------------------------------------
    # single: the wrapped engine's own path (the secure engine masks the tensors, the accelerators do im2col).
    # double, wrapped engine with a tensor path (``sum_products`` of convolution items): each convolution
    # product becomes two tensor items (X_h W_h, and X_l W_h + X_h W_l reusing X_h and W_h) in one round,
    # normalised by powers of two along the axes that stay whole in the output (module docstring,
    # "Convolutions"); no im2col in the enclave.
    # double, other engines: the base path (im2col here, products through :meth:`matmuls`).
    def _tensor_path(self) -> bool:
        return hasattr(self.inner, "sum_products")

    def _below_min_intensity(self, spec: ConvSpec, u: np.ndarray, v: np.ndarray, o: int) -> bool:
        """Whether the wrapped engine keeps the convolution item inside the enclave (its tensors' intensity)."""
        return _conv_intensity(spec, u, v, o) < float(getattr(self.inner, "min_intensity", 0.0))

    def conv_forward(self, x: np.ndarray, w: np.ndarray, strides: tuple[int, int],
                     pads: tuple[int, int, int, int]) -> tuple[np.ndarray, Any]:
        if self.precision == "single" or isinstance(self.inner, PlainMatmul):
            return self.inner.conv_forward(x, w, strides, pads)
        spec = _conv_spec("fwd", x, w, strides, pads)
        o = w.shape[0]
        wt = np.ascontiguousarray(np.asarray(w, dtype=np.float64).reshape(o, -1).T)
        if not self._tensor_path() or self._below_min_intensity(spec, x, wt, o):
            return super().conv_forward(x, w, strides, pads)
        t0 = time.perf_counter()
        x = np.asarray(x, dtype=np.float64)
        (kh, kw), (sh, sw), (oh, ow) = spec.kernel, spec.strides, spec.out_hw
        c, taps = x.shape[1], kh * kw
        # inner dimension (c, i, j): X's channel c times 2^-t_c, W's input channel c times 2^t_c
        t = _balance(np.einsum("ocx,ocx->c", wt.T.reshape(o, c, taps), wt.T.reshape(o, c, taps)),
                     np.einsum("nchw,nchw->c", x, x))
        x = np.ldexp(x, -t[None, :, None, None])
        wt = np.ldexp(wt, np.repeat(t, taps)[:, None])
        # per sample: the largest window (row of cols(X)) norm; per output channel: the column of W^T
        a = _exponents(_window_sums(np.einsum("nchw,nchw->nhw", x, x), kh, kw, sh, sw, oh, ow, spec.pads)
                       .reshape(x.shape[0], -1).max(1))
        b = normalise_exponents(wt, 0)
        self.counters["enclave_s"] += time.perf_counter() - t0
        (y2,) = self._split_round([(np.ldexp(x, a[:, None, None, None]), np.ldexp(wt, b[None, :]), spec)])
        t1 = time.perf_counter()
        y = np.ldexp(y2.reshape(x.shape[0], oh, ow, o), -(a[:, None, None, None] + b[None, None, None, :]))
        y = np.ascontiguousarray(y.transpose(0, 3, 1, 2))
        self.counters["enclave_s"] += time.perf_counter() - t1
        return y, None

    def conv_backward(self, x: np.ndarray, w: np.ndarray, g: np.ndarray, strides: tuple[int, int],
                      pads: tuple[int, int, int, int], ctx: Any, need_dx: bool) -> tuple[np.ndarray | None, np.ndarray]:
        if self.precision == "single" or isinstance(self.inner, PlainMatmul):
            return self.inner.conv_backward(x, w, g, strides, pads, ctx, need_dx)
        o = w.shape[0]
        x = np.asarray(x, dtype=np.float64)
        g2 = np.ascontiguousarray(np.asarray(g, dtype=np.float64).transpose(0, 2, 3, 1).reshape(-1, o))
        g2t = np.ascontiguousarray(g2.T)
        wm = np.asarray(w, dtype=np.float64).reshape(o, -1)
        sdw, sdx = _conv_spec("dw", x, w, strides, pads), _conv_spec("dx", x, w, strides, pads)
        if (not self._tensor_path() or self._below_min_intensity(sdw, g2t, x, o)
                or (need_dx and self._below_min_intensity(sdx, g2, wm, o))):
            return super().conv_backward(x, w, g, strides, pads, cols(x, sdw) if ctx is None else ctx, need_dx)
        t0 = time.perf_counter()
        c, taps = x.shape[1], w.shape[2] * w.shape[3]
        uw, xw, a_w, b_w = _dw_operands(g2, g2t, x)
        items = [(uw, xw, sdw)]
        if need_dx:
            ux, wx, a_x, b_x = _dx_operands(g2, wm, x.shape[0], c)
            items.append((ux, wx, sdx))
        self.counters["enclave_s"] += time.perf_counter() - t0
        outs = self._split_round(items)
        t1 = time.perf_counter()
        dw = np.ldexp(outs[0].reshape(o, c, taps), -(a_w[:, None, None] + b_w[None, :, None])).reshape(w.shape)
        dx = None
        if need_dx:
            dx = np.ascontiguousarray(np.ldexp(outs[1], -(a_x[:, None, None, None] + b_x[None, :, None, None])))
        self.counters["enclave_s"] += time.perf_counter() - t1
        return dx, dw

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class FieldArithmeticMatmul(MatmulEngine):
    """The secure engine's arithmetic without masks, accelerators or checks (benchmarks of accuracy only).

    :class:`~veil.offload.training.protocol.SecureMatmul` returns ``centered(U_q V_q mod p) 2^-(fu+fv)``
    with ``U_q, V_q`` from :func:`~veil.offload.training.protocol.quantise_pair`; the masks cancel exactly
    and the Cauchy-Schwarz scales rule out wrap-around, so that is the exact integer product ``U_q V_q``
    scaled. This engine computes the same value directly (one exact field product, float64 limbs), so a
    training run through it is bit-for-bit the run through the protocol at a fraction of the cost
    (tested: ``test_the_arithmetic_engine_reproduces_the_protocol_bit_for_bit``) -- at precision
    ``double`` (convolutions too, through :meth:`sum_products` with the split's scales),
    and for products at ``single``; at ``single`` a convolution here is the base im2col path (matrix scale
    rule), which does not reproduce the secure engine's tensor items.
    It protects nothing and is never used by ``veil offload train`` or a deployment."""

    name = "field-arithmetic"

    def __init__(self, min_intensity: float = 0.0):
        super().__init__()
        self.min_intensity = float(min_intensity)
        self.local = PlainMatmul()
        self._np = NumpyBackend()

    def matmul(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        if self.min_intensity > 0 and _intensity(u, v) < self.min_intensity:
            self.counters["local_products"] = self.counters.get("local_products", 0) + 1
            out = self.local.matmul(u, v)
        else:
            fu, fv, uq, vq = quantise_pair(u, v)
            out = centered(field_matmul(self._np, uq, vq)).astype(np.float64) * 2.0 ** -(fu + fv)
            self.counters["products"] += 1
            self.counters["macs"] += u.shape[0] * u.shape[1] * v.shape[1]
        self.counters["enclave_s"] += time.perf_counter() - t0
        return out

    def sum_products(self, items: list[SumItem]) -> list[np.ndarray]:
        """The secure engine's sum items (:meth:`~veil.offload.training.protocol.SecureMatmul.sum_products`)
        computed directly: each operand quantised at its fractional bits, the exact sum of the terms' integer
        products mod p (im2col here, ``col2im`` mod p for ``dx``), centred and scaled: the same values bit for bit."""
        res = []
        for it in items:
            t0 = time.perf_counter()
            spec = it.spec
            pairs = []
            frac = 0
            for ou, ov in it.terms:
                if ou.frac is None or ov.frac is None:
                    raise ValueError("sum_products needs the fractional bits of every operand")
                uq, vq = _quantise(ou.x, ou.frac), _quantise(ov.x, ov.frac)
                frac = ou.frac + ov.frac
                if spec is not None and spec.op == "fwd":
                    uq = cols(uq, spec)
                elif spec is not None and spec.op == "dw":
                    vq = cols(vq, spec)
                pairs.append((uq, vq))
                n, k, m = (ou.x.shape[0], ou.x.shape[1], ov.x.shape[1]) if spec is None else \
                    spec.item_shape(ou.x.shape, ov.x.shape)
                self.counters["macs"] += n * k * m
            z = self._np.field_matmul_sum(pairs)
            if spec is not None and spec.op == "dx":
                z = col2im_field(z, spec)
            res.append(centered(z).astype(np.float64) * 2.0 ** -frac)
            self.counters["products"] += 1
            self.counters["enclave_s"] += time.perf_counter() - t0
        return res
