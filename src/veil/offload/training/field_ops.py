"""Element-wise field kernels of the offload-training enclave (masking, mask streams, lift, scales).

The enclave's per-element protocol work (:mod:`veil.offload.training.protocol`) is a handful of passes over
every operand and result: quantise, expand two AES-CTR mask streams, ``E = U_q - A0 - A1 mod p``, the sum of
the three answers and its centred lift, ``max |x|`` for the scales, and the limb recombination of the
Freivalds matrix-vector products. These kernels compute exactly the values of the straightforward int64
formulas (``(q - m0 - m1) % p`` and so on), bit for bit, in fewer and cheaper passes:

* **uint32 instead of int64 ``%``.** Field elements are below ``p = 2^31 - 1``, so the sum of two fits in
  uint32 (``< 2p < 2^32``), and one conditional subtraction is ``min(s, s - p)`` in wrapping uint32
  arithmetic: when ``s < p``, ``s - p`` wraps to ``s - p + 2^32 > s``; when ``p <= s < 2p``, ``s - p < s``.
  Likewise ``(a - b) mod p`` for ``a, b`` in ``[0, p)`` is ``min(d, d + p)`` with ``d = a - b`` wrapping:
  ``a >= b`` gives ``d < p`` and ``d + p < 2^32`` (no wrap, larger); ``a < b`` gives ``d = a - b + 2^32`` and
  ``d + p`` wraps to ``a - b + p`` in ``[1, p)``, the smaller one. Each step is two cheap SIMD passes
  instead of an int64 division.
* **blocks that stay in cache.** Masking, lift, quantisation and the key streams work on blocks of
  :data:`CHUNK` elements (512 KiB of float64), so a block's passes after the first hit the L2 cache;
  :func:`mask_pair` also uses each block of the two key streams as soon as it is produced.
* **Mersenne folding** for the wide integers of :func:`exact_matvec`: ``2^31 = 1 (mod p)``, so
  ``x = (x & p) + (x >> 31) (mod p)`` for ``x >= 0``, which shrinks ``x < 2^62`` to below ``2^32`` and
  then to ``<= p``; one conditional subtraction makes it canonical.
* **brackets instead of exact norms** for the convolution scales (:func:`conv_norm_bounds`): the norms are
  summed in a cheaper order with a margin that covers every summation order; the caller
  (:func:`veil.offload.training.protocol.choose_conv_scales`) falls back to the reference sums only when
  the margin straddles a step of the scale rule, so the scales are the reference's.

Every kernel documents its input range and why its result equals the reference's. Inputs outside a fast
path's range take the reference formula, so the result is the same for every input (``|U_q| >= p`` can
occur in the protocol: the scale rule bounds only what enters a product, e.g. not an operand whose
partner is zero). Tests:
``tests/test_offload_train_field_ops.py`` (each kernel against the plain int64 formula, edge values
included); timings: ``bench/bench_offload_field_ops.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from veil.offload.errors import FieldRangeError
from veil.offload.field import HALF, P

if TYPE_CHECKING:  # conv_field imports this module (exact_matvec)
    from veil.offload.training.conv_field import ConvSpec

__all__ = ["CHUNK", "masks_u32", "masked", "mask_pair", "lift", "rint_scaled", "maxabs", "exact_matvec", "fold_mod_p",
           "conv_norm_bounds"]

#: elements per block: 512 KiB of float64, so a block's later passes run from the L2 cache
CHUNK = 1 << 16

_U = np.uint32
_PU = np.uint32(P)
_HALF_U = np.uint32(HALF)
_MASK31 = np.uint32(0x7FFFFFFF)
_ZEROS = np.zeros(4 * CHUNK, np.uint8)  #: the key-stream input of one block (read-only, shared by threads)
_ZEROS.flags.writeable = False


def _flat(x: np.ndarray) -> np.ndarray:
    """A 1-D C-order view of ``x`` (a copy only if ``x`` is not C-contiguous)."""
    return np.ascontiguousarray(x).reshape(-1)


def _reduce_once(s: np.ndarray, tmp: np.ndarray) -> None:
    """``s mod p`` in place for uint32 ``s`` in ``[0, 2p)``: ``min(s, s - p)`` (module docstring)."""
    np.subtract(s, _PU, out=tmp)
    np.minimum(s, tmp, out=s)


def _sub_mod(a: np.ndarray, b: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """``out = (a - b) mod p`` for uint32 ``a, b`` in ``[0, p)``: ``min(d, d + p)`` with ``d = a - b``
    wrapping (module docstring). ``out`` may be ``a``."""
    np.subtract(a, b, out=out)
    np.add(out, _PU, out=tmp)
    np.minimum(out, tmp, out=out)


def masks_u32(seed: bytes, count: int) -> np.ndarray:
    """``count`` field elements, uniform in ``[0, p)``, as uint32: the same values as
    :func:`veil.offload.field.uniform_field` (AES-256-CTR key stream from the 32-byte ``seed``, each
    little-endian 32-bit word's top bit cleared, the value ``p`` rejected and redrawn from the continuing
    stream in order).

    The stream is produced block by block into one array (CTR is a stream cipher: consecutive
    ``update_into`` calls continue the key stream exactly as one call would), and each block is masked to
    31 bits and its maximum taken while it is in cache. Only when some word equals ``p`` (probability about
    ``count 2^-31``) are those positions redrawn, in index order, from the stream after the ``4 count``
    bytes: the reference's order."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    buf = np.empty(count + 4, _U)  # update_into wants room for one more block after its output
    raw = buf.data.cast("B")
    zeros = _ZEROS.data
    top = 0
    for lo in range(0, count, CHUNK):
        hi = min(count, lo + CHUNK)
        enc.update_into(zeros[:4 * (hi - lo)], raw[4 * lo:4 * hi + 16])
        blk = buf[lo:hi]
        np.bitwise_and(blk, _MASK31, out=blk)
        top = max(top, int(blk.max()))
    out = buf[:count]
    if top == P:
        bad = np.flatnonzero(out == _PU)
        while bad.size:
            fresh = np.frombuffer(enc.update(bytes(4 * bad.size)), dtype="<u4") & _MASK31
            out[bad] = fresh
            bad = bad[fresh == _PU]
    return out


