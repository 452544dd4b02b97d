"""Private matrix products for training: Beaver-style masking across three untrusted accelerators.

Training needs three products per linear or convolution layer (forward ``Y = X W^T``, backward
``dX = dY W`` and ``dW = dY^T X``), and both factors are secret: the data and the weights (which carry
the data after the first update). The enclave computes ``U @ V`` for secret ``U`` (n x k) and ``V``
(k x m) like this (all arithmetic in F_p, p = 2^31 - 1, see :mod:`veil.offload.field`):

1. quantise ``U_q = round(U 2^fu)``, ``V_q = round(V 2^fv)`` with ``fu, fv`` chosen per product so that
   every entry of ``U_q V_q`` provably lies in (-p/2, p/2) (Cauchy-Schwarz bound on the quantised rows
   and columns, :func:`choose_scales`);
2. draw four uniform masks from fresh 32-byte seeds (AES-256-CTR): ``A0, A1`` (n x k), ``B0, B1``
   (k x m); ``A = A0 + A1``, ``B = B0 + B1``; open ``E = U_q - A`` and ``F = V_q - B``;
3. one round, three accelerators in parallel:

   * ``accelerator2`` (the triple helper, Goten's third server) gets both seeds and the shape, first
     (before the enclave masks, so it computes while the enclave works), expands ``A, B`` and returns
     ``C = A B``;
   * ``accelerator0`` gets ``E, F`` and the seed of ``(A0, B0)``, returns ``Z0 = E (F + B0) + A0 F``;
   * ``accelerator1`` gets ``E, F`` and the seed of ``(A1, B1)``, returns ``Z1 = E B1 + A1 F``;

4. ``U_q V_q = Z0 + Z1 + C`` (since ``EF + EB + AF + AB = (E + A)(F + B)``), lifted to (-p/2, p/2];
5. Freivalds on the result, with a secret uniform ``s`` (m x reps) drawn after the answers arrived, fresh per
   round and shared by the round's products with ``m`` columns (a wrong row still passes with probability
   ``p^-reps``, whatever the other products): ``(Z0 + Z1 + C) s == U_q (V_q s)``: one float64 BLAS pass over
   ``U_q`` and one over the result, exact with limbs (:func:`exact_matvec`); convolution items use
   tensor-product vectors (:class:`~veil.offload.training.conv_field.ConvCheck`). Only if it fails are the
   three answers checked one by one
   (``Z0 s == E((F + B0) s) + A0 (F s)``, ``Z1 s == E (B1 s) + A1 (F s)``, ``C s == A (B s)``, same ``s``:
   the three expectations add up to the checked one, so at least one fails) to name the culprit;
6. divide by ``2^(fu + fv)``.

What each accelerator sees is uniform and independent of ``U`` and ``V``: accelerator0's ``E`` is
masked by ``A1`` and its ``F`` by ``B1``, which it never sees (and symmetrically for accelerator1);
accelerator2 sees only the masks (it learns ``A, B`` from the two seeds). Any two of them together
recover ``U`` and ``V``: the three must not collude pairwise. The enclave's work is O(nk + km + nm) (masks, subtractions, one check, sum); the
accelerators do the O(nkm) products. Because the masks cancel exactly in F_p, the result does not
depend on them: a training step is bit-for-bit reproducible from the data, weights and scales.

Sum items (:class:`SumItem`, :meth:`SecureMatmul.sum_products`; used at precision ``double``): one result
``sum_t U_t V_t`` for several terms of one shape and one output scale. Each item still sends one masked
``E`` and ``F`` (its new operands, masks from its own seeds); a term may instead name the ``E`` or ``F`` of
an earlier item of the round of the same shape and convolution, which it then reuses with that item's masks
(same value, same mask: nothing new reaches any accelerator). The share holders return ``sum_t E_t (F_t + B0_t) + A0_t F_t`` and
``sum_t E_t B1_t + A1_t F_t``, the helper ``sum_t A_t B_t`` (:func:`expected_sum`); the enclave lifts the one
sum and checks ``Z s == sum_t U_t,q (V_t,q s)``; the blame path recomputes each answer's expectation over
the terms. The caller's scales must keep the sum inside (-p/2, p/2) (Cauchy-Schwarz on each term, summed).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from veil.errors import ChannelError, IntegrityError
from veil.net.channel import Channel
from veil.offload.backend import MAX_INNER_KARATSUBA, Backend, Im2col, NumpyBackend
from veil.offload.errors import AcceleratorProtocolError, AcceleratorUnavailableError, FieldRangeError
from veil.offload.field import HALF, MAX_INNER_FULL, P, uniform_field
from veil.offload.runtime import EnclaveRuntime
from veil.offload.training.conv_field import ConvCheck, ConvSpec, cols, conv_norms
from veil.offload.training.field_ops import conv_norm_bounds, exact_matvec, mask_pair, masks_u32
from veil.offload.training.field_ops import lift as _lift
from veil.offload.training.field_ops import maxabs as _maxabs
from veil.offload.training.field_ops import rint_scaled as _rint_scaled

__all__ = ["TRAIN_ACCELERATORS", "field_matmul", "expand_masks", "choose_scales", "choose_conv_scales", "MatmulEngine",
           "field_matvec", "quantise_pair", "PlainMatmul", "SecureMatmul", "ProductRecord", "masks_u32", "exact_matvec",
           "product_intensity", "Operand", "SumItem", "expected_sum", "SCALE_MIN", "SCALE_MAX", "MAX_INNER_KARATSUBA"]

#: party names: two share holders and the triple helper
TRAIN_ACCELERATORS = ("accelerator0", "accelerator1", "accelerator2")
_NP = NumpyBackend()
SCALE_MIN, SCALE_MAX = -24, 40  #: range of the fractional bits fu, fv


def field_matmul(backend: Backend, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``u @ v mod p`` for field elements (int64 in [0, p)), exact in float64.

    With 16-bit limbs ``u = u1 2^16 + u0``, ``v = v1 2^16 + v0``, Karatsuba needs three float64
    products: ``u1 v1``, ``u0 v0`` and ``(u1 + u0)(v1 + v0)`` (17-bit sums, so partial sums stay below
    2^53 while the inner dimension is < 2^19); ``2^32 = 2 (mod p)``. Wider products fall back to the four
    limb products of :func:`veil.offload.field.mul_full` (inner dimension < 2^21). Delegates to
    :meth:`veil.offload.backend.Backend.field_matmul`."""
    return backend.field_matmul(u, v)


