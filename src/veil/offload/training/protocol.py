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

   * ``accelerator0`` gets ``E, F`` and the seed of ``(A0, B0)``, returns ``Z0 = E (F + B0) + A0 F``;
   * ``accelerator1`` gets ``E, F`` and the seed of ``(A1, B1)``, returns ``Z1 = E B1 + A1 F``;
   * ``accelerator2`` (the triple helper, Goten's third server) gets ``A, B``, returns ``C = A B``;

4. Freivalds, per accelerator, with a fresh secret uniform ``s`` (m x reps):
   ``Z0 s == E((F + B0) s) + A0 (F s)``, ``Z1 s == E (B1 s) + A1 (F s)``, ``C s == A (B s)``;
5. ``U_q V_q = Z0 + Z1 + C`` (since ``EF + EB + AF + AB = (E + A)(F + B)``), lift to (-p/2, p/2],
   divide by ``2^(fu + fv)``.

What each accelerator sees is uniform and independent of ``U`` and ``V``: accelerator0's ``E`` is
masked by ``A1`` and its ``F`` by ``B1``, which it never sees (and symmetrically for accelerator1);
accelerator2 sees only the masks. Any two of them together recover ``U`` and ``V``: the three must
not collude pairwise. The enclave's work is O(nk + km + nm) (masks, subtractions, checks, sum); the
accelerators do the O(nkm) products. Because the masks cancel exactly in F_p, the result does not
depend on them: a training step is bit-for-bit reproducible from the data, weights and scales.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veil.errors import ChannelError, IntegrityError
from veil.net.channel import Channel
from veil.offload.backend import Backend, NumpyBackend
from veil.offload.errors import AcceleratorProtocolError, AcceleratorUnavailableError, FieldRangeError
from veil.offload.field import HALF, MAX_INNER_FULL, P, centered, uniform_field
from veil.offload.runtime import EnclaveRuntime

__all__ = ["TRAIN_ACCELERATORS", "field_matmul", "expand_masks", "choose_scales", "MatmulEngine", "field_matvec", "quantise_pair",
           "PlainMatmul", "SecureMatmul", "ProductRecord"]

#: party names: two share holders and the triple helper
TRAIN_ACCELERATORS = ("accelerator0", "accelerator1", "accelerator2")
_NP = NumpyBackend()
SCALE_MIN, SCALE_MAX = -24, 40  #: range of the fractional bits fu, fv


MAX_INNER_KARATSUBA = 2 ** (53 - 34)  #: exact limit of the three-product (Karatsuba) form (exclusive)


def field_matmul(backend: Backend, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``u @ v mod p`` for field elements (int64 in [0, p)), exact in float64.

    With 16-bit limbs ``u = u1 2^16 + u0``, ``v = v1 2^16 + v0``, Karatsuba needs three float64
    products: ``u1 v1``, ``u0 v0`` and ``(u1 + u0)(v1 + v0)`` (17-bit sums, so partial sums stay below
    2^53 while the inner dimension is < 2^19); ``2^32 = 2 (mod p)``. Wider products fall back to the four
    limb products of :func:`veil.offload.field.mul_full` (inner dimension < 2^21)."""
    k = u.shape[1]
    if k >= MAX_INNER_FULL:
        raise FieldRangeError(f"inner dimension {k} too large for exact field products (< {MAX_INNER_FULL})")
    if k >= MAX_INNER_KARATSUBA:
        return backend.linear(u, backend.prepare(np.ascontiguousarray(v.T), True))
    ut = backend.put(np.ascontiguousarray(u, dtype=np.int64))
    vt = backend.put(np.ascontiguousarray(v.T, dtype=np.int64))
    u1, u0 = ut >> 16, ut & 0xFFFF
    v1, v0 = vt >> 16, vt & 0xFFFF
    f, i = backend.f64, backend.i64
    hh = i(backend.matmul_t(f(u1), f(v1)))
    ll = i(backend.matmul_t(f(u0), f(v0)))
    mid = i(backend.matmul_t(f(u1 + u0), f(v1 + v0))) - hh - ll
    return backend.get((hh % P * 2 + mid % P * (1 << 16) + ll % P) % P)


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


def _sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a - b) % P


def expand_masks(seed: bytes, n: int, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """A share holder's masks ``(A_j (n x k), B_j (k x m))``, uniform in F_p, from its 32-byte seed."""
    r = uniform_field(seed, n * k + k * m)
    return r[: n * k].reshape(n, k), r[n * k:].reshape(k, m)


def choose_scales(u: np.ndarray, v: np.ndarray) -> tuple[int, int]:
    """Fractional bits ``(fu, fv)`` for one product (see :func:`quantise_pair`)."""
    fu, fv, _, _ = quantise_pair(u, v)
    return fu, fv


def quantise_pair(u: np.ndarray, v: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``(fu, fv, U_q, V_q)``: fractional bits for one product, as many as fit, shared so that both
    operands get about the same relative precision (``fu - fv ~ log2(max|V| / max|U|)``), and the
    operands quantised to field elements (int64 in [0, p), negatives as ``p - |x|``).

    Guarantee, entry by entry: ``|(U_q V_q)_ij| <= ||U_q row i||_2 ||V_q col j||_2`` (Cauchy-Schwarz)
    ``<= (2^fu max_i ||U_i||_2 + sqrt(k)/2) (2^fv max_j ||V_j||_2 + sqrt(k)/2) < (p-1)/2`` (rounding moves
    each entry by at most 1/2), so the exact product never wraps around the field."""
    k = u.shape[1]
    ru = float(np.sqrt(np.einsum("ij,ij->i", u, u).max())) if u.size else 0.0
    cv = float(np.sqrt(np.einsum("ij,ij->j", v, v).max())) if v.size else 0.0
    au, av = float(np.abs(u).max()) if u.size else 0.0, float(np.abs(v).max()) if v.size else 0.0
    if ru == 0.0 or cv == 0.0:
        fu = fv = SCALE_MAX // 2
    else:
        total = math.floor(math.log2(HALF / (ru * cv)))
        fu = min(max(round((total + math.log2(av / au)) / 2), SCALE_MIN), SCALE_MAX)
        fv = min(max(total - fu, SCALE_MIN), SCALE_MAX)
        slack = math.sqrt(k) / 2
        while (2.0**fu * ru + slack) * (2.0**fv * cv + slack) >= HALF:
            if fu <= SCALE_MIN and fv <= SCALE_MIN:
                raise FieldRangeError(f"values too large for exact field products (max |U| {au:.3g}, max |V| {av:.3g})")
            if fu >= fv:
                fu -= 1
            else:
                fv -= 1
    return fu, fv, _quantise(u, fu), _quantise(v, fv)


def _quantise(x: np.ndarray, f: int) -> np.ndarray:
    q = np.rint(x * 2.0**f)
    np.add(q, P, out=q, where=q < 0)  # exact in float64: |q| < 2^31
    return q.astype(np.int64)


def _intensity(u: np.ndarray, v: np.ndarray) -> float:
    n, k = u.shape
    m = v.shape[1]
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


@dataclass
class _Pending:
    e: np.ndarray
    f: np.ndarray
    a0: np.ndarray
    a1: np.ndarray
    b0: np.ndarray
    b1: np.ndarray
    fu: int
    fv: int
    shape: tuple[int, int, int] = (0, 0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


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
        """Probability that a wrong result row passes the check (per row, per product)."""
        return float(P) ** -self.reps

    def matmul(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.matmuls([(u, v)])[0]

    def matmuls(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        if self.min_intensity > 0:
            small = [_intensity(u, v) < self.min_intensity for u, v in pairs]
            if any(small):
                res: list[np.ndarray | None] = [self.local.matmul(u, v) if sm else None
                                                for (u, v), sm in zip(pairs, small, strict=True)]
                self.counters["local_products"] = self.counters.get("local_products", 0) + sum(small)
                self.counters["enclave_s"] += self.local.counters["enclave_s"]
                self.local.counters["enclave_s"] = 0.0
                rest = [p for p, sm in zip(pairs, small, strict=True) if not sm]
                outs = iter(self._offload(rest) if rest else [])
                return [r if r is not None else next(outs) for r in res]
        return self._offload(pairs)

    def _offload(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        self.round += 1
        pend: list[_Pending] = []
        msgs: list[list[dict[str, Any]]] = [[], [], []]
        for i, (u, v) in enumerate(pairs):
            n, k = u.shape
            k2, m = v.shape
            if k != k2:
                raise ValueError(f"product shapes do not match: {u.shape} @ {v.shape}")
            if k >= MAX_INNER_FULL:
                raise FieldRangeError(f"inner dimension {k} too large for exact field products (< {MAX_INNER_FULL})")
            fu, fv, uq, vq = quantise_pair(u, v)
            s0, s1 = self.runtime.random_bytes(32), self.runtime.random_bytes(32)
            a0, b0 = expand_masks(s0, n, k, m)
            a1, b1 = expand_masks(s1, n, k, m)
            a, b = _add(a0, a1), _add(b0, b1)
            e, f = _sub(uq, a), _sub(vq, b)
            e32, f32 = e.astype(np.uint32), f.astype(np.uint32)
            msgs[0].append({"id": i, "role": 0, "e": e32, "f": f32, "seed": s0})
            msgs[1].append({"id": i, "role": 1, "e": e32, "f": f32, "seed": s1})
            msgs[2].append({"id": i, "role": 2, "a": a.astype(np.uint32), "b": b.astype(np.uint32)})
            pend.append(_Pending(e, f, a0, a1, b0, b1, fu, fv, (n, k, m)))
            self.records.append(ProductRecord((n, k, m), fu, fv))
            self.counters["products"] += 1
            self.counters["macs"] += n * k * m
        for j, acc in enumerate(self.accs):
            self._send(acc, {"type": "tmatmul", "round": self.round, "items": msgs[j]})
        t_sent = time.perf_counter()
        replies = [self._recv(acc) for acc in self.accs]
        t_back = time.perf_counter()
        outs = []
        for i, p in enumerate(pend):
            zs = [self._result(j, replies[j], i, p.shape) for j in range(3)]
            self._check(zs, p)
            total = _add(_add(zs[0], zs[1]), zs[2])
            outs.append(centered(total).astype(np.float64) * 2.0 ** -(p.fu + p.fv))
        self.counters["rounds"] += 1
        self.counters["wait_s"] += t_back - t_sent
        self.counters["enclave_s"] += (time.perf_counter() - t0) - (t_back - t_sent)
        return outs

    # --- checks -----------------------------------------------------------------------------------
    def _result(self, j: int, reply: Any, i: int, shape: tuple[int, int, int]) -> np.ndarray:
        acc = self.accs[j]
        if not isinstance(reply, dict) or reply.get("type") != "result" or reply.get("round") != self.round:
            msg = reply.get("message") if isinstance(reply, dict) and reply.get("type") == "error" else None
            raise AcceleratorProtocolError(f"accelerator {acc!r} sent a malformed answer to round {self.round}"
                                           + (f": it reported: {str(msg)[:300]}" if msg else ""))
        items = reply.get("items")
        if not isinstance(items, list) or len(items) <= i:
            raise AcceleratorProtocolError(f"accelerator {acc!r} returned too few results in round {self.round}")
        z = items[i]
        n, _, m = shape
        if not isinstance(z, np.ndarray) or z.dtype != np.uint32 or z.shape != (n, m):
            raise AcceleratorProtocolError(f"accelerator {acc!r}: result {i} of round {self.round} must be a uint32 "
                                           f"array of shape {(n, m)}")
        z64 = z.astype(np.int64)
        if z64.size and int(z64.max()) >= P:
            raise IntegrityError(f"accelerator {acc!r} returned values outside the field (round {self.round})")
        return z64

    def _check(self, zs: list[np.ndarray], p: _Pending) -> None:
        """Freivalds, per accelerator (three matrix-vector passes over n x k operands in all)."""
        m, r = p.shape[2], self.reps
        s = uniform_field(self.runtime.random_bytes(32), m * r).reshape(m, r)
        fs, b0s, b1s = field_matvec(p.f, s), field_matvec(p.b0, s), field_matvec(p.b1, s)
        bs = _add(b0s, b1s)
        ew = field_matvec(p.e, np.concatenate([_add(fs, b0s), b1s], axis=1))
        a0w = field_matvec(p.a0, np.concatenate([fs, bs], axis=1))
        a1w = field_matvec(p.a1, np.concatenate([fs, bs], axis=1))
        expect = [_add(ew[:, :r], a0w[:, :r]), _add(ew[:, r:], a1w[:, :r]), _add(a0w[:, r:], a1w[:, r:])]
        for j in range(3):
            self.counters["freivalds_checks"] += 1
            got = field_matvec(zs[j], s)
            if not np.array_equal(got, expect[j]):
                rows = np.flatnonzero((got != expect[j]).any(1))
                raise IntegrityError(f"accelerator {self.accs[j]!r} returned a wrong product in round {self.round} "
                                     f"(Freivalds check failed on {rows.size} of {got.shape[0]} rows)")

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