def masked(q: np.ndarray, m0: np.ndarray, m1: np.ndarray) -> np.ndarray:
    """``(q - m0 - m1) mod p`` as uint32 (C order, ``q``'s shape) for exact integers ``q`` (float64) and
    masks ``m0, m1`` (uint32 in ``[0, p)``, ``q``'s size).

    Per block: ``s = (m0 + m1) mod p`` (sum below ``2p``, one ``min`` reduction); ``q`` in ``[-p, p)``
    converts exactly to int32 (it is an integer), whose uint32 bit pattern ``w`` is ``q`` or ``q + 2^32``;
    ``min(w, w + p)`` wrapping is ``q mod p`` in both cases (``q >= 0``: ``w + p < 2^32`` is larger;
    ``q < 0``: ``w + p`` wraps to ``q + p`` in ``[0, p)``); then ``(q mod p - s) mod p`` by
    ``min(d, d + p)``. A block with some ``q`` outside ``[-p, p)`` (or NaN) takes the reference formula
    ``(int64(q) - m0 - m1) % p``, so every input gives the reference's result."""
    out = np.empty(q.shape, _U)
    n = out.size
    qf, a, b, o = _flat(q), _flat(m0), _flat(m1), out.reshape(-1)
    if a.size != n or b.size != n:
        raise ValueError(f"masks of {a.size} and {b.size} elements for {n} values")
    s_buf, t_buf = np.empty(min(n, CHUNK), _U), np.empty(min(n, CHUNK), _U)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        _mask_block(qf[lo:hi], a[lo:hi], b[lo:hi], o[lo:hi], s_buf[:hi - lo], t_buf[:hi - lo])
    return out


