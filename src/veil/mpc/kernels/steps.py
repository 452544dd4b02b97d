"""Compound kernels as sequences of primitive protocol steps, planned by a dry run.

A compound kernel (softmax, LayerNorm, GELU...) is a function ``fn(run, *shares)`` written against a
:class:`Runner`: local ring arithmetic on numpy arrays plus calls of the primitive steps

===========  =========================================================  ==========================
step         protocol                                                   cost per server
===========  =========================================================  ==========================
``mul``      Beaver product of two shared arrays (element-wise)         1 round, 16 B per element
``matmul``   Beaver matrix product with batch dims                      1 round, 8 B per operand elt
``trunc``    probabilistic truncation by any number of bits (trunc_a)   1 round, 8 B per element
``select``   ``ys * [x >= 0]`` by exact comparison (select_a/select3)   4 (3 when small) rounds
``onehot``   one-hot of shared integers by a rotated dealer one-hot     1 round, 8 B per element
===========  =========================================================  ==========================

The plan (the list of steps with their sizes) comes from running ``fn`` once with a :class:`Planner`
on zero arrays of the input shapes (at compile time, on every party, from public shapes only): the
dealer's material (:func:`steps_material`) and the declared cost (:func:`steps_cost`) follow from
it, so a kernel cannot drift from its plan. At run time the :class:`Runner` checks every step
against the plan (:class:`~veil.errors.ProtocolError` on a mismatch) and that all were consumed.
Control flow never depends on secret values (SPMD), which is what makes the dry run exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from veil.errors import ProtocolError
from veil.mpc import dealer as D
from veil.mpc import ring
from veil.mpc.dealer import M63
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import arith, compare, products, select3
from veil.mpc.kernels.base import Cost, Ctx, arr, lst
from veil.mpc.sharing import bitslice

__all__ = ["Runner", "Planner", "plan", "steps_material", "steps_cost", "onehot_material", "Step"]

Step = tuple[Any, ...]
_OFF = np.uint64(1 << 62)


def _onehot_material(side: Any, label: str, n: int, k: int, scale: int) -> dict[str, np.ndarray]:
    """``R = (r + k * rho) << scale`` (``r`` uniform in [0, k), ``rho`` uniform in the rest of the ring)
    and the shared one-hot rows of ``r`` (n, k). ``k`` is a power of two."""
    r = side.rand(f"{label}/r", (n,))
    low = lambda: r & np.uint64(k - 1)  # noqa: E731 - dealer only
    big = side.share(f"{label}/R", lambda: (r << np.uint64(scale)), (n,))
    oh = side.share(f"{label}/e", lambda: (low()[:, None] == np.arange(k, dtype=np.uint64)[None, :]).astype(np.uint64),
                    (n, k))
    return {"R": big, "e": oh}


onehot_material = _onehot_material


def _bits(spec: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Per-element truncation amounts from runs ``((count, bits), ...)``."""
    return np.repeat(np.array([b for _, b in spec], np.uint64), [c for c, _ in spec])


def _trunc_material(side: Any, label: str, n: int, bits: np.ndarray) -> dict[str, np.ndarray]:
    """As :func:`veil.mpc.dealer.trunc`, with a number of bits per element."""
    r = side.rand(f"{label}/r", (n,))
    t = side.share(f"{label}/t", lambda: (r & M63) >> bits, (n,))
    u = side.share(f"{label}/u", lambda: r >> np.uint64(63), (n,))
    return {"r": r, "t": t, "u": u}


def _trunc_open(party: int, c: np.ndarray, t: np.ndarray, u: np.ndarray, spec: tuple[tuple[int, int], ...]) -> np.ndarray:
    """:func:`veil.mpc.kernels.arith.trunc_from_open` with a number of bits per run of elements
    (``spec`` as in :func:`_bits`): each run with a scalar shift, written into one array."""
    out = np.empty_like(c)
    i = 0
    for count, bits in _runs(spec):
        j = i + count
        arith.trunc_from_open(party, c[i:j], t[i:j], u[i:j], bits, out=out[i:j])
        i = j
    return out


