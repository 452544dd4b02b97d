"""The trusted side of offload mode: blinds, dispatches, verifies and unblinds; runs every non-linear op.

Threat model in one paragraph (details in docs/offload.md): the enclave is trusted (here: SIMULATED,
see :mod:`veil.offload.runtime`); accelerators are untrusted and may be malicious. They see only
blinded inputs ``z = x_q + r mod p`` with a fresh uniform ``r`` per sample and layer, so ``z`` is
uniform and independent of the data. A wrong answer is caught by Freivalds' check except with
probability ``p^-reps`` per wrong row (p = 2^31 - 1). With ``weight_privacy="none"`` (Slalom) the
accelerator receives the quantised weights; with ``"shares"`` two non-colluding accelerators each get
one uniform additive share, dealt by the enclave.

Online protocol for one query of N samples (each step is numbered in the code):

1. validate the inputs like the plain executor (same errors), reserve N material slots;
2. run the enclave segment (plain executor op functions, float64) up to the next accelerator round;
3. for each layer of the round: choose the activation scale ``2^fx`` per sample so that the exact
   result provably fits in (-p/2, p/2) (L1 and Cauchy-Schwarz bounds), quantise
   ``x_q = round(x 2^fx)``, blind ``z = x_q + r``; send all layers of the round to every accelerator;
4. receive ``Y_j``; reject malformed answers; Freivalds: ``Y_j s == z v_j`` (``v_j = s W_j`` precomputed);
5. unblind ``W_q x_q = sum_j Y_j - u`` (``u = W_q r`` precomputed), decode to float, add the bias;
6. repeat 2-5 until the graph's outputs are computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.errors import ChannelError, InputError, IntegrityError, OptionError
from veil.graph import Graph, TensorSpec, load_model
from veil.net.channel import Channel
from veil.offload.backend import NumpyBackend
from veil.offload.compile import OffloadLayer, OffloadPlan, compile_offload
from veil.offload.errors import AcceleratorProtocolError, AcceleratorUnavailableError, FieldRangeError
from veil.offload.field import HALF, WEIGHT_BITS, P, centered, limbs_f64, mul_full, to_field, uniform_field
from veil.offload.material import LayerMaterial, MaterialStore
from veil.offload.runtime import EnclaveRuntime
from veil.options import check_choice, check_int, check_timeout
from veil.plain import check_inputs, run_plain
from veil.plain import kernels as K

__all__ = ["OffloadEnclave", "default_accelerators", "FX_MAX"]

_NP = NumpyBackend()
FX_MAX = 24  #: cap on the activation fractional bits


def default_accelerators(weight_privacy: str) -> tuple[str, ...]:
    """Party names of the accelerators: one for visible weights, two share holders for ``"shares"``."""
    return ("accelerator0", "accelerator1") if weight_privacy == "shares" else ("accelerator",)


class OffloadEnclave:
    """The enclave party. Create, ``precompute`` (offline), ``connect`` to the accelerators, ``infer``."""

    def __init__(self, model: Any, runtime: EnclaveRuntime, weight_privacy: str = "none",
                 accelerators: Sequence[str] | None = None, freivalds_reps: int = 1, timeout: float = 30.0):
        if not isinstance(runtime, EnclaveRuntime):
            raise OptionError(f"runtime must be an EnclaveRuntime (e.g. SimulatedEnclaveRuntime(hazmat_allow_simulation="
                              f"True)), got {type(runtime).__name__}")
        check_choice(weight_privacy, "weight_privacy", ("none", "shares"))
        self.runtime = runtime
        self.graph: Graph = load_model(model)
        self.plan: OffloadPlan = compile_offload(self.graph, weight_privacy)
        self.accelerators = tuple(accelerators or default_accelerators(weight_privacy))
        need = 2 if weight_privacy == "shares" else 1
        if len(self.accelerators) != need:
            raise OptionError(f"weight privacy {weight_privacy!r} needs {need} accelerator(s), got {self.accelerators}")
        check_int(freivalds_reps, "freivalds_reps", 1, why="Freivalds repetitions per layer")
        check_timeout(timeout)
        self.reps, self.timeout = int(freivalds_reps), float(timeout)
        self.acc_weights = self._deal()
        self.material = MaterialStore(self.plan, runtime,
                                      [[w.reshape(w.shape[0], -1) for w in ws] for ws in self.acc_weights], self.reps)
        self.backends: dict[str, str] = {}
        self.counters = {"queries": 0, "samples": 0, "rounds": 0, "freivalds_checks": 0}
        self.timing = {"offline_s": 0.0, "online_s": 0.0}
        self.last_trace: dict[str, dict[str, np.ndarray]] = {}

    @property
    def soundness_error(self) -> float:
        """Probability that one wrong output row passes the integrity check."""
        return float(P) ** -self.reps

    # --- setup ------------------------------------------------------------------------------------
    def _deal(self) -> list[list[np.ndarray]]:
        """Weights each accelerator gets: W_q itself (Slalom) or uniform additive shares W_0 + W_1 = W_q."""
        out = []
        for lay in self.plan.layers:
            if self.plan.weight_privacy == "none":
                out.append([lay.w_q])
            else:
                w0 = uniform_field(self.runtime.random_bytes(32), lay.w_q.size).reshape(lay.w_q.shape)
                out.append([w0, (to_field(lay.w_q) - w0) % P])
        return out

    def precompute(self, samples: int) -> float:
        """Offline phase: masks, unblinding factors and Freivalds vectors for ``samples`` more samples."""
        t0 = time.perf_counter()
        self.material.precompute(samples)
        dt = time.perf_counter() - t0
        self.timing["offline_s"] += dt
        return dt

    def connect(self, ch: Channel) -> dict[str, str]:
        """Send each accelerator its layers (weights or weight shares); returns their backends."""
        full = self.plan.weight_privacy == "shares"
        for j, acc in enumerate(self.accelerators):
            layers = []
            for lay, ws in zip(self.plan.layers, self.acc_weights, strict=True):
                w = ws[j].astype(np.uint32) if full else ws[j].astype(np.int16 if WEIGHT_BITS < 15 else np.int32)
                spec: dict[str, Any] = {"id": lay.index, "kind": lay.kind, "w": w, "full": full}
                if lay.kind == "conv2d":
                    spec["strides"] = list(lay.node.attrs["strides"])
                    spec["pads"] = list(lay.node.attrs["pads"])
                layers.append(spec)
            self._send(ch, acc, {"type": "setup", "field": P, "plan": self.plan.fingerprint, "layers": layers}, "setup")
        for acc in self.accelerators:
            reply = self._recv(ch, acc, "setup")
            if reply.get("type") != "ready":
                raise AcceleratorProtocolError(f"accelerator {acc!r} refused the setup: {_msg(reply)}")
            self.backends[acc] = str(reply.get("backend"))
        return dict(self.backends)

    def close(self, ch: Channel) -> None:
        """Tell the accelerators to stop (best effort)."""
        for acc in self.accelerators:
            try:
                ch.send(acc, {"type": "bye"})
            except ChannelError:
                pass

    # --- online -----------------------------------------------------------------------------------
    def infer(self, ch: Channel, inputs: Any, keep: bool = False) -> dict[str, np.ndarray]:
        """Run one query (a batch of N samples). ``keep=True`` returns every intermediate tensor and
        fills ``last_trace`` with the per-layer fractional bits and quantisation error bounds."""
        t0 = time.perf_counter()
        feeds = check_inputs(self.graph, inputs)  # step 1
        batches = {v.shape[0] if v.ndim else -1 for v in feeds.values()}
        if len(batches) != 1 or -1 in batches:
            raise InputError(f"all inputs must share one leading batch axis; got leading dims {sorted(batches)}")
        n = batches.pop()
        env: dict[str, np.ndarray] = {k: (v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v)
                                      for k, v in feeds.items()}
        slots = self.material.take(n)
        trace: dict[str, dict[str, np.ndarray]] = {"fx": {}, "bound": {}}
        for step in self.plan.steps:
            if step.where == "enclave":
                self._run_segment(step.nodes, env)  # step 2
            else:
                self._round(ch, step.layers, env, n, slots, trace)  # steps 3-5
        self.counters["queries"] += 1
        self.counters["samples"] += n
        self.timing["online_s"] += time.perf_counter() - t0
        self.last_trace = trace
        out_dtype = np.dtype(self.graph.inputs[0].dtype)
        cast = (lambda a: a.astype(out_dtype)) if np.issubdtype(out_dtype, np.floating) else (lambda a: a)
        if keep:
            return env
        return {o: cast(env[o]) if np.issubdtype(env[o].dtype, np.floating) else env[o] for o in self.graph.outputs}

    @staticmethod
    def _run_segment(nodes: list[Any], env: dict[str, np.ndarray]) -> None:
        produced = {nd.output for nd in nodes}
        needed = list(dict.fromkeys(t for nd in nodes for t in nd.inputs if t not in produced))
        specs = [TensorSpec(t, (None,) * env[t].ndim, env[t].dtype.name) for t in needed]
        sub = Graph(nodes, specs, [nodes[-1].output], name="enclave-segment")
        env.update(run_plain(sub, {t: env[t] for t in needed}, keep=True))

    def _round(self, ch: Channel, layer_ids: list[int], env: dict[str, np.ndarray], n: int, slots: range,
               trace: dict[str, dict[str, np.ndarray]]) -> None:
        rnd = self.counters["rounds"]
        prepared: list[tuple[OffloadLayer, np.ndarray, np.ndarray, LayerMaterial]] = []
        items = []
        for lid in layer_ids:  # step 3
            lay = self.plan.layers[lid]
            x = env[lay.node.inputs[0]]
            if x.size != n * lay.in_size:
                raise InputError(f"layer {lay.node.name!r}: input of shape {x.shape} does not hold {n} samples of "
                                 f"shape {lay.in_shape1}")
            stats = self._row_stats(lay, x, n)
            fx = self._choose_fx(lay, stats)
            xq = np.rint(x.reshape(n, -1) * np.exp2(fx)[:, None]).astype(np.int64)
            mat = self.material.open(lid, slots)
            z = ((xq + mat.r.reshape(n, -1)) % P).reshape(n * lay.in_shape1[0], *lay.in_shape1[1:])
            items.append({"id": lid, "z": z.astype(np.uint32)})
            prepared.append((lay, z, fx, mat))
            trace["fx"][lay.node.name] = fx
            trace["bound"][lay.node.name] = self._error_bound(lay, stats, fx)
        msg = {"type": "compute", "round": rnd, "items": items}
        what = f"round {rnd} (" + ", ".join(p[0].node.name for p in prepared) + ")"
        for acc in self.accelerators:
            self._send(ch, acc, msg, what)
        replies = {acc: self._recv(ch, acc, what) for acc in self.accelerators}  # step 4
        self.counters["rounds"] += 1
        for i, (lay, z, fx, mat) in enumerate(prepared):
            total = -mat.u.reshape(n, -1)
            for j, acc in enumerate(self.accelerators):
                y = self._result(replies[acc], i, acc, lay, z, what)
                bad = self._freivalds(lay, z, y, mat.s, mat.v[:, j], n)
                self.counters["freivalds_checks"] += n * self.reps
                if bad.any():
                    raise IntegrityError(
                        f"accelerator {acc!r} returned a wrong result for layer {lay.node.name!r} "
                        f"({int(bad.sum())} of {n} samples failed Freivalds' check); the query was aborted")
                total = total + y.reshape(n, -1)
            yq = centered(total % P)  # step 5
            y = yq.astype(np.float64) * np.exp2(-(fx + lay.fw).astype(np.float64))[:, None]
            out_shape = (n * lay.out_shape1[0], *lay.out_shape1[1:])
            y = y.reshape(out_shape)
            b = lay.node.params.get("b")
            if b is not None:
                b = b.astype(np.float64)
                y = y + (b if lay.kind == "linear" else b.reshape(1, -1, 1, 1))
            env[lay.node.output] = y

    # --- quantisation -----------------------------------------------------------------------------
    @staticmethod
    def _row_stats(lay: OffloadLayer, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per sample: max |x|, max over dot-product rows of ||row||_1 and of ||row||_2."""
        m = np.abs(x.reshape(n, -1)).max(axis=1) if x.size else np.zeros(n)
        if lay.kind == "linear":
            rows = x.reshape(n, -1, lay.inner)
            l1 = np.abs(rows).sum(-1).max(-1)
            l2 = np.sqrt((rows**2).sum(-1).max(-1))
        else:
            a = lay.node.attrs
            k = lay.w_q.shape[2:]

            def window_max(v: np.ndarray) -> np.ndarray:
                w = K.pool_windows(v.sum(axis=1, keepdims=True), k, a["strides"], a["pads"], 0)
                return w.sum(-1).reshape(n, -1).max(-1)

            l1 = window_max(np.abs(x))
            l2 = np.sqrt(window_max(x**2))
        return m, l1, l2

    @staticmethod
    def _choose_fx(lay: OffloadLayer, stats: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """Largest fx <= FX_MAX such that |W_q x_q| < p/2 is guaranteed for every output (per sample)."""
        m, _, l2 = stats
        limit = HALF * (1 - 1e-9)
        with np.errstate(divide="ignore", invalid="ignore"):
            c1 = (limit / max(lay.l1_q, 1.0) - 0.5) / m  # L1 bound: l1_q (m 2^fx + 1/2) <= limit
            c2 = (limit / max(lay.l2_q, 1.0) - 0.5 * math.sqrt(lay.inner)) / l2  # Cauchy-Schwarz bound
        allowed = np.fmax(c1, c2)
        allowed = np.where(m == 0, 2.0**FX_MAX, allowed)
        if (~(allowed >= 1.0)).any():
            raise FieldRangeError(
                f"layer {lay.node.name!r}: activations are too large for exact arithmetic in F_p (p = 2^31-1) "
                f"with weight scale 2^{lay.fw}; rescale the model's inputs")
        return np.minimum(np.floor(np.log2(allowed)), FX_MAX).astype(np.int64)

    @staticmethod
    def _error_bound(lay: OffloadLayer, stats: tuple[np.ndarray, np.ndarray, np.ndarray], fx: np.ndarray) -> np.ndarray:
        """Per sample, a bound on |offloaded - exact| for every output of the layer:
        2^-(fw+1) ||x_row||_1 + 2^-(fx+1) ||W_row||_1 + K 2^-(fw+fx+2)."""
        l1 = stats[1]
        fw = float(lay.fw)
        return l1 * 2.0 ** -(fw + 1) + lay.l1_w * np.exp2(-(fx + 1.0)) + lay.inner * np.exp2(-(fw + fx + 2.0))

    # --- verification -----------------------------------------------------------------------------
    def _result(self, reply: Any, i: int, acc: str, lay: OffloadLayer, z: np.ndarray, what: str) -> np.ndarray:
        if not isinstance(reply, dict) or reply.get("type") != "result":
            raise AcceleratorProtocolError(f"accelerator {acc!r} failed {what}: {_msg(reply)}")
        items = reply.get("items")
        if not isinstance(items, list) or len(items) <= i:
            raise AcceleratorProtocolError(f"accelerator {acc!r} sent too few results for {what}")
        y = items[i]
        n = z.shape[0] // lay.in_shape1[0]
        want = (*z.shape[:-1], lay.out_features) if lay.kind == "linear" else (n * lay.out_shape1[0], *lay.out_shape1[1:])
        if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.shape != tuple(want):
            got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
            raise AcceleratorProtocolError(f"accelerator {acc!r}: result for layer {lay.node.name!r} is {got}, "
                                           f"expected uint32 {tuple(want)}")
        if y.size and int(y.max()) >= P:
            raise IntegrityError(f"accelerator {acc!r}: result for layer {lay.node.name!r} is outside the field")
        return y.astype(np.int64)

    def _freivalds(self, lay: OffloadLayer, z: np.ndarray, y: np.ndarray, s: np.ndarray, v: np.ndarray,
                   n: int) -> np.ndarray:
        """Per sample: does ``Y s != Z v`` (mod p) for any row? (``v = s W`` was precomputed offline.)"""
        o = lay.out_features
        if lay.kind == "linear":
            yr, zr = y.reshape(n, -1, o), z.reshape(n, -1, lay.inner)
        else:
            a = lay.node.attrs
            yr = y.reshape(n, o, -1).transpose(0, 2, 1)
            zr = K.im2col(z, lay.w_q.shape[2:], a["strides"], a["pads"]).reshape(n, -1, lay.inner)
        sh, sl = limbs_f64(np.ascontiguousarray(s.transpose(0, 2, 1)))
        vh, vl = limbs_f64(np.ascontiguousarray(v.transpose(0, 2, 1)))
        lhs = mul_full(_NP, np.ascontiguousarray(yr), sh, sl, np.matmul)
        rhs = mul_full(_NP, np.ascontiguousarray(zr), vh, vl, np.matmul)
        return (lhs != rhs).reshape(n, -1).any(axis=1)

    # --- channel helpers --------------------------------------------------------------------------
    def _send(self, ch: Channel, acc: str, msg: Any, what: str) -> None:
        try:
            ch.send(acc, msg)
        except ChannelError as e:
            raise AcceleratorUnavailableError(f"accelerator {acc!r} unreachable during {what}: "
                                              f"{type(e).__name__}: {e}") from None

    def _recv(self, ch: Channel, acc: str, what: str) -> Any:
        try:
            return ch.recv(acc, timeout=self.timeout)
        except ChannelError as e:
            raise AcceleratorUnavailableError(f"accelerator {acc!r} did not answer {what} within {self.timeout:g} s: "
                                              f"{type(e).__name__}: {e}") from None


def _msg(reply: Any) -> str:
    if isinstance(reply, dict) and reply.get("type") == "error":
        return "it reported: " + str(reply.get("message", ""))[:300]
    return f"unexpected reply of type {type(reply).__name__}"
