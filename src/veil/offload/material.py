"""Offline phase: one-time masks, unblinding factors and Freivalds vectors, sealed and counted.

For every sample slot ``i`` and every accelerator layer ``l`` (weights ``W``, one share ``W_j`` per
accelerator ``j``) the enclave, ahead of time:

1. draws a fresh 32-byte seed from its trusted randomness and expands it (AES-CTR) into a mask
   ``r`` (uniform in F_p, the layer's input shape for one sample) and ``reps`` Freivalds vectors
   ``s`` (uniform in F_p^O);
2. computes the unblinding factor ``u = W_q r`` (mod p) and the check vectors ``v_j = s W_j`` (mod p);
3. seals ``seed || u || v`` with AES-GCM under its sealing key, with the slot (plan fingerprint,
   layer, sample index) as associated data, and leaves the blob in untrusted storage.

Online, a query of N samples takes the next N slot indices (``take``). Consumption is counted the
moment slots are taken, whether or not the query then succeeds, and every blob is deleted when it is
opened: a mask is never used twice. When fewer than N slots are left, :class:`MaterialExhaustedError`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from veil.errors import MaterialExhaustedError
from veil.offload.backend import NumpyBackend
from veil.offload.compile import OffloadLayer, OffloadPlan
from veil.offload.errors import SealError
from veil.offload.field import limbs_f64, mul_full, mul_small, uniform_field
from veil.offload.runtime import EnclaveRuntime
from veil.options import check_int

__all__ = ["LayerMaterial", "MaterialStore"]

_NP = NumpyBackend()
SEED = 32


@dataclass
class LayerMaterial:
    """Opened material of one layer for a batch of samples (stacked along the first axis)."""

    r: np.ndarray  # (n, *in_shape1) field elements
    u: np.ndarray  # (n, *out_shape1)
    s: np.ndarray  # (n, reps, O)
    v: np.ndarray  # (n, accelerators, reps, K)


class MaterialStore:
    """Sealed per-sample material for every layer of a plan (see module docstring)."""

    def __init__(self, plan: OffloadPlan, runtime: EnclaveRuntime, acc_weights: Sequence[Sequence[np.ndarray]],
                 reps: int = 1):
        self.plan, self.runtime, self.reps = plan, runtime, int(reps)
        self.acc_weights = acc_weights  # per layer, per accelerator: (O, K) int64 (signed small or field)
        self._blobs: dict[tuple[int, int], bytes] = {}  # untrusted storage (host memory)
        self.supplied = 0
        self.consumed = 0
        self._lock = threading.Lock()

    # --- bookkeeping ------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        return self.supplied - self.consumed

    @property
    def stored_bytes(self) -> int:
        return sum(len(b) for b in self._blobs.values())

    def _aad(self, layer: int, slot: int) -> bytes:
        return f"veil-offload|{self.plan.fingerprint}|layer={layer}|slot={slot}".encode()

    # --- offline ----------------------------------------------------------------------------------
    def precompute(self, samples: int, chunk: int = 64) -> None:
        """Produce and seal material for ``samples`` more sample slots."""
        check_int(samples, "samples", 0, why="sample slots of offline material")
        done = 0
        while done < samples:
            m = min(chunk, samples - done)
            first = self.supplied
            for lay in self.plan.layers:
                self._precompute_layer(lay, first, m)
            with self._lock:
                self.supplied += m
            done += m

    def _precompute_layer(self, lay: OffloadLayer, first: int, m: int) -> None:
        seeds = [self.runtime.random_bytes(SEED) for _ in range(m)]
        o, k = lay.out_features, lay.inner
        r = np.empty((m, lay.in_size), np.int64)
        s = np.empty((m, self.reps, o), np.int64)
        for i, seed in enumerate(seeds):
            r[i], s[i] = self._expand(lay, seed)
        u = self._unblinding(lay, r)
        full = self.plan.weight_privacy == "shares"
        v = np.stack([self._check_vectors(s.reshape(m * self.reps, o), w, full).reshape(m, self.reps, k)
                      for w in self.acc_weights[lay.index]], axis=1)
        for i in range(m):
            payload = seeds[i] + u[i].astype("<u4").tobytes() + v[i].astype("<u4").tobytes()
            self._blobs[(lay.index, first + i)] = self.runtime.seal(payload, self._aad(lay.index, first + i))

    def _expand(self, lay: OffloadLayer, seed: bytes) -> tuple[np.ndarray, np.ndarray]:
        flat = uniform_field(seed, lay.in_size + self.reps * lay.out_features)
        return flat[: lay.in_size], flat[lay.in_size:].reshape(self.reps, lay.out_features)

    @staticmethod
    def _unblinding(lay: OffloadLayer, r: np.ndarray) -> np.ndarray:
        """u = W_q r (mod p) for m stacked masks r (m, in_size) -> (m, out_size)."""
        m = r.shape[0]
        shp = (m * lay.in_shape1[0], *lay.in_shape1[1:])
        rb = r.reshape(shp)
        if lay.kind == "linear":
            u = _NP.linear(rb.reshape(-1, lay.inner), _NP.prepare(lay.w_mat, full=False))
        else:
            a = lay.node.attrs
            u = _NP.conv2d(rb, _NP.prepare(lay.w_q, full=False), a["strides"], a["pads"])
        return u.reshape(m, lay.out_size)

    @staticmethod
    def _check_vectors(s: np.ndarray, w: np.ndarray, full: bool) -> np.ndarray:
        """v = s W (mod p): s (rows, O) field, w (O, K) signed small or (full) field elements -> (rows, K)."""
        if not full:  # small signed weights (Slalom): two limb products
            return mul_small(_NP, s, w.T.astype(np.float64), _NP.matmul_t)
        hi, lo = limbs_f64(np.ascontiguousarray(w.T))
        return mul_full(_NP, s, hi, lo, _NP.matmul_t)

    # --- online -----------------------------------------------------------------------------------
    def take(self, n: int) -> range:
        """Reserve (and count as consumed) the next ``n`` sample slots."""
        with self._lock:
            if n > self.available:
                raise MaterialExhaustedError(
                    f"offload mode: a query of {n} samples needs {n} precomputed mask/unblinding slots but only "
                    f"{self.available} are left ({self.supplied} produced, {self.consumed} used); run the offline "
                    "phase (precompute) again - material is never reused")
            first = self.consumed
            self.consumed += n
        return range(first, first + n)

    def open(self, layer: int, slots: range) -> LayerMaterial:
        """Unseal (and delete) one layer's material for the given slots."""
        lay = self.plan.layers[layer]
        nacc = len(self.acc_weights[layer])
        ou, ov = SEED, SEED + 4 * lay.out_size
        rs, us, ss, vs = [], [], [], []
        for slot in slots:
            blob = self._blobs.pop((layer, slot), None)
            if blob is None:
                raise SealError(f"sealed material for layer {lay.node.name!r}, slot {slot} is missing from storage")
            data = self.runtime.unseal(blob, self._aad(layer, slot))
            r, s = self._expand(lay, data[:SEED])
            rs.append(r)
            ss.append(s)
            us.append(np.frombuffer(data[ou:ov], "<u4").astype(np.int64))
            vs.append(np.frombuffer(data[ov:], "<u4").astype(np.int64).reshape(nacc, self.reps, lay.inner))
        n = len(slots)
        return LayerMaterial(np.stack(rs).reshape(n, *lay.in_shape1), np.stack(us).reshape(n, *lay.out_shape1),
                             np.stack(ss), np.stack(vs))
