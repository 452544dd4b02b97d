"""Products: share x public (local), share x share (Beaver), share x fixed secret weight (masked once).

``matmul_ap`` / ``conv_ap`` / ``mul_ap``: a public operand multiplies each share locally (0 rounds).

``mul_aa`` / ``matmul_aa`` (Beaver, CRYPTO'91; the dealer-triple form of SPDZ/Pond):
  1. dealer: ``a``, ``b`` uniform, ``c = a * b`` (or ``a @ b``) shared;
  2. open ``d = x - a`` and ``e = y - b`` in one message (1 round);
  3. ``z = d*e [party 0] + d*[b] + [a]*e + [c]``.

``linear_aw`` / ``conv_aw``, for a weight ``W`` that is secret but fixed across queries (the
"w" kind). Setup (once): the dealer draws a mask ``B`` for ``W`` from the two seeds (nothing sent),
the servers open ``F = W - B`` to each other (``F`` is uniform to them). Per query:
  1. offline, the dealer draws ``A`` (mask of the layer input) from both seeds and sends server1
     its share of ``C = A @ B`` (8 bytes per output element); each server precomputes
     ``P_i = A_i @ F + C_i`` (:func:`prepare_aw`);
  2. online, open ``E = X - A`` (1 round, one input-sized array per server);
  3. ``Z_i = E @ W_i + P_i`` (sum: ``E@W + A@F + A@B = (E + A) @ W``).
This is Beaver's trick with the weight half of the triple reused, which is safe because it only
ever masks the same ``W`` (Mohassel-Zhang, SecureML S&P'17, Sec. 4.2 uses the same idea for
fixed matrices); ``A`` is fresh for every query. Online cost: one ring product and one opening.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.mpc import ring
from veil.mpc.kernels.base import Cost, Ctx, arr, lst

__all__ = ["FixedWeight", "mul_aa", "matmul_aa", "matmul_ap", "conv_ap", "linear_aw", "conv_aw", "prepare_aw",
           "product_aw_cost", "beaver_cost", "weight_op", "beaver_finish", "bmatmul_finish"]


@dataclass
class FixedWeight:
    """One server's view of a fixed secret weight: its share ``W_i`` (decomposed once for the ring
    matmul: it is used online) and the opened ``F = W - B`` (used offline only, by :func:`prepare_aw`;
    for a linear/embedding layer kept as the uint64 matrix, a third of the limbs' memory, and split at
    each use). ``conv`` holds (strides, pads, kernel, out_channels)."""

    w_limbs: Any  # ring.Limbs, or one per group for a grouped convolution
    f_limbs: Any  # ring.Limbs (convolutions) or the (in, out) uint64 matrix (linear, embedding)
    conv: tuple[Any, ...] | None = None

    @staticmethod
    def build(w_share: np.ndarray, f_open: np.ndarray, conv: tuple[Any, ...] | None = None) -> FixedWeight:
        def mat(w: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)  # linear (out,in) / conv (O,I,kh,kw)
        g = _groups(conv)
        if g == 1:
            return FixedWeight(ring.Limbs(mat(w_share)), mat(f_open) if conv is None else ring.Limbs(mat(f_open)), conv)
        og = w_share.shape[0] // g
        return FixedWeight([ring.Limbs(mat(w_share[i * og : (i + 1) * og])) for i in range(g)],
                           [ring.Limbs(mat(f_open[i * og : (i + 1) * og])) for i in range(g)], conv)

    def apply(self, x: np.ndarray, limbs: Any) -> np.ndarray:
        if self.conv is None:
            return ring.matmul(x, limbs)
        strides, pads, kernel, o = self.conv[:4]
        g = _groups(self.conv)
        if g == 1:
            return ring.conv2d(x, limbs, strides, pads, kernel, o)
        cg = x.shape[1] // g
        return np.concatenate([ring.conv2d(x[:, i * cg : (i + 1) * cg], limbs[i], strides, pads, kernel, o // g)
                               for i in range(g)], axis=1)


def _groups(conv: tuple[Any, ...] | None) -> int:
    return int(conv[4]) if conv is not None and len(conv) > 4 else 1


def weight_op(conv: tuple[Any, ...] | None):
    """The plain ring operation ``op(x, W)`` of a layer (used by the dealer for ``C = A op B``)."""
    if conv is None:
        return lambda a, w: ring.matmul(a, np.ascontiguousarray(w.T))
    strides, pads = conv[0], conv[1]
    g = _groups(conv)
    if g == 1:
        return lambda a, w: ring.conv2d(a, w, strides, pads)

    def grouped(a: np.ndarray, w: np.ndarray) -> np.ndarray:
        cg, og = a.shape[1] // g, w.shape[0] // g
        return np.concatenate([ring.conv2d(a[:, i * cg : (i + 1) * cg], w[i * og : (i + 1) * og], strides, pads)
                               for i in range(g)], axis=1)
    return grouped


def prepare_aw(fw: FixedWeight, mat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Offline step 1 on a server: ``P_i = A_i op F + C_i``."""
    return {"A": mat["A"], "P": fw.apply(mat["A"], fw.f_limbs) + mat["C"]}


