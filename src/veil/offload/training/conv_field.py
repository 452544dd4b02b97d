"""Convolutions in the offload-training protocol without im2col in the enclave.

A convolution layer's three products are matrix products of an im2col matrix: forward
``Y = cols(X) W^T``, weight gradient ``dW = dY^T cols(X)``, data gradient ``dX = col2im(dY W)``. ``cols``
(zero-padded windows, rows ``(n, oh, ow)``, columns ``(c, i, j)``) and ``col2im`` (its adjoint) are linear,
so the Beaver masking of :mod:`veil.offload.training.protocol` commutes with them: the enclave masks the
*tensor* ``X`` (N x C x H x W, ``kh kw / stride^2`` times smaller than ``cols(X)``), and the accelerators
apply ``cols`` to what they receive (and ``col2im`` to what they return, for ``dX``) in the field.

The enclave checks the reconstructed result with Freivalds' test on random vectors that are tensor
products (Schwartz-Zippel): for a wrong result ``Z != M`` the check value
``sum r_1[.] r_2[.] r_3[.] r_4[.] (Z - M)[...]`` is a non-zero multilinear polynomial of total degree 4
in four independent uniform vectors over F_p, so it vanishes with probability at most ``4/p`` (1.9e-9
per repetition); a correct result always passes. Structured vectors let the enclave contract the batch
axis first (one exact float64 pass over ``X`` or ``dY``) and then work on arrays the size of one image:

* forward, ``t = a (N) x b (OH) x c (OW)`` on rows, ``s`` (O) on columns:
  ``t^T Z s == (t^T cols(X_q)) (W_q s)``, where ``t^T cols(X_q)`` is ``sum_n a_n X_q[n]`` correlated with
  ``b x c`` (C x kh x kw numbers);
* weight gradient, ``t`` (O) on rows, ``s = q (C) x beta (kh) x gamma (kw)`` on columns:
  ``t^T Z s == (dY_q t) . (cols(X_q) s)``, where ``cols(X_q) s`` is ``sum_c q_c X_q[:, c]`` correlated with
  ``beta x gamma``;
* data gradient, ``r = a (N) x q (C) x beta (H) x gamma (W)`` on ``dX``:
  ``<r, Z> == <cols(r), dY_q W_q>`` (``col2im`` is the adjoint of ``cols``), where ``cols(r)`` factors into
  ``a``, ``q`` and an (OH OW) x (kh kw) matrix of ``beta``, ``gamma`` products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.offload.field import HALF, P
from veil.offload.training.field_ops import exact_matvec

__all__ = ["ConvSpec", "cols", "col2im_field", "conv_norms", "ConvCheck"]

_OPS = ("fwd", "dw", "dx")


@dataclass(frozen=True)
class ConvSpec:
    """One convolution product. ``op``: ``fwd`` (``U = cols(X)`` from the tensor ``X``, ``V`` = W^T, k x O),
    ``dw`` (``U`` = dY^T, O x rows, ``V = cols(X)``), ``dx`` (``U`` = dY, rows x O, ``V`` = W, O x k, result
    ``col2im(U V)`` of ``x_shape``)."""

    op: str
    x_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        _, _, h, w = self.x_shape
        t, left, b, r = self.pads
        return (h + t + b - self.kernel[0]) // self.strides[0] + 1, (w + left + r - self.kernel[1]) // self.strides[1] + 1

    @property
    def rows(self) -> int:
        oh, ow = self.out_hw
        return self.x_shape[0] * oh * ow

    @property
    def k(self) -> int:
        return self.x_shape[1] * self.kernel[0] * self.kernel[1]

    def raw_shapes(self, n: int, k: int, m: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the arrays the enclave masks and sends (``U``'s and ``V``'s) for matrix shape n x k x m."""
        if self.op == "fwd":
            return self.x_shape, (k, m)
        if self.op == "dw":
            return (n, k), self.x_shape
        return (n, k), (k, m)

    def matrix_shape(self, o: int) -> tuple[int, int, int]:
        """(n, k, m) of the product for ``o`` output channels."""
        if self.op == "fwd":
            return self.rows, self.k, o
        if self.op == "dw":
            return o, self.rows, self.k
        return self.rows, o, self.k

    def item_shape(self, u_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(n, k, m) of the product whose operands as sent (see :meth:`raw_shapes`) have these shapes."""
        return self.matrix_shape(v_shape[1] if self.op == "fwd" else u_shape[0] if self.op == "dw" else u_shape[1])

    def out_shape(self, n: int, m: int) -> tuple[int, ...]:
        return self.x_shape if self.op == "dx" else (n, m)

    def as_msg(self) -> dict[str, Any]:
        return {"op": self.op, "x_shape": list(self.x_shape), "kernel": list(self.kernel),
                "strides": list(self.strides), "pads": list(self.pads)}

    @staticmethod
    def from_msg(d: Any) -> ConvSpec:
        """Validated spec from a message (``ValueError`` naming what is wrong)."""
        if not isinstance(d, dict) or d.get("op") not in _OPS:
            raise ValueError(f"conv spec must be a dict with op in {_OPS}")

        def ints(key: str, count: int, low: int) -> tuple[int, ...]:
            v = d.get(key)
            if not isinstance(v, list) or len(v) != count or not all(isinstance(x, int) and low <= x < 2**20 for x in v):
                raise ValueError(f"conv spec {key} must be {count} integers >= {low}")
            return tuple(v)

        spec = ConvSpec(d["op"], ints("x_shape", 4, 1), ints("kernel", 2, 1), ints("strides", 2, 1),  # type: ignore[arg-type]
                        ints("pads", 4, 0))  # type: ignore[arg-type]
        oh, ow = spec.out_hw
        if oh < 1 or ow < 1 or math.prod(spec.x_shape) > 2**31:
            raise ValueError("conv spec describes an empty or oversized convolution")
        return spec


def cols(x: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """im2col of an NCHW array (any dtype, zero padding): (N OH OW) x (C kh kw), columns ``(c, i, j)``."""
    n, c, _, _ = x.shape
    (kh, kw), (sh, sw) = spec.kernel, spec.strides
    t, left, b, r = spec.pads
    oh, ow = spec.out_hw
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r))) if any(spec.pads) else x
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, c * kh * kw)


def col2im_field(d: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """Adjoint of :func:`cols` for field elements: ``d`` ((N OH OW) x (C kh kw), values in [0, p)) summed into
    an NCHW array of ``spec.x_shape`` mod p (int64)."""
    n, c, h, w = spec.x_shape
    (kh, kw), (sh, sw) = spec.kernel, spec.strides
    t, left, b, r = spec.pads
    oh, ow = spec.out_hw
    out = np.zeros((n, c, h + t + b, w + left + r), np.int64)
    d6 = d.reshape(n, oh, ow, c, kh, kw)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += d6[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    out %= P  # at most kh kw terms below 2^31 each
    return np.ascontiguousarray(out[:, :, t:t + h, left:left + w])


# --- scales: the norms the Cauchy-Schwarz bound needs, without building cols(X) -------------------------
def _window_sums(a: np.ndarray, bh: int, bw: int, sh: int, sw: int, oh: int, ow: int, pads: tuple[int, ...]) -> np.ndarray:
    """Sums of ``a`` (N x H x W) over the (zero-padded) windows of the convolution: N x OH x OW."""
    t, left, b, r = pads
    ap = np.pad(a, ((0, 0), (t, b), (left, r))) if any(pads) else a
    out = np.zeros((a.shape[0], oh, ow))
    for i in range(bh):
        for j in range(bw):
            out += ap[:, i:i + sh * oh:sh, j:j + sw * ow:sw]
    return out


def conv_norms(spec: ConvSpec, u: np.ndarray, v: np.ndarray) -> tuple[float, float, int]:
    """``(ru, cv, length)`` for the scale rule: every output entry is an inner product of two vectors of at
    most ``length`` entries, one of 2-norm <= ``ru`` made of ``u``'s entries, one of 2-norm <= ``cv`` of
    ``v``'s (``u``, ``v`` as sent: the tensor for ``cols``)."""
    (kh, kw), (sh, sw) = spec.kernel, spec.strides
    oh, ow = spec.out_hw
    if spec.op == "fwd":  # rows of cols(X): window norms of sum_c X^2
        s2 = np.einsum("nchw,nchw->nhw", u, u)
        ru = float(np.sqrt(_window_sums(s2, kh, kw, sh, sw, oh, ow, spec.pads).max()))
        return ru, float(np.sqrt(np.einsum("ij,ij->j", v, v).max())), spec.k
    if spec.op == "dw":  # columns of cols(X): for each (c, i, j), a strided sub-grid of X[:, c]
        x2 = v * v
        t, left, b, r = spec.pads
        xp = np.pad(x2, ((0, 0), (0, 0), (t, b), (left, r))) if any(spec.pads) else x2
        cmax = max(float(xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].sum(axis=(0, 2, 3)).max())
                   for i in range(kh) for j in range(kw))
        return float(np.sqrt(np.einsum("ij,ij->i", u, u).max())), math.sqrt(cmax), spec.rows
    # dx: dX[n, c, y, x] = sum over the output positions (oh, ow) whose window covers (y, x) (at most
    # bh x bw of them, one kernel tap each) and over o of dY[n, oh, ow, o] W[o, c, i, j]
    n, o = spec.x_shape[0], u.shape[1]
    bh, bw = -(-kh // sh), -(-kw // sw)
    r2 = np.einsum("ij,ij->i", u, u).reshape(n, oh, ow)
    pad = (bh - 1, bw - 1, bh - 1, bw - 1)  # (top, left, bottom, right)
    box = _window_sums(r2, bh, bw, 1, 1, oh + bh - 1, ow + bw - 1, pad)
    c = spec.x_shape[1]
    wc = np.einsum("ocx,ocx->c", v.reshape(o, c, kh * kw), v.reshape(o, c, kh * kw))
    return float(np.sqrt(box.max())), float(np.sqrt(wc.max())), bh * bw * o


# --- Freivalds with tensor-product vectors -------------------------------------------------------------
def _dot(a: np.ndarray, b: np.ndarray) -> int:
    """sum a_i b_i mod p for field elements (int64)."""
    return int(((a.ravel() * b.ravel()) % P).sum() % P)


def _contract(t: np.ndarray, vec: np.ndarray, axis: int) -> np.ndarray:
    """Contract field array ``t`` (int64) with field vector ``vec`` along ``axis``, mod p."""
    shape = [1] * t.ndim
    shape[axis] = -1
    return ((t * vec.reshape(shape)) % P).sum(axis) % P


class ConvCheck:
    """One repetition of the structured Freivalds test for convolution items of one geometry: the random
    vectors are drawn once (``rand(count)``: fresh uniform field elements, int64), then
    ``lhs(z) == rhs(terms)`` tests ``z == sum_t T(U_t, V_t)`` for a sum of convolution products
    (``terms``: ``(U_q, max|U_q|, V_q, max|V_q|)``, quantised operands as sent, float64 integers). An
    operand's contraction with the vectors is computed once per object and reused by every term and item
    that names it (several items of one round may share one draw: each wrong item still passes with
    probability at most ``4/p``, whatever the others)."""

    def __init__(self, spec: ConvSpec, z_shape: tuple[int, ...], rand: Any):
        self.spec = spec
        n, c, h, w = spec.x_shape
        (kh, kw), (oh, ow) = spec.kernel, spec.out_hw
        if spec.op == "fwd":  # t = a (N) x b (OH) x c (OW) on rows, s (O) on columns
            self.vecs = (rand(n), rand(oh), rand(ow), rand(z_shape[1]))
        elif spec.op == "dw":  # t (O) on rows, s = q (C) x beta (kh) x gamma (kw) on columns
            self.vecs = (rand(z_shape[0]), rand(c), rand(kh), rand(kw))
        else:  # r = a (N) x q (C) x beta (H) x gamma (W) on dX
            self.vecs = (rand(n), rand(c), rand(h), rand(w))
        self._u: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._v: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._kmat: np.ndarray | None = None

    def lhs(self, z: np.ndarray) -> int:
        """The check value of the result ``z`` (float64 integers in [-p/2, p/2])."""
        spec = self.spec
        n = spec.x_shape[0]
        oh, ow = spec.out_hw
        if spec.op == "fwd":
            a, b, cc, s = self.vecs
            zs = exact_matvec(z, HALF, s[:, None])[:, 0].reshape(n, oh, ow)
            return _dot(_contract(_contract(_contract(zs, a, 0), b, 0), cc, 0), np.ones(1, np.int64))
        if spec.op == "dw":
            t, q, beta, gamma = self.vecs
            s_full = (((q[:, None, None] * beta[None, :, None]) % P) * gamma[None, None, :]) % P
            return _dot(exact_matvec(z, HALF, s_full.reshape(-1, 1))[:, 0], t)
        a, q, beta, gamma = self.vecs
        c, h, w = spec.x_shape[1:]
        za = exact_matvec(z.reshape(n, -1).T, HALF, a[:, None])[:, 0].reshape(c, h, w)
        return _dot(_contract(_contract(_contract(za, q, 0), beta, 0), gamma, 0), np.ones(1, np.int64))

    def rhs(self, terms: list[tuple[np.ndarray, float, np.ndarray, float]]) -> int:
        """The check value ``sum_t`` of the product of each term's operands (what ``lhs`` of a correct result is)."""
        total = 0
        for uq, amax_u, vq, amax_v in terms:
            ku, kv = id(uq), id(vq)
            if ku not in self._u or self._u[ku][0] is not uq:
                self._u[ku] = (uq, self._u_side(uq, amax_u))
            if kv not in self._v or self._v[kv][0] is not vq:
                self._v[kv] = (vq, self._v_side(vq, amax_v))
            us, vs = self._u[ku][1], self._v[kv][1]
            if self.spec.op == "dx":
                total += _dot(self._kmatrix(), exact_matvec(us.astype(np.float64), float(P), vs))
            else:
                total += _dot(us, vs)
        return total % P

    def _u_side(self, uq: np.ndarray, amax_u: float) -> np.ndarray:
        spec = self.spec
        n, c, h, w = spec.x_shape
        (kh, kw), (sh, sw) = spec.kernel, spec.strides
        oh, ow = spec.out_hw
        pt, pl, pb, pr = spec.pads
        if spec.op == "fwd":  # t^T cols(X_q): sum_n a_n X_q[n] correlated with b x c (C x kh x kw)
            a, b, cc, _ = self.vecs
            xa = exact_matvec(uq.reshape(n, -1).T, amax_u, a[:, None])[:, 0].reshape(c, h, w)
            xa = np.pad(xa, ((0, 0), (pt, pb), (pl, pr)))
            g = np.empty((c, kh, kw), np.int64)
            for i in range(kh):
                for j in range(kw):
                    g[:, i, j] = _contract(_contract(xa[:, i:i + sh * oh:sh, j:j + sw * ow:sw], cc, 2), b, 1)
            return g
        if spec.op == "dw":  # dY_q t
            t = self.vecs[0]
            return exact_matvec(uq.T, amax_u, t[:, None])[:, 0].reshape(n, oh, ow)
        a = self.vecs[0]  # dx: sum_n a_n dY_q[n] ((OH OW) x O)
        return exact_matvec(uq.reshape(n, -1).T, amax_u, a[:, None])[:, 0].reshape(oh * ow, uq.shape[1])

    def _v_side(self, vq: np.ndarray, amax_v: float) -> np.ndarray:
        spec = self.spec
        n, c, h, w = spec.x_shape
        (kh, kw), (sh, sw) = spec.kernel, spec.strides
        oh, ow = spec.out_hw
        pt, pl, pb, pr = spec.pads
        if spec.op == "fwd":  # W_q s
            return exact_matvec(vq, amax_v, self.vecs[3][:, None])[:, 0]
        if spec.op == "dw":
            _, q, beta, gamma = self.vecs
            xc = exact_matvec(np.ascontiguousarray(vq.transpose(0, 2, 3, 1)).reshape(-1, c), amax_v, q[:, None])
            xc = np.pad(xc[:, 0].reshape(n, h, w), ((0, 0), (pt, pb), (pl, pr)))
            # cols(X_q) s = sum_ij beta_i gamma_j Xc[:, oh s + i, ow s + j], separably: kw taps, then kh taps
            hp = xc.shape[1]
            xg = np.zeros((n, hp, ow), np.int64)
            for j in range(kw):
                xg = (xg + xc[:, :, j:j + sw * ow:sw] * int(gamma[j])) % P
            y = np.zeros((n, oh, ow), np.int64)
            for i in range(kh):
                y = (y + xg[:, i:i + sh * oh:sh, :] * int(beta[i])) % P
            return y
        o = vq.shape[0]  # dx: W_q contracted with q over input channels (O x (kh kw))
        q = self.vecs[1]
        return exact_matvec(np.ascontiguousarray(vq.reshape(o, c, kh * kw).transpose(0, 2, 1)).reshape(-1, c), amax_v,
                            q[:, None])[:, 0].reshape(o, kh * kw)

    def _kmatrix(self) -> np.ndarray:
        """dx: cols(r) factor of beta, gamma: (OH OW) x (kh kw)."""
        if self._kmat is None:
            spec = self.spec
            (kh, kw), (sh, sw) = spec.kernel, spec.strides
            oh, ow = spec.out_hw
            pt, pl, pb, pr = spec.pads
            _, _, beta, gamma = self.vecs
            bp = np.pad(beta, (pt, pb))[np.arange(oh)[:, None] * sh + np.arange(kh)[None, :]]  # OH x kh
            gp = np.pad(gamma, (pl, pr))[np.arange(ow)[:, None] * sw + np.arange(kw)[None, :]]  # OW x kw
            self._kmat = ((bp[:, None, :, None] * gp[None, :, None, :]) % P).reshape(oh * ow, kh * kw)
        return self._kmat