def field_matvec(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``m @ s mod p`` for a field matrix ``m`` (r x k) and a few field columns ``s`` (k x t), exactly in
    int64 (the Freivalds side: O(rk) work). ``s`` is split into 16-bit limbs; each partial product is
    < 2^47, and chunks of 2^15 terms keep every partial sum below 2^63."""
    s_hi, s_lo = s >> 16, s & 0xFFFF
    out = np.zeros((m.shape[0], s.shape[1]), np.int64)
    step = 1 << 15
    for c in range(0, m.shape[1], step):
        blk = m[:, c:c + step]
        hi = (blk @ s_hi[c:c + step]) % P
        lo = (blk @ s_lo[c:c + step]) % P
        out = (out + hi * (1 << 16) + lo) % P
    return out


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a + b) % P


def expand_masks(seed: bytes, n: int, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """A share holder's masks ``(A_j (n x k), B_j (k x m))``, uniform in F_p, from its 32-byte seed."""
    r = uniform_field(seed, n * k + k * m)
    return r[: n * k].reshape(n, k), r[n * k:].reshape(k, m)


def choose_scales(u: np.ndarray, v: np.ndarray) -> tuple[int, int]:
    """Fractional bits ``(fu, fv)`` for one product (see :func:`quantise_pair`)."""
    fu, fv, _, _ = _scales(u, v)
    return fu, fv


def choose_conv_scales(spec: ConvSpec, u: np.ndarray, v: np.ndarray) -> tuple[int, int]:
    """Fractional bits ``(fu, fv)`` the secure engine uses for the convolution item ``(u, v, spec)`` (``u``,
    ``v`` as sent: the tensor for ``cols``): the rule of :func:`quantise_pair` on the norms of
    :func:`~veil.offload.training.conv_field.conv_norms`.

    The norms are first bracketed cheaply (:func:`~veil.offload.training.field_ops.conv_norm_bounds`). The rule
    is monotone in ``(ru, cv)`` (``total`` falls and the loop's condition rises with each), and the sequence of
    ``(fu, fv)`` the loop visits does not depend on them, so when both ends of the brackets give the same
    ``(fu, fv)``, so does every value in between, ``conv_norms``'s included; otherwise ``conv_norms`` decides."""
    fu, fv, _, _ = _conv_scales(spec, u, v)
    return fu, fv


def _conv_scales(spec: ConvSpec, u: np.ndarray, v: np.ndarray) -> tuple[int, int, float, float]:
    """``(fu, fv, max|U|, max|V|)``: :func:`choose_conv_scales` and the maxima it reads (as :func:`_scales`)."""
    au, av = _maxabs(u), _maxabs(v)
    bounds = conv_norm_bounds(spec, u, v)
    if bounds is not None:
        ru_lo, ru_hi, cv_lo, cv_hi, length = bounds
        try:
            low = _scale_rule(ru_lo, cv_lo, au, av, length)
            if low == _scale_rule(ru_hi, cv_hi, au, av, length):
                return low[0], low[1], au, av
        except (FieldRangeError, ArithmeticError):
            pass
    ru, cv, length = conv_norms(spec, u, v)
    fu, fv = _scale_rule(ru, cv, au, av, length)
    return fu, fv, au, av


def quantise_pair(u: np.ndarray, v: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``(fu, fv, U_q, V_q)``: fractional bits for one product, as many as fit, shared so that both
    operands get about the same relative precision (``fu - fv ~ log2(max|V| / max|U|)``), and the
    operands quantised to field elements (int64 in [0, p), negatives as ``p - |x|``).

    Guarantee, entry by entry: ``|(U_q V_q)_ij| <= ||U_q row i||_2 ||V_q col j||_2`` (Cauchy-Schwarz)
    ``<= (2^fu max_i ||U_i||_2 + sqrt(k)/2) (2^fv max_j ||V_j||_2 + sqrt(k)/2) < (p-1)/2`` (rounding moves
    each entry by at most 1/2), so the exact product never wraps around the field."""
    fu, fv, _, _ = _scales(u, v)
    return fu, fv, _quantise(u, fu), _quantise(v, fv)


def _scales(u: np.ndarray, v: np.ndarray) -> tuple[int, int, float, float]:
    """``(fu, fv, max|U|, max|V|)``: the scale rule of :func:`quantise_pair`."""
    ru = float(np.sqrt(np.einsum("ij,ij->i", u, u).max())) if u.size else 0.0
    cv = float(np.sqrt(np.einsum("ij,ij->j", v, v).max())) if v.size else 0.0
    au, av = _maxabs(u), _maxabs(v)
    fu, fv = _scale_rule(ru, cv, au, av, u.shape[1])
    return fu, fv, au, av


def _scale_rule(ru: float, cv: float, au: float, av: float, length: int) -> tuple[int, int]:
    """Fractional bits for output entries that are inner products of ``length`` terms between vectors of
    2-norm <= ``ru`` (entries of U) and <= ``cv`` (entries of V): ``(2^fu ru + sqrt(length)/2)
    (2^fv cv + sqrt(length)/2) < (p-1)/2``."""
    if ru == 0.0 or cv == 0.0:
        return SCALE_MAX // 2, SCALE_MAX // 2
    total = math.floor(math.log2(HALF / (ru * cv)))
    fu = min(max(round((total + math.log2(av / au)) / 2), SCALE_MIN), SCALE_MAX)
    fv = min(max(total - fu, SCALE_MIN), SCALE_MAX)
    slack = math.sqrt(length) / 2
    while (2.0**fu * ru + slack) * (2.0**fv * cv + slack) >= HALF:
        if fu <= SCALE_MIN and fv <= SCALE_MIN:
            raise FieldRangeError(f"values too large for exact field products (max |U| {au:.3g}, max |V| {av:.3g})")
        if fu >= fv:
            fu -= 1
        else:
            fv -= 1
    return fu, fv


def _quantise(x: np.ndarray, f: int) -> np.ndarray:
    q = np.rint(x * 2.0**f)
    np.add(q, P, out=q, where=q < 0)  # exact in float64: |q| < 2^31
    return q.astype(np.int64)


def _intensity(u: np.ndarray, v: np.ndarray) -> float:
    return product_intensity(u.shape[0], u.shape[1], v.shape[1])


def product_intensity(n: int, k: int, m: int) -> float:
    """Arithmetic intensity ``nkm / (nk + km + nm)`` of an n x k x m product: the engines keep products below
    their ``min_intensity`` in the enclave."""
    return n * k * m / max(n * k + k * m + n * m, 1)


@dataclass
class ProductRecord:
    """Per-product figures (for error measurement and tests)."""

    shape: tuple[int, int, int]
    fu: int
    fv: int


class MatmulEngine:
    """Computes ``U @ V`` for the training layers. Subclasses: plain (enclave-only) and secure."""

    name = "abstract"

    def __init__(self) -> None:
        self.counters: dict[str, float] = {"products": 0, "macs": 0, "enclave_s": 0.0, "wait_s": 0.0}

    def matmul(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def matmuls(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Several independent products (one accelerator round in the secure engine)."""
        return [self.matmul(u, v) for u, v in pairs]

    # convolutions: here by im2col in the caller's process and :meth:`matmuls`; the secure engine
    # overrides them (masks the tensors, the accelerators do im2col, see conv_field)
    def conv_forward(self, x: np.ndarray, w: np.ndarray, strides: tuple[int, int],
                     pads: tuple[int, int, int, int]) -> tuple[np.ndarray, Any]:
        """NCHW convolution without bias: ``(y, ctx)``; ``ctx`` goes to :meth:`conv_backward`."""
        spec = _conv_spec("fwd", x, w, strides, pads)
        o = w.shape[0]
        mat = cols(x, spec)
        return _rows_to_nchw(self.matmul(mat, w.reshape(o, -1).T), spec), mat

    def conv_backward(self, x: np.ndarray, w: np.ndarray, g: np.ndarray, strides: tuple[int, int],
                      pads: tuple[int, int, int, int], ctx: Any, need_dx: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """``(dX or None, dW)`` for the gradient ``g`` (N x O x OH x OW) of the output, in one round."""
        o = w.shape[0]
        g2 = g.transpose(0, 2, 3, 1).reshape(-1, o)
        if not need_dx:
            (dw,) = self.matmuls([(g2.T, ctx)])
            return None, dw.reshape(w.shape)
        dcols, dw = self.matmuls([(g2, w.reshape(o, -1)), (g2.T, ctx)])
        return _col2im(dcols, x, w, strides, pads), dw.reshape(w.shape)


def _rows_to_nchw(y: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """A forward convolution's product ``cols(X) W^T`` ((N OH OW) x O) as the NCHW output (C order)."""
    (oh, ow), n = spec.out_hw, spec.x_shape[0]
    return np.ascontiguousarray(y.reshape(n, oh, ow, y.shape[1]).transpose(0, 3, 1, 2))


def _col2im(dcols: np.ndarray, x: np.ndarray, w: np.ndarray, strides: tuple[int, int],
            pads: tuple[int, int, int, int]) -> np.ndarray:
    """dX of a convolution from the float product ``dcols = dY W`` ((N OH OW) x (C kh kw)), by
    :func:`veil.offload.training.layers.col2im`."""
    from veil.offload.training.layers import col2im  # layers imports this module

    n, c, kh, kw = x.shape[0], x.shape[1], w.shape[2], w.shape[3]
    oh, ow = _conv_spec("dx", x, w, strides, pads).out_hw
    d5 = dcols.reshape(n, oh, ow, c, kh * kw).transpose(0, 3, 1, 2, 4)
    return np.ascontiguousarray(col2im(d5, x.shape, (kh, kw), strides, pads))


def _conv_intensity(spec: ConvSpec, u: np.ndarray, v: np.ndarray, o: int) -> float:
    n, k, m = spec.matrix_shape(o)
    out = math.prod(spec.out_shape(n, m))
    return n * k * m / max(u.size + v.size + out, 1)


def expected_sum(backend: Backend, role: int, sources: Sequence[tuple[np.ndarray | None, np.ndarray | None,
                                                                      tuple[bytes, ...]]],
                 terms: Sequence[tuple[int, int]], spec: ConvSpec | None,
                 shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """What accelerator ``role`` owes for a sum item ``sum_t U_t V_t`` (uint32): each term ``(iu, iv)`` takes its
    U operand (``E`` and masks ``A_j``) from source ``iu`` and its V operand (``F``, ``B_j``) from source ``iv``;
    a source is an item of the round as ``(E, F, seeds)`` (``E``, ``F`` None for role 2; ``seeds``: the role's
    own seed first for roles 0 and 1, both for role 2), all of one shape and convolution; ``E``, ``F``, ``A_j``,
    ``B_j`` go through ``cols`` as the convolution ``spec`` says (the backend builds it on its device,
    :class:`veil.offload.backend.Im2col`) and ``T`` is ``col2im`` for a data gradient (identity otherwise); a
    one-term item is ``sources=[(E, F, seeds)]``, ``terms=[(0, 0)]``. Role 0 owes
    ``T(sum_t E_t (F_t + B0_t) + A0_t F_t)``, role 1 ``T(sum_t E_t B1_t + A1_t F_t)``, role 2 ``T(sum_t A_t B_t)``:
    their sum is ``T(sum_t (E_t + A_t)(F_t + B_t))``. The pairs go to the backend joined along the inner
    dimension, in groups that keep it below the Karatsuba limit (the group results are added mod p)."""
    if role == 2:
        su, sv = _raw_shapes(spec, shape)
    else:
        e0, f0 = sources[0][0], sources[0][1]
        if e0 is None or f0 is None:
            raise ValueError("a share holder's answer needs E and F")
        su, sv = e0.shape, f0.shape
    nu = math.prod(su)
    sp = spec
    inner = su[1] if sp is None else sp.item_shape(su, sv)[1] if role != 2 or shape is None else shape[1]
    wrapped: dict[tuple[str, int], Any] = {}
    drawn: dict[int, tuple[np.ndarray, ...]] = {}

    def on_u(key: tuple[str, int], x: Any) -> Any:  # a tensor's cols() for a forward convolution, one object per operand
        if key not in wrapped:
            wrapped[key] = Im2col(x, sp) if sp is not None and sp.op == "fwd" else x
        return wrapped[key]

    def on_v(key: tuple[str, int], x: Any) -> Any:  # ... for a weight gradient
        if key not in wrapped:
            wrapped[key] = Im2col(x, sp) if sp is not None and sp.op == "dw" else x
        return wrapped[key]

    def masks(i: int) -> tuple[np.ndarray, ...]:  # (A_j, B_j) of source i; role 2: (A0, B0, A1, B1)
        if i not in drawn:
            out: list[np.ndarray] = []
            seeds = sources[i][2]
            for sd in (seeds[:2] if role == 2 else (seeds[role] if len(seeds) > 1 else seeds[0],)):
                r = masks_u32(sd, nu + math.prod(sv))
                out += [r[:nu].reshape(su), r[nu:].reshape(sv)]
            drawn[i] = tuple(out)
        return drawn[i]

    back = sp if sp is not None and sp.op == "dx" else None
    pairs: list[tuple[Any, Any]] = []
    for iu, iv in terms:
        if role == 2:  # A = A0 + A1, B = B0 + B1 (summed on the device)
            (a0, _, a1, _), (_, b0, _, b1) = masks(iu), masks(iv)
            pairs.append((on_u(("a", iu), (a0, a1)), on_v(("b", iv), (b0, b1))))
            continue
        e, f = sources[iu][0], sources[iv][1]
        a_j, b_j = masks(iu)[0], masks(iv)[1]
        pairs.append((on_u(("e", iu), e), on_v(("fb", iv), (f, b_j)) if role == 0 else on_v(("b", iv), b_j)))
        pairs.append((on_u(("a", iu), a_j), on_v(("f", iv), f)))
    group = max(1, (MAX_INNER_KARATSUBA - 1) // max(inner, 1))
    z: Any = None
    for g0 in range(0, len(pairs), group):
        zg = np.asarray(backend.field_matmul_sum(pairs[g0:g0 + group], dtype=np.uint32, col2im=back))
        z = zg if z is None else _add(z.astype(np.int64), zg.astype(np.int64))
    return np.asarray(z).astype(np.uint32, copy=False)


def _raw_shapes(spec: ConvSpec | None, shape: tuple[int, int, int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if shape is None:
        raise ValueError("the triple helper's item needs its shape")
    n, k, m = shape
    return ((n, k), (k, m)) if spec is None else spec.raw_shapes(n, k, m)


def _conv_spec(op: str, x: np.ndarray, w: np.ndarray, strides: Any, pads: Any) -> ConvSpec:
    n, c, h, wd = x.shape
    return ConvSpec(op, (int(n), int(c), int(h), int(wd)), (int(w.shape[2]), int(w.shape[3])),
                    (int(strides[0]), int(strides[1])), tuple(int(q) for q in pads))  # type: ignore[arg-type]


class PlainMatmul(MatmulEngine):
    """Everything in the enclave, float64 (the 'enclave-only' baseline and the reference)."""

    name = "enclave-only"

    def matmul(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = u.astype(np.float64, copy=False) @ v.astype(np.float64, copy=False)
        self.counters["products"] += 1
        self.counters["macs"] += u.shape[0] * u.shape[1] * v.shape[1]
        self.counters["enclave_s"] += time.perf_counter() - t0
        return out


@dataclass(eq=False)
class Operand:
    """A secret factor of a round's products, quantised at ``frac`` fractional bits (``x_q = round(x 2^frac)``).
    The same object in several terms of one round is quantised, masked and sent once, and every term that
    names it uses that one masked value (same value, same mask: see :class:`SumItem`). ``frac=None``: the
    engine's scale rule for a one-term item (:func:`quantise_pair`, :func:`choose_conv_scales`)."""

    x: np.ndarray
    frac: int | None = None
    amax: float | None = None  #: ``max |x|`` when the caller has it (else computed)
    q: np.ndarray | None = None  #: ``x_q = rint(x 2^frac)`` (float64, C order) when the caller has it (else computed)


@dataclass
class SumItem:
    """One secure product of a round: ``sum_t U_t V_t`` over ``terms`` (pairs of :class:`Operand`), all of one
    shape (and, for a convolution, one ``spec``: ``U``, ``V`` as :class:`~veil.offload.training.conv_field.ConvSpec`
    says), returned as one result. Every term has the same output scale ``frac(U_t) + frac(V_t)``, and the
    caller chooses the scales so that ``|sum_t (U_t,q V_t,q)_ij| < (p-1)/2`` (Cauchy-Schwarz on each term, e.g.
    :func:`~veil.offload.training.precision.split_items`). On the wire an item sends exactly one operand on
    each side that no earlier item of the round sent (its ``E`` and ``F``); its other terms name the earlier
    items whose ``E`` / ``F`` they reuse."""

    terms: list[tuple[Operand, Operand]]
    spec: ConvSpec | None = None


@dataclass
class _Pending:
    terms: list[tuple[np.ndarray, float, np.ndarray, float]]  # per term (U_q, max|U_q|, V_q, max|V_q|), float64 integers
    refs: list[tuple[int, int]]  # per term: the items of the round whose E (U side) and F (V side) it uses
    seeds: tuple[bytes, bytes]
    e: np.ndarray  # what the share holders received (uint32), kept for naming a culprit
    f: np.ndarray
    frac: int  # output scale: frac(U_t) + frac(V_t) of every term
    shape: tuple[int, int, int] = (0, 0, 0)
    spec: ConvSpec | None = None  # a convolution item's geometry (None: a plain product)


#: an item's wire plan: the operand it sends on each side, per term the items whose E / F it uses, its (n, k, m)
_ItemPlan = tuple[Operand, Operand, list[tuple[int, int]], tuple[int, int, int]]


def _wire_plan(items: list[SumItem]) -> list[_ItemPlan]:
    """Per item: the operand it sends on each side (the one no earlier item sent), per term the items whose
    ``E`` / ``F`` it uses, and its shape ``(n, k, m)``; ``ValueError`` for items the wire cannot carry."""
    sent_u: dict[int, int] = {}
    sent_v: dict[int, int] = {}
    plan: list[_ItemPlan] = []
    for i, it in enumerate(items):
        if not it.terms:
            raise ValueError("a secure product needs at least one term")
        new_u = list({id(a): a for a, _ in it.terms if id(a) not in sent_u}.values())
        new_v = list({id(b): b for _, b in it.terms if id(b) not in sent_v}.values())
        if len(new_u) != 1 or len(new_v) != 1:
            raise ValueError("each secure product sends exactly one new operand on each side (the others reuse "
                             "operands of earlier products of the round)")
        own_u, own_v = new_u[0], new_v[0]
        sent_u[id(own_u)], sent_v[id(own_v)] = i, i
        u, v, spec = own_u.x, own_v.x, it.spec
        if spec is None:
            if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
                raise ValueError(f"product shapes do not match: {u.shape} @ {v.shape}")
            n, k, m = u.shape[0], u.shape[1], v.shape[1]
        else:
            n, k, m = spec.item_shape(u.shape, v.shape)
        if k >= MAX_INNER_FULL:
            raise FieldRangeError(f"inner dimension {k} too large for exact field products (< {MAX_INNER_FULL})")
        refs = [(sent_u[id(a)], sent_v[id(b)]) for a, b in it.terms]
        fracs = {None if a.frac is None or b.frac is None else a.frac + b.frac for a, b in it.terms}
        for a, b in it.terms:
            if a.x.shape != u.shape or b.x.shape != v.shape:
                raise ValueError("the terms of a secure product must have operands of one shape")
        if any(items[iu].spec != spec or items[iv].spec != spec for iu, iv in refs):
            raise ValueError("a reused operand must come from a product of the same convolution")
        # a reused E / F comes with the masks of its item's seeds, drawn at that item's offsets: same shape only
        if any(src != i and plan[src][3] != (n, k, m) for ref in refs for src in ref):
            raise ValueError(f"a reused operand must come from a product of the same shape ({n} x {k} x {m})")
        if len(it.terms) > 1 and (len(fracs) != 1 or None in fracs):
            raise ValueError("the terms of a secure product need one output scale (frac(U) + frac(V))")
        plan.append((own_u, own_v, refs, (n, k, m)))
    return plan


def _item_msg(i: int, role: int, refs: list[tuple[int, int]], spec: ConvSpec | None, **fields: Any) -> dict[str, Any]:
    """Item ``i`` of a request to accelerator ``role``: ``id``, ``role``, the role's ``fields``, then ``conv`` for a
    convolution and ``terms`` for an item that is not one product of its own operands."""
    msg: dict[str, Any] = {"id": i, "role": role, **fields}
    if spec is not None:
        msg["conv"] = spec.as_msg()
    if refs != [(i, i)]:
        msg["terms"] = _wire_terms(i, refs)
    return msg


def _wire_terms(i: int, refs: list[tuple[int, int]]) -> list[list[Any]]:
    """The ``terms`` field of item ``i``: per term ``[u, v]``, ``"e"`` / ``"f"`` for the item's own ``E`` / ``F``,
    else the id of the earlier item of the round whose ``E`` / ``F`` the term reuses."""
    return [["e" if iu == i else iu, "f" if iv == i else iv] for iu, iv in refs]


class SecureMatmul(MatmulEngine):
    """The enclave's side of the three-accelerator protocol (module docstring) over ``channel``."""

    name = "offload"

    def __init__(self, channel: Channel, runtime: EnclaveRuntime, accelerators: tuple[str, ...] = TRAIN_ACCELERATORS,
                 freivalds_reps: int = 1, timeout: float = 60.0, min_intensity: float = 0.0):
        super().__init__()
        #: products with arithmetic intensity ``nkm / (nk + km + nm)`` below this stay in the enclave
        #: (float64): masking and checking them would cost the enclave more than computing them
        self.min_intensity = float(min_intensity)
        self.local = PlainMatmul()
        if len(accelerators) != 3:
            raise ValueError(f"offload training needs three accelerators (two share holders and a triple helper), "
                             f"got {accelerators}")
        if freivalds_reps < 1:
            raise ValueError("freivalds_reps must be >= 1")
        self.ch, self.runtime, self.accs = channel, runtime, tuple(accelerators)
        self.reps, self.timeout = int(freivalds_reps), float(timeout)
        self.round = 0
        self.records: list[ProductRecord] = []
        self.counters.update({"rounds": 0, "freivalds_checks": 0})

    @property
    def soundness_error(self) -> float:
        """Probability that a wrong result row passes the check (per row, per product); a wrong
        convolution result passes its tensor-product check with probability at most ``(4/p)^reps``."""
        return float(P) ** -self.reps

    def matmul(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.matmuls([(u, v)])[0]

    def matmuls(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        if self.min_intensity > 0:
            small = [_intensity(u, v) < self.min_intensity for u, v in pairs]
            if any(small):
                local = iter(self._in_enclave(pairs, small))
                rest = [p for p, sm in zip(pairs, small, strict=True) if not sm]
                outs = iter(self._offload(rest) if rest else [])
                return [next(local) if sm else next(outs) for sm in small]
        return self._offload(pairs)

    def _in_enclave(self, pairs: list[tuple[np.ndarray, np.ndarray]], small: list[bool]) -> list[np.ndarray]:
        """The products of ``pairs`` flagged in ``small``, in order, computed in the enclave (float64; intensity
        below ``min_intensity``), counted as ``local_products`` and in ``enclave_s``."""
        out = [self.local.matmul(u, v) for (u, v), sm in zip(pairs, small, strict=True) if sm]
        self.counters["local_products"] = self.counters.get("local_products", 0) + sum(small)
        self.counters["enclave_s"] += self.local.counters["enclave_s"]
        self.local.counters["enclave_s"] = 0.0
        return out

    # --- convolutions: tensors masked, im2col/col2im on the accelerators (conv_field) ----------------
    def conv_forward(self, x: np.ndarray, w: np.ndarray, strides: tuple[int, int],
                     pads: tuple[int, int, int, int]) -> tuple[np.ndarray, Any]:
        spec = _conv_spec("fwd", x, w, strides, pads)
        o = w.shape[0]
        wt = np.ascontiguousarray(w.reshape(o, -1).T)
        if _conv_intensity(spec, x, wt, o) < self.min_intensity:
            return super().conv_forward(x, w, strides, pads)
        (y2,) = self._offload([(x, wt, spec)])
        return _rows_to_nchw(y2, spec), None

    def conv_backward(self, x: np.ndarray, w: np.ndarray, g: np.ndarray, strides: tuple[int, int],
                      pads: tuple[int, int, int, int], ctx: Any, need_dx: bool) -> tuple[np.ndarray | None, np.ndarray]:
        o = w.shape[0]
        g2 = np.ascontiguousarray(g.transpose(0, 2, 3, 1).reshape(-1, o))
        g2t = np.ascontiguousarray(g2.T)
        wm = w.reshape(o, -1)
        sdw = _conv_spec("dw", x, w, strides, pads)
        items: list[tuple[np.ndarray, np.ndarray, ConvSpec | None]] = []
        if need_dx:
            sdx = _conv_spec("dx", x, w, strides, pads)
            items.append((g2, wm, sdx) if _conv_intensity(sdx, g2, wm, o) >= self.min_intensity else
                         (g2, wm, None))
        items.append((g2t, x, sdw) if _conv_intensity(sdw, g2t, x, o) >= self.min_intensity else
                      (g2t, cols(x, sdw) if ctx is None else ctx, None))
        outs = self._products(items)
        dw = outs[-1].reshape(w.shape)
        if not need_dx:
            return None, dw
        if items[0][2] is not None:
            return outs[0], dw
        return _col2im(outs[0], x, w, strides, pads), dw  # dX stayed a plain product (low intensity)

    def _products(self, items: list[tuple[np.ndarray, np.ndarray, ConvSpec | None]]) -> list[np.ndarray]:
        """Plain products through :meth:`matmuls` (intensity rule), convolution items offloaded, one round."""
        plain = [(u, v) for u, v, sp in items if sp is None]
        conv = [it for it in items if it[2] is not None]
        if plain and conv:  # one round: the plain ones too (they passed the conv rule or are checked like any)
            small = [_intensity(u, v) < self.min_intensity for u, v in plain]
            local = iter(self._in_enclave(plain, small))
            off = [(u, v, None) for (u, v), sm in zip(plain, small, strict=True) if not sm] + conv
            outs = iter(self._offload(off))  # the offloaded plain products first, then the convolutions
            plain_out = iter([next(local) if sm else next(outs) for sm in small])
            return [next(plain_out) if sp is None else next(outs) for _, _, sp in items]
        if conv:
            return self._offload(conv)
        return self.matmuls(plain)

    def sum_products(self, items: Sequence[SumItem]) -> list[np.ndarray]:
        """Secure products ``sum_t U_t V_t`` (:class:`SumItem`: operands with the caller's scales, an operand
        object named by several terms sent once) in one accelerator round, each checked; no intensity rule (the
        caller chose to offload them). Used by :class:`~veil.offload.training.precision.PrecisionMatmul` at
        ``double``."""
        for it in items:
            if any(a.frac is None or b.frac is None for a, b in it.terms):
                raise ValueError("sum_products needs the fractional bits of every operand")
        return self._round(list(items))

    def _offload(self, pairs: Sequence[tuple[Any, ...]]) -> list[np.ndarray]:
        """One accelerator round for ``(U, V)`` pairs and ``(U, V, ConvSpec)`` convolution items, each at the
        scales of the engine's rule (:func:`quantise_pair`, :func:`choose_conv_scales`)."""
        return self._round([SumItem([(Operand(pr[0]), Operand(pr[1]))], pr[2] if len(pr) > 2 else None)
                            for pr in pairs])

    def _round(self, items: list[SumItem]) -> list[np.ndarray]:
        """One accelerator round for sum items (:class:`SumItem`): the triple helper's request first (its
        ``C = A B`` depends on the seeds and shapes only, so it computes while the enclave masks), then the
        share holders' masked operands, then the answers, lifted, checked and scaled."""
        t0 = time.perf_counter()
        self.round += 1
        plan = _wire_plan(items)
        seeds = [(self.runtime.random_bytes(32), self.runtime.random_bytes(32)) for _ in items]
        helper = [_item_msg(i, 2, refs, it.spec, seeds=[s0, s1], shape=list(sh))
                  for i, ((_, _, refs, sh), it, (s0, s1)) in enumerate(zip(plan, items, seeds, strict=True))]
        self._send(self.accs[2], {"type": "tmatmul", "round": self.round, "items": helper})
        pend = self._mask_and_send(plan, items, seeds)
        t_sent = time.perf_counter()
        replies = [self._recv(acc) for acc in self.accs]
        t_back = time.perf_counter()
        outs = self._collect(pend, replies)
        self.counters["rounds"] += 1
        self.counters["wait_s"] += t_back - t_sent
        self.counters["enclave_s"] += (time.perf_counter() - t0) - (t_back - t_sent)
        return outs

    def _mask_and_send(self, plan: list[_ItemPlan], items: list[SumItem],
                       seeds: list[tuple[bytes, bytes]]) -> list[_Pending]:
        """Quantise and mask each item's own operands (at the caller's scales, or the engine's rule for a
        one-term item without them), send ``E``, ``F`` and one seed to each share holder, and return what the
        checks need per item."""
        pend: list[_Pending] = []
        msgs: list[list[dict[str, Any]]] = [[], []]
        quant: dict[int, tuple[np.ndarray, float]] = {}  # id(Operand) -> (x_q, max |x_q|)
        for i, ((own_u, own_v, refs, (n, k, m)), it, (s0, s1)) in enumerate(zip(plan, items, seeds, strict=True)):
            u, v, spec = own_u.x, own_v.x, it.spec
            if own_u.frac is None or own_v.frac is None:  # a one-term item at the engine's scale rule
                if spec is None:
                    own_u.frac, own_v.frac, own_u.amax, own_v.amax = _scales(u, v)
                else:
                    own_u.frac, own_v.frac, own_u.amax, own_v.amax = _conv_scales(spec, u, v)
            fu, fv = own_u.frac, own_v.frac
            au = _maxabs(u) if own_u.amax is None else own_u.amax
            av = _maxabs(v) if own_v.amax is None else own_v.amax
            # exact integers, |.| < p/2 (Cauchy-Schwarz)
            uq = _rint_scaled(u, fu) if own_u.q is None else own_u.q
            vq = _rint_scaled(v, fv) if own_v.q is None else own_v.q
            e, f = mask_pair(uq, vq, s0, s1)  # E = U_q - A0 - A1, F = V_q - B0 - B1, (A_j, B_j) as in expand_masks
            quant[id(own_u)] = (uq, math.ldexp(au, fu) + 1.0)
            quant[id(own_v)] = (vq, math.ldexp(av, fv) + 1.0)
            for j, sj in ((0, s0), (1, s1)):
                msgs[j].append(_item_msg(i, j, refs, spec, e=e, f=f, seed=sj))
            terms = [(*quant[id(a)], *quant[id(b)]) for a, b in it.terms]
            out_frac = it.terms[0][0].frac + it.terms[0][1].frac  # type: ignore[operator]  # set above or by the caller
            pend.append(_Pending(terms, refs, (s0, s1), e, f, out_frac, (n, k, m), spec))
            self.records.append(ProductRecord((n, k, m), fu, fv))
            self.counters["products"] += 1
            self.counters["macs"] += n * k * m * len(it.terms)
        del quant
        for j in range(2):
            self._send(self.accs[j], {"type": "tmatmul", "round": self.round, "items": msgs[j]})
        return pend

    def _collect(self, pend: list[_Pending], replies: list[Any]) -> list[np.ndarray]:
        """Each item's three answers, validated, summed and lifted, checked (Freivalds, vectors shared by the
        round's items of one shape) and divided by the output scale."""
        outs = []
        shared: dict[Any, Any] = {}  # Freivalds vectors of this round, shared by items of one shape
        for i, p in enumerate(pend):
            spec = p.spec
            want = spec.out_shape(p.shape[0], p.shape[2]) if spec is not None else (p.shape[0], p.shape[2])
            zs = [self._result(j, replies[j], i, want) for j in range(3)]
            z = _lift(zs)
            if spec is None:
                self._check(z, zs, p, pend, shared)
            else:
                self._check_conv(z, zs, p, pend, shared)
            z *= 2.0 ** -p.frac
            outs.append(z)
        return outs

    # --- checks -----------------------------------------------------------------------------------
    def _result(self, j: int, reply: Any, i: int, want: tuple[int, ...]) -> np.ndarray:
        acc = self.accs[j]
        if not isinstance(reply, dict) or reply.get("type") != "result" or reply.get("round") != self.round:
            msg = reply.get("message") if isinstance(reply, dict) and reply.get("type") == "error" else None
            raise AcceleratorProtocolError(f"accelerator {acc!r} sent a malformed answer to round {self.round}"
                                           + (f": it reported: {str(msg)[:300]}" if msg else ""))
        items = reply.get("items")
        if not isinstance(items, list) or len(items) <= i:
            raise AcceleratorProtocolError(f"accelerator {acc!r} returned too few results in round {self.round}")
        z = items[i]
        if not isinstance(z, np.ndarray) or z.dtype != np.uint32 or z.shape != tuple(want):
            raise AcceleratorProtocolError(f"accelerator {acc!r}: result {i} of round {self.round} must be a uint32 "
                                           f"array of shape {tuple(want)}")
        if z.size and int(z.max()) >= P:
            raise IntegrityError(f"accelerator {acc!r} returned values outside the field (round {self.round})")
        return z

    def _check(self, z: np.ndarray, zs: list[np.ndarray], p: _Pending, pend: list[_Pending],
               shared: dict[Any, Any]) -> None:
        """Freivalds on the reconstructed result: ``Z s == sum_t U_t,q (V_t,q s) (mod p)`` for a secret uniform
        ``s`` (m x reps), fresh per round and shared by the round's items with ``m`` columns (each wrong item
        still passes with probability ``p^-reps`` per row): one float64 pass over the result and one over each
        operand, ``V_t,q s`` computed once per operand. Only when it fails are the three answers checked one by
        one, to name the culprit."""
        m, r = p.shape[2], self.reps
        if ("mat", m) not in shared:
            shared[("mat", m)] = (uniform_field(self.runtime.random_bytes(32), m * r).reshape(m, r), {})
        s, vs = shared[("mat", m)]
        self.counters["freivalds_checks"] += 1
        got = exact_matvec(z, HALF, s)
        want: np.ndarray | None = None
        for uq, amax_u, vq, amax_v in p.terms:
            if id(vq) not in vs:
                vs[id(vq)] = (vq, exact_matvec(vq, amax_v, s))  # the array is kept: its id stays its own
            w = exact_matvec(uq, amax_u, vs[id(vq)][1])
            want = w if want is None else _add(want, w)
        if want is None or not np.array_equal(got, want):
            self._blame(zs, p, pend, s)

    def _check_conv(self, z: np.ndarray, zs: list[np.ndarray], p: _Pending, pend: list[_Pending],
                    shared: dict[Any, Any]) -> None:
        """Freivalds with tensor-product random vectors (:class:`~veil.offload.training.conv_field.ConvCheck`),
        ``reps`` times, the vectors fresh per round and shared by the round's items of one geometry; on failure
        the three answers are recomputed here to name the culprit (rare path)."""
        spec = p.spec
        assert spec is not None
        key = ("conv", spec, z.shape)
        if key not in shared:
            rng_seed = self.runtime.random_bytes(32)
            drawn = [0]

            def rand(count: int) -> np.ndarray:
                drawn[0] += 1
                return uniform_field(hashlib.sha256(rng_seed + drawn[0].to_bytes(4, "little")).digest(), count)

            shared[key] = [ConvCheck(spec, z.shape, rand) for _ in range(self.reps)]
        for chk in shared[key]:
            self.counters["freivalds_checks"] += 1
            if chk.lhs(z) != chk.rhs(p.terms):
                self._blame_conv(zs, p, pend)

    def _blame_conv(self, zs: list[np.ndarray], p: _Pending, pend: list[_Pending]) -> NoReturn:
        """The convolution item ``p`` failed its check: recompute each accelerator's answer in full (rare path,
        int64, from the ``E``, ``F`` and seeds of every item its terms use) and raise naming each one that
        differs."""
        spec = p.spec
        srcs = sorted({i for ref in p.refs for i in ref})
        at = {i: x for x, i in enumerate(srcs)}
        terms = [(at[iu], at[iv]) for iu, iv in p.refs]
        bad = []
        for j in range(3):
            sources = [(pend[i].e, pend[i].f, pend[i].seeds if j == 2 else (pend[i].seeds[j],)) for i in srcs]
            if not np.array_equal(zs[j], expected_sum(_NP, j, sources, terms, spec, p.shape)):
                bad.append(repr(self.accs[j]))
        raise IntegrityError(f"accelerator {' and '.join(bad) or '(unknown)'} returned a wrong product in round "
                             f"{self.round} (Freivalds check on the convolution failed)")

    def _blame(self, zs: list[np.ndarray], p: _Pending, pend: list[_Pending], s: np.ndarray) -> NoReturn:
        """The result failed its check with ``s``: at least one answer fails its own check with the same ``s``
        (the three expectations add up to ``sum_t U_t,q V_t,q s``); raise naming every one that does (rare path,
        int64, re-expands the masks of every item the terms use from its seeds)."""
        n, k, m = p.shape
        r = s.shape[1]
        masks: dict[int, tuple[np.ndarray, ...]] = {}

        def of(i: int) -> tuple[np.ndarray, ...]:  # (A0, B0, A1, B1) of item i (the items of a sum share a shape)
            if i not in masks:
                masks[i] = (*expand_masks(pend[i].seeds[0], n, k, m), *expand_masks(pend[i].seeds[1], n, k, m))
            return masks[i]

        expect = [np.zeros((n, r), np.int64) for _ in range(3)]
        for iu, iv in p.refs:
            e, f = pend[iu].e.astype(np.int64), pend[iv].f.astype(np.int64)
            a0, _, a1, _ = of(iu)
            _, b0, _, b1 = of(iv)
            fs, b0s, b1s = field_matvec(f, s), field_matvec(b0, s), field_matvec(b1, s)
            bs = _add(b0s, b1s)
            ew = field_matvec(e, np.concatenate([_add(fs, b0s), b1s], axis=1))
            a0w = field_matvec(a0, np.concatenate([fs, bs], axis=1))
            a1w = field_matvec(a1, np.concatenate([fs, bs], axis=1))
            for j, x in enumerate((_add(ew[:, :r], a0w[:, :r]), _add(ew[:, r:], a1w[:, :r]),
                                   _add(a0w[:, r:], a1w[:, r:]))):
                expect[j] = _add(expect[j], x)
        bad, rows_bad = [], []
        for j in range(3):
            got = field_matvec(zs[j].astype(np.int64), s)
            rows = np.flatnonzero((got != expect[j]).any(1))
            if rows.size:
                bad.append(repr(self.accs[j]))
                rows_bad.append(f"{rows.size} of {n} rows")
        if not bad:  # impossible: the three expectations add up to the checked sum
            raise IntegrityError(f"the product of round {self.round} failed its Freivalds check")
        raise IntegrityError(f"accelerator {' and '.join(bad)} returned a wrong product in round {self.round} "
                             f"(Freivalds check failed on {', '.join(rows_bad)})")

    # --- channel ----------------------------------------------------------------------------------
    def _send(self, acc: str, msg: Any) -> None:
        try:
            self.ch.send(acc, msg)
        except ChannelError as e:
            raise AcceleratorUnavailableError(f"accelerator {acc!r} unreachable in training round {self.round}: "
                                              f"{type(e).__name__}: {e}") from None

    def _recv(self, acc: str) -> Any:
        try:
            return self.ch.recv(acc, timeout=self.timeout)
        except ChannelError as e:
            raise AcceleratorUnavailableError(f"accelerator {acc!r} did not answer training round {self.round} within "
                                              f"{self.timeout:g} s: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        """Tell the accelerators to stop (best effort)."""
        for acc in self.accs:
            try:
                self.ch.send(acc, {"type": "bye"})
            except ChannelError:
                pass