def linear_aw(ctx: Ctx, x: np.ndarray, fw: FixedWeight, mat: dict[str, np.ndarray]) -> np.ndarray:
    """``x @ W.T`` for shares ``x`` (N, in) and the fixed secret ``W``: 1 round."""
    e = ctx.open(x - mat["A"])
    return fw.apply(e, fw.w_limbs) + mat["P"]


conv_aw = linear_aw  # same protocol; the FixedWeight knows it is a convolution


def product_aw_cost(x_shape: Sequence[int]) -> Cost:
    return Cost().send(arr("uint64", tuple(x_shape)), "masked input E")


def beaver_finish(party: int, d: np.ndarray, e: np.ndarray, mat: dict[str, np.ndarray]) -> np.ndarray:
    """``z_i = d*e [party 0] + d*b_i + a_i*e + c_i`` for the opened ``d``, ``e`` (element-wise; ``e``
    is overwritten). Party 0 computes ``d*(b_0 + e)``: one product less."""
    if d.shape != e.shape:  # broadcasting operands
        z = d * mat["b"] + mat["a"] * e + mat["c"]
        return z + d * e if party == 0 else z
    z = mat["b"] + e if party == 0 else mat["b"] * d
    if party == 0:
        z *= d
    e *= mat["a"]
    z += e
    z += mat["c"]
    return z


def mul_aa(ctx: Ctx, x: np.ndarray, y: np.ndarray, mat: dict[str, np.ndarray]) -> np.ndarray:
    """Element-wise product of two shared tensors of the same shape: 1 round."""
    d_mine, e_mine = x - mat["a"], y - mat["b"]
    d_o, e_o = ctx.exchange([d_mine, e_mine])
    d_mine += d_o
    e_mine += e_o
    return beaver_finish(ctx.party, d_mine, e_mine, mat)


def matmul_aa(ctx: Ctx, x: np.ndarray, y: np.ndarray, mat: dict[str, np.ndarray]) -> np.ndarray:
    """Matrix product of two shared tensors (batch dims broadcast, as numpy): 1 round."""
    d_mine, e_mine = x - mat["a"], y - mat["b"]
    d_o, e_o = ctx.exchange([d_mine, e_mine])
    d_mine += d_o
    e_mine += e_o
    return bmatmul_finish(ctx.party, d_mine, e_mine, mat)


def bmatmul_finish(party: int, d: np.ndarray, e: np.ndarray, mat: dict[str, np.ndarray]) -> np.ndarray:
    """``z_i = d@e [party 0] + d@b_i + a_i@e + c_i``; party 0 computes ``d@(b_0 + e)``: two ring
    products per party."""
    z = ring.bmatmul(d, mat["b"] + e if party == 0 else mat["b"])
    z += ring.bmatmul(mat["a"], e)
    z += mat["c"]
    return z


def beaver_cost(x_shape: Sequence[int], y_shape: Sequence[int]) -> Cost:
    return Cost().send(lst(arr("uint64", tuple(x_shape)), arr("uint64", tuple(y_shape))), "d, e")


def matmul_ap(x: np.ndarray, p: np.ndarray | ring.Limbs) -> np.ndarray:
    """Shares times a public matrix (local)."""
    return ring.matmul(x, p)


def conv_ap(x: np.ndarray, w: np.ndarray, strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Convolution of shares with a public kernel (local)."""
    return ring.conv2d(x, w, strides, pads)