def _mask_block(qc: np.ndarray, a: np.ndarray, b: np.ndarray, oc: np.ndarray, s: np.ndarray, t: np.ndarray) -> None:
    """One block of :func:`masked`: ``oc = (qc - a - b) mod p`` (``s``, ``t``: uint32 scratch of the block's
    size, distinct from the other arguments)."""
    if not (qc.min() >= -P and qc.max() < P):  # also False for NaN: the reference formula
        x = qc.astype(np.int64)
        x -= a
        x -= b
        x %= P
        oc[...] = x
        return
    np.add(a, b, out=s)
    _reduce_once(s, t)
    np.copyto(oc.view(np.int32), qc, casting="unsafe")  # exact: integers in [-p, p) fit int32
    np.add(oc, _PU, out=t)
    np.minimum(oc, t, out=oc)  # q mod p
    _sub_mod(oc, s, oc, t)


def mask_pair(uq: np.ndarray, vq: np.ndarray, seed0: bytes, seed1: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(E, F)`` of one product without materialising the masks: the same arrays as
    ``r_j = masks_u32(seed_j, uq.size + vq.size)``, ``E = masked(uq, r0[:nu], r1[:nu])``,
    ``F = masked(vq, r0[nu:], r1[nu:])``.

    Both AES-CTR streams are expanded block by block into two small buffers, in the order of ``r_j``
    (``U``'s elements, then ``V``'s), and each block is masked while the key stream is in cache: no
    ``4 (nu + nv)``-byte mask arrays are written and read back. A block holding the word ``p`` (probability
    about ``2^-31`` per element) needs words from after the whole stream (the reference's rejection order):
    then the pair is recomputed through :func:`masks_u32` and :func:`masked`."""
    for sd in (seed0, seed1):
        if len(sd) != 32:
            raise ValueError("seed must be 32 bytes")
    encs = [Cipher(algorithms.AES(sd), modes.CTR(b"\x00" * 16)).encryptor() for sd in (seed0, seed1)]
    bufs = [np.empty(CHUNK + 4, _U) for _ in range(2)]
    raws = [b.data.cast("B") for b in bufs]
    zeros = _ZEROS.data
    s_buf, t_buf = np.empty(CHUNK, _U), np.empty(CHUNK, _U)
    outs = []
    for q in (uq, vq):
        out = np.empty(q.shape, _U)
        qf, o = _flat(q), out.reshape(-1)
        for lo in range(0, o.size, CHUNK):
            hi = min(o.size, lo + CHUNK)
            c = hi - lo
            ms = []
            for enc, buf, raw in zip(encs, bufs, raws, strict=True):
                enc.update_into(zeros[:4 * c], raw[:4 * c + 16])
                blk = buf[:c]
                np.bitwise_and(blk, _MASK31, out=blk)
                if int(blk.max()) == P:  # rejection: redraws come from after the whole stream
                    n = uq.size + vq.size
                    r0, r1 = masks_u32(seed0, n), masks_u32(seed1, n)
                    nu = uq.size
                    return (masked(uq, r0[:nu], r1[:nu]), masked(vq, r0[nu:], r1[nu:]))
                ms.append(blk)
            _mask_block(qf[lo:hi], ms[0], ms[1], o[lo:hi], s_buf[:c], t_buf[:c])
        outs.append(out)
    return outs[0], outs[1]


def lift(zs: list[np.ndarray]) -> np.ndarray:
    """The sum of field elements ``zs`` (uint32 arrays in ``[0, p)``, one shape) mod p as its centred
    residue in ``[-(p-1)/2, (p-1)/2]``, float64 (C order): the value ``z - p round(z / p)`` of the float64
    reference (``z = sum zs < 3p``; ``round`` is never a tie as ``p`` is odd, and the residue is unique).

    Per block in uint32: ``w = (Z0 + (p-1)/2 + Z1 + ...) mod p``, each partial sum (below ``2p``) reduced with
    ``min(s, s - p)``; ``w - (p-1)/2``, read as int32, is in ``[-(p-1)/2, (p-1)/2]`` and congruent to the sum:
    the centred residue. The int32 to float64 conversion is exact."""
    if not zs:
        raise ValueError("nothing to lift")
    out = np.empty(zs[0].shape, np.float64)
    n = out.size
    flats = [_flat(z) for z in zs]
    if any(f.size != n for f in flats):
        raise ValueError("the answers to lift differ in size")
    o = out.reshape(-1)
    s_buf, t_buf = np.empty(min(n, CHUNK), _U), np.empty(min(n, CHUNK), _U)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        s, t = s_buf[:hi - lo], t_buf[:hi - lo]
        np.add(flats[0][lo:hi], _HALF_U, out=s)  # below p + (p-1)/2 < 2^32
        _reduce_once(s, t)
        for f in flats[1:]:
            np.add(s, f[lo:hi], out=s)
            _reduce_once(s, t)
        np.subtract(s, _HALF_U, out=s)
        np.copyto(o[lo:hi], s.view(np.int32))
    return out


def rint_scaled(x: np.ndarray, f: int) -> np.ndarray:
    """``rint(x 2^f)`` in float64 (round half to even, as :func:`numpy.rint`), C order: the same
    float64 multiply and ``rint`` as the reference, per block, so the rounding is in cache."""
    scale = 2.0**f
    if not x.flags.c_contiguous:
        q = np.multiply(x, scale, dtype=np.float64, order="C")
        return np.rint(q, out=q)
    out = np.empty(x.shape, np.float64)
    xf, o = x.reshape(-1), out.reshape(-1)
    for lo in range(0, o.size, CHUNK):
        oc = o[lo:lo + CHUNK]
        np.multiply(xf[lo:lo + CHUNK], scale, out=oc, dtype=np.float64)
        np.rint(oc, out=oc)
    return out


def maxabs(x: np.ndarray) -> float:
    """``max(max(x), -min(x))`` as a Python float (0.0 for an empty array); NaN propagates as in
    :meth:`numpy.ndarray.max`. Two SIMD reductions over ``x``: a blocked single pass (max and min of each
    block while it is in cache) measured slower on network C's operands (``bench/bench_offload_field_ops.py``),
    as they are already cache-resident and each reduction is cheaper than the per-block overhead."""
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


def _fold(u: np.ndarray, tmp: np.ndarray) -> None:
    """One Mersenne fold in place, ``u = (u & p) + (u >> 31)`` (uint64; ``2^31 = 1 mod p``), so for
    ``u < 2^k`` (``k >= 31``) the result is congruent and below ``2^31 + 2^(k - 31)``."""
    np.right_shift(u, 31, out=tmp)
    np.bitwise_and(u, P, out=u)
    u += tmp


def fold_mod_p(x: np.ndarray) -> np.ndarray:
    """``x mod p`` in place for int64 ``x`` in ``[0, 2^62)``, returned: two Mersenne folds bring ``x`` below
    ``2^32 - 1`` and then to at most ``p`` (a value ``2^31 + k`` with ``k <= 2^31 - 2`` folds to
    ``k + 1 <= p``), and ``min(x, x - p)`` in wrapping uint64 (``x - p`` wraps above ``x`` when ``x < p``)
    makes it canonical."""
    u = x.view(np.uint64)
    tmp = np.empty_like(u)
    _fold(u, tmp)
    _fold(u, tmp)
    np.subtract(u, P, out=tmp)
    np.minimum(u, tmp, out=u)
    return x


_OFFSET = P << 23  #: a multiple of p above 2^53: makes every exact float64 integer non-negative


def exact_matvec(a: np.ndarray, amax: float, x: np.ndarray) -> np.ndarray:
    """``a @ x mod p`` (int64 in ``[0, p)``) for a float64 matrix ``a`` of integers with ``|a| <= amax``
    and field elements ``x`` (int64, cols x t), exactly, in one float64 BLAS pass over ``a``.

    ``x`` is cut into ``L`` limbs of ``b`` bits with ``cols * amax * 2^b < 2^53``, so every partial sum of
    ``a @ limb`` is an integer below 2^53 in magnitude (exact in float64 in any summation order); the
    ``L t`` limb columns go through one product. Each product entry ``y`` becomes ``y + 2^23 p`` (non-negative,
    below ``2^55``), is folded once (below ``2^31 + 2^24``), weighted by ``2^(b j) mod p`` (below ``2^63``) and
    folded again (below ``2^32 + 2^24``); the ``L <= 31`` limbs' sum (below ``2^38``) is reduced by
    :func:`fold_mod_p`: the canonical residue of the reference's ``sum_j (a @ limb_j) 2^(b j) mod p``."""
    rows, cols = a.shape
    t = x.shape[1]
    bound = max(cols * max(amax, 1.0), 1.0)
    b = min(31, math.floor(53 - math.log2(bound) - 1e-9))
    if b < 1:
        raise FieldRangeError(f"matrix-vector product too wide for exact float64 limbs ({cols} columns)")
    nl = -(-31 // b)
    mask = (1 << b) - 1
    limbs = np.empty((cols, nl * t), np.float64)
    for j in range(nl):
        limbs[:, j * t:(j + 1) * t] = (x >> (b * j)) & mask
    # one row per limb column (contiguous for the int64 passes); a Fortran-ordered ``a`` (a transposed view)
    # goes through BLAS as ``limbs^T a^T``, which is faster for few columns
    ly = limbs.T @ a.T if a.T.flags.c_contiguous else (a @ limbs).T
    y = ly.astype(np.int64, order="C")  # exact integers below 2^53 in magnitude
    y += _OFFSET  # now in [0, 2^55)
    u = y.view(np.uint64)
    tmp = np.empty_like(u)
    _fold(u, tmp)  # < 2^31 + 2^24
    if nl > 1:
        acc = u[:t].copy()
        for j in range(1, nl):
            uj = u[j * t:(j + 1) * t]
            uj *= pow(2, b * j, P)  # < (2^31 + 2^24) 2^31 < 2^63
            _fold(uj, tmp[j * t:(j + 1) * t])  # < 2^32 + 2^24
            acc += uj  # nl <= 31 terms: < 2^38
        y = acc.view(np.int64)
    return np.ascontiguousarray(fold_mod_p(y).T)


# --- convolution scales: the norms of conv_norms, bracketed cheaply ------------------------------------------
_MARGIN_PER_TERM = 2.0**-51  #: four units in the last place of 1.0 (float64): margin per summed term, see _bracket


def _window_max(a: np.ndarray, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int, pads: tuple[int, ...]) -> float:
    """The largest sum of ``a`` (N x H x W, non-negative) over the zero-padded convolution windows: row taps
    first, then column taps (``kh + kw`` passes instead of ``kh kw``; a different summation order from
    :func:`~veil.offload.training.conv_field._window_sums`, the same terms), a few samples at a time so that the
    temporaries stay small."""
    t, left, b, r = pads
    hp = a.shape[1] + t + b
    step = max(1, CHUNK // (hp * ow))
    best = 0.0
    for n0 in range(0, a.shape[0], step):
        blk = a[n0:n0 + step]
        ap = np.pad(blk, ((0, 0), (t, b), (left, r))) if any(pads) else blk
        rows = ap[:, :, 0:sw * ow:sw][:, :, :ow].copy()
        for j in range(1, kw):
            rows += ap[:, :, j:j + sw * ow:sw][:, :, :ow]
        out = rows[:, 0:sh * oh:sh][:, :oh].copy()
        for i in range(1, kh):
            out += rows[:, i:i + sh * oh:sh][:, :oh]
        top = float(out.max())
        if math.isnan(top):
            return top  # not finite: conv_norm_bounds gives up
        best = max(best, top)
    return best


def _bracket(total: float, terms: int) -> tuple[float, float] | None:
    """``(sqrt(lo), sqrt(hi))`` with ``lo <= S <= hi`` for every float64 value ``S`` that some summation order
    of the same ``terms`` non-negative numbers can give, when one order gave ``total``: each order is within
    ``gamma = (terms - 1) 2^-53 / (1 - (terms - 1) 2^-53)`` (relative) of the exact sum, so two orders are
    within ``(1 + gamma) / (1 - gamma) - 1 < 2.1 (terms - 1) 2^-53`` of each other; the margin
    ``(terms + 1) 2^-51`` also covers the rounding of the product that applies it. ``math.sqrt`` is correctly
    rounded, hence monotone. None when ``total`` is not finite."""
    if not math.isfinite(total) or terms >= 2**40:
        return None
    if total == 0.0:  # non-negative terms: every order gives 0 exactly when all are 0
        return 0.0, 0.0
    eps = (terms + 1) * _MARGIN_PER_TERM
    return math.sqrt(total * (1.0 - eps)), math.sqrt(total * (1.0 + eps))


def conv_norm_bounds(spec: ConvSpec, u: np.ndarray, v: np.ndarray
                     ) -> tuple[float, float, float, float, int] | None:
    """``(ru_lo, ru_hi, cv_lo, cv_hi, length)``: intervals that contain the ``ru`` and ``cv`` that
    :func:`~veil.offload.training.conv_field.conv_norms` returns for the same item, and its ``length``, at a
    fraction of its cost (None if a sum is not finite: then use ``conv_norms``).

    Each norm is ``sqrt(max of sums of non-negative float64 terms)``; the terms here are the same floats
    (the same ``einsum`` and ``v * v`` calls), summed in a cheaper order: window sums by rows then columns,
    the weight gradient's per-tap sums after one sum over the batch. Two orders of the same ``terms``
    non-negative numbers differ by at most ``2.1 (terms - 1) 2^-53`` relative, so a margin of
    ``(terms + 1) 2^-51`` brackets the reference's value (:func:`_bracket`); norms that ``conv_norms``
    computes by the same call are returned exactly (``lo == hi``)."""
    (kh, kw), (sh, sw) = spec.kernel, spec.strides
    oh, ow = spec.out_hw
    if spec.op == "fwd":
        s2 = np.einsum("nchw,nchw->nhw", u, u)
        ru = _bracket(_window_max(s2, kh, kw, sh, sw, oh, ow, spec.pads), kh * kw)
        cv = float(np.sqrt(np.einsum("ij,ij->j", v, v).max()))
        return None if ru is None else (ru[0], ru[1], cv, cv, spec.k)
    if spec.op == "dw":
        n = spec.x_shape[0]
        per = np.zeros(v.shape[1:])  # C x H x W: the batch sum first, a few samples at a time
        step = max(1, CHUNK // max(1, math.prod(v.shape[1:])))
        for n0 in range(0, n, step):
            blk = v[n0:n0 + step]
            per += (blk * blk).sum(axis=0)
        t, left, b, r = spec.pads
        pp = np.pad(per, ((0, 0), (t, b), (left, r))) if any(spec.pads) else per
        cmax = max(float(pp[:, i:i + sh * oh:sh, j:j + sw * ow:sw][:, :oh, :ow].sum(axis=(1, 2)).max())
                   for i in range(kh) for j in range(kw))
        cv_b = _bracket(cmax, n * oh * ow)
        ru_dw = float(np.sqrt(np.einsum("ij,ij->i", u, u).max()))
        return None if cv_b is None else (ru_dw, ru_dw, cv_b[0], cv_b[1], spec.rows)
    n, o = spec.x_shape[0], u.shape[1]
    bh, bw = -(-kh // sh), -(-kw // sw)
    r2 = np.einsum("ij,ij->i", u, u).reshape(n, oh, ow)
    ru_b = _bracket(_window_max(r2, bh, bw, 1, 1, oh + bh - 1, ow + bw - 1, (bh - 1, bw - 1, bh - 1, bw - 1)), bh * bw)
    c = spec.x_shape[1]
    w3 = v.reshape(o, c, kh * kw)
    cv_dx = float(np.sqrt(np.einsum("ocx,ocx->c", w3, w3).max()))
    return None if ru_b is None else (ru_b[0], ru_b[1], cv_dx, cv_dx, bh * bw * o)