def _runs(spec: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """Adjacent runs with the same number of bits merged."""
    out: list[tuple[int, int]] = []
    for count, bits in spec:
        if out and out[-1][1] == bits:
            out[-1] = (out[-1][0] + count, bits)
        else:
            out.append((count, bits))
    return out


def steps_material(side: Any, label: str, steps: list[Step], low_latency: int) -> list[Any]:
    """The dealer material of a plan, one item per step (labels ``label/i``)."""
    out: list[Any] = []
    for i, s in enumerate(steps):
        lab = f"{label}/{i}"
        kind = s[0]
        if kind in ("mul", "mul+"):
            n = s[1]
            out.append(D.beaver(side, lab, (n,), (n,), (n,), np.multiply))
        elif kind == "matmul":
            sa, sb, sc = s[1], s[2], s[3]
            out.append(D.beaver(side, lab, sa, sb, sc, ring.bmatmul))
        elif kind == "trunc":
            out.append(_trunc_material(side, lab, s[1], _bits(s[2])))
        elif kind == "select":
            n, w = s[1], s[2]
            out.append((D.compare3 if n <= low_latency else D.compare)(side, lab, n, w))
        elif kind in ("select_t", "select_t*"):
            n, shifts = s[1], np.array(s[2], np.uint64)
            out.append((D.compare3 if n * len(shifts) <= low_latency else D.compare)(side, lab, n, s[3], None, shifts))
        elif kind == "onehot":
            out.append(_onehot_material(side, lab, s[1], s[2], s[3]))
        else:  # pragma: no cover - steps come from the Planner
            raise ProtocolError(f"unknown step {kind!r}")
    return out


def steps_cost(steps: list[Step], low_latency: int) -> Cost:
    """Declared cost (per server) of a plan: the sum of its steps' messages."""
    total = Cost()
    for s in steps:
        kind = s[0]
        if kind == "mul":
            total = total + products.beaver_cost((s[1],), (s[1],))
        elif kind == "matmul":
            total = total + products.beaver_cost(s[1], s[2])
        elif kind == "trunc":
            total = total + arith.trunc_a_cost(s[1])
        elif kind == "select":
            fn = select3.select3_a_cost if s[1] <= low_latency else compare.select_a_cost
            total = total + fn(s[1], width=s[2])
        elif kind in ("select_t", "select_t*"):
            n_all = s[1] * len(s[2])
            fn = select3.select3_a_cost if n_all <= low_latency else compare.select_a_cost
            c = fn(n_all, width=s[3])
            if kind == "select_t":  # its own opening of x + r0 (n elements)
                total = total + Cost(c.rounds, c.bytes - arr("uint64", (n_all,)) + arr("uint64", (s[1],)), c.msgs, c.parts)
            else:  # the opening rode with an earlier product ("mul+")
                total = total + Cost(c.rounds - 1, c.bytes - arr("uint64", (n_all,)), c.msgs - 1, c.parts[1:])
        elif kind == "mul+":
            total = total + Cost().send(lst(arr("uint64", (s[1],)), arr("uint64", (s[1],)), arr("uint64", (s[2],))),
                                        "d, e, and a masked value opened early")
        elif kind == "onehot":
            total = total + Cost().send(arr("uint64", (s[1],)), "masked ids")
    return total


def _split(flat: np.ndarray, like: list[tuple[np.ndarray, Any]]) -> list[np.ndarray]:
    out, i = [], 0
    for a, _ in like:
        out.append(flat[i : i + a.size].reshape(a.shape))
        i += a.size
    return out


class Runner:
    """Runs a compound kernel's steps on one server, consuming the material of its plan in order."""

    def __init__(self, ctx: Ctx, mats: list[Any], steps: list[Step]):
        self.ctx, self.fp = ctx, ctx.fp
        self.party = ctx.party
        self._mats, self._steps, self._i = mats, steps, 0

    def _take(self, step: Step) -> Any:
        i = self._i
        if i >= len(self._steps) or self._steps[i] != step:
            planned = self._steps[i] if i < len(self._steps) else "nothing"
            raise ProtocolError(f"kernel step {i} is {step}, the plan has {planned}")
        self._i += 1
        return self._mats[i]

    def finish(self) -> None:
        if self._i != len(self._steps):
            raise ProtocolError(f"kernel used {self._i} of its {len(self._steps)} planned steps")

    # --- public values as shares ---------------------------------------------------------------
    def public(self, v: np.ndarray) -> np.ndarray:
        """This party's share of a public ring value (party 0 holds it)."""
        v = np.asarray(v, np.uint64)
        return v.copy() if self.party == 0 else np.zeros_like(v)

    # --- primitive steps -----------------------------------------------------------------------
    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Element-wise product of two shared arrays of the same shape (scales add)."""
        mat = self._take(("mul", int(x.size)))
        return products.mul_aa(self.ctx, x.reshape(-1), y.reshape(-1), mat).reshape(x.shape)

    def matmul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Matrix product with batch dims of two shared arrays (scales add)."""
        out_shape = np.broadcast_shapes(x.shape[:-2], y.shape[:-2]) + (x.shape[-2], y.shape[-1])
        mat = self._take(("matmul", tuple(x.shape), tuple(y.shape), tuple(out_shape)))
        d_mine, e_mine = x - mat["a"], y - mat["b"]
        d_o, e_o = self.ctx.exchange([d_mine, e_mine])
        d_mine += d_o
        e_mine += e_o
        return products.bmatmul_finish(self.party, d_mine, e_mine, mat)

    def trunc(self, x: np.ndarray, bits: int) -> np.ndarray:
        """Divide by ``2^bits`` (error < 1 unit of the result, unbiased), any shape. 1 round."""
        return self.trunc_many([(x, bits)])[0]

    def trunc_many(self, items: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """Several truncations (each array by its own number of bits) in one round."""
        spec = tuple((int(x.size), int(b)) for x, b in items)
        mat = self._take(("trunc", sum(c for c, _ in spec), spec))
        flat = np.concatenate([x.reshape(-1) for x, _ in items])
        flat += mat["r"]
        c = self.ctx.open(flat)
        c += _OFF
        out = _trunc_open(self.party, c, mat["t"], mat["u"], spec)
        return _split(out, items)

    def mul_many(self, pairs: list[tuple[np.ndarray, np.ndarray]], open_also: dict[str, Any] | None = None) -> list[np.ndarray]:
        """Several element-wise products (pairs of equal shapes) in one round; ``open_also`` (from
        :meth:`begin_select_thresholds`) rides with the same message."""
        x = np.concatenate([a.reshape(-1) for a, _ in pairs])
        y = np.concatenate([np.broadcast_to(b, a.shape).reshape(-1) for a, b in pairs])
        if open_also is None:
            return _split(self.mul(x, y), pairs)
        mat = self._take(("mul+", int(x.size), int(open_also["masked"].size)))
        d_mine, e_mine = x - mat["a"], y - mat["b"]
        d_o, e_o, c_o = self.ctx.exchange([d_mine, e_mine, open_also["masked"]])
        open_also["c0"] = open_also["masked"] + c_o
        d_mine += d_o
        e_mine += e_o
        return _split(products.beaver_finish(self.party, d_mine, e_mine, mat), pairs)

    def select(self, x: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """``ys * [x >= 0]`` for flat ``x`` (n,) and ``ys`` (width, n): exact comparison."""
        mat = self._take(("select", int(x.size), int(ys.shape[0])))
        return compare.select_a(self.ctx, x, ys, mat)

    def begin_select_thresholds(self, x: np.ndarray, ts: np.ndarray) -> dict[str, Any]:
        """Take the material of :meth:`select_thresholds` now and let its opening ride with the next
        product (``mul_many(..., open_also=handle)``); finish with :meth:`finish_select_thresholds`."""
        n, pad = x.size, (-x.size) % 8
        mat = self._take(("select_t*", n + pad, tuple(int(t) for t in np.asarray(ts, np.uint64)), 1))
        masked = np.concatenate([x, np.zeros(pad, np.uint64)]) + (mat["r"] if mat is not None else np.uint64(0))
        return {"mat": mat, "masked": masked, "n": n, "k": len(ts)}

    def finish_select_thresholds(self, h: dict[str, Any], ys: np.ndarray) -> np.ndarray:
        return self._select_opened(h["mat"], h["c0"], h["n"], h["k"], ys)

    def select_thresholds(self, x: np.ndarray, ts: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """``ys[i] * [x >= t_i]`` for flat shares ``x`` (n,), public ring thresholds ``ts`` (K,) and shares
        ``ys`` (K, n), or (width, K, n) for several values per comparison: one opening of ``x + r0`` serves
        all K comparisons (the dealer's masks are
        ``r0 + t_i``), and its bit slicing and nibble selectors are computed once."""
        n, k = x.size, len(ts)
        pad = (-n) % 8
        width = ys.size // (k * n) if n else 1
        mat = self._take(("select_t", n + pad, tuple(int(t) for t in np.asarray(ts, np.uint64)), width))
        xp = np.concatenate([x, np.zeros(pad, np.uint64)])
        c0 = self.ctx.open(xp + mat["r"])
        return self._select_opened(mat, c0, n, k, ys)

    def _select_opened(self, mat: Any, c0: np.ndarray, n: int, k: int, ys: np.ndarray) -> np.ndarray:
        pad = c0.size - n
        cb0 = bitslice(c0)
        m0 = compare.minterms(cb0)
        opened = (np.tile(c0, k), np.tile(cb0[63:], (1, k)), m0)  # the minterms broadcast over the K blocks
        y3 = ys.reshape(-1, k, n)  # (width, K, n)
        ysp = np.concatenate([y3, np.zeros(y3.shape[:2] + (pad,), np.uint64)], axis=2).reshape(y3.shape[0], -1)
        out = compare.select_a(self.ctx, None, ysp, mat, opened=opened)
        return out.reshape(y3.shape[0], k, n + pad)[:, :, :n].reshape(ys.shape)

    def onehot(self, ids: np.ndarray, k: int, scale: int) -> np.ndarray:
        """Shares of the one-hot rows (n, k) of shared integers ``ids`` (n,) held at ``scale``
        fractional bits (exact integers), ``k`` a power of two: open ``ids + R`` (uniform), rotate the
        dealer's one-hot of ``r`` by the public ``(id + r) mod k``."""
        mat = self._take(("onehot", int(ids.size), int(k), int(scale)))
        c = self.ctx.open(ids + mat["R"])
        u = (c >> np.uint64(scale)) & np.uint64(k - 1)
        j = (u[:, None] - np.arange(k, dtype=np.uint64)[None, :]) & np.uint64(k - 1)
        return np.take_along_axis(mat["e"], j.astype(np.int64), axis=1)


class Planner(Runner):
    """Records the steps of a kernel from public shapes; every step returns zeros."""

    def __init__(self, fp: FixedPoint):
        self.fp = fp
        self.party = 0
        self.steps: list[Step] = []

    def _take(self, step: Step) -> Any:
        self.steps.append(step)
        return None

    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self._take(("mul", int(x.size)))
        return np.zeros(x.shape, np.uint64)

    def matmul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out_shape = np.broadcast_shapes(x.shape[:-2], y.shape[:-2]) + (x.shape[-2], y.shape[-1])
        self._take(("matmul", tuple(x.shape), tuple(y.shape), tuple(out_shape)))
        return np.zeros(out_shape, np.uint64)

    def trunc_many(self, items: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        spec = tuple((int(x.size), int(b)) for x, b in items)
        self._take(("trunc", sum(c for c, _ in spec), spec))
        return [np.zeros(x.shape, np.uint64) for x, _ in items]

    def select(self, x: np.ndarray, ys: np.ndarray) -> np.ndarray:
        self._take(("select", int(x.size), int(ys.shape[0])))
        return np.zeros(ys.shape, np.uint64)

    def select_thresholds(self, x: np.ndarray, ts: np.ndarray, ys: np.ndarray) -> np.ndarray:
        width = ys.size // (len(ts) * x.size) if x.size else 1
        self._take(("select_t", x.size + (-x.size) % 8, tuple(int(t) for t in np.asarray(ts, np.uint64)), width))
        return np.zeros(ys.shape, np.uint64)

    def mul_many(self, pairs: list[tuple[np.ndarray, np.ndarray]], open_also: dict[str, Any] | None = None) -> list[np.ndarray]:
        n = sum(int(a.size) for a, _ in pairs)
        if open_also is None:
            self._take(("mul", n))
        else:
            self._take(("mul+", n, int(open_also["masked"].size)))
        return [np.zeros(a.shape, np.uint64) for a, _ in pairs]

    def finish_select_thresholds(self, h: dict[str, Any], ys: np.ndarray) -> np.ndarray:
        return np.zeros(ys.shape, np.uint64)

    def onehot(self, ids: np.ndarray, k: int, scale: int) -> np.ndarray:
        self._take(("onehot", int(ids.size), int(k), int(scale)))
        return np.zeros((ids.size, k), np.uint64)


def plan(fn: Callable[..., Any], fp: FixedPoint, *shapes: tuple[int, ...]) -> list[Step]:
    """The steps of ``fn`` on inputs of these shapes (a dry run on zeros)."""
    p = Planner(fp)
    fn(p, *[np.zeros(s, np.uint64) for s in shapes])
    return p.steps


