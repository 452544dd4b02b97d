"""In-process entry point of offload mode, shaped like every mode's ``run``:

>>> outputs, report = veil.offload.run("model.onnx", x, hazmat_allow_simulation=True)   # doctest: +SKIP

``outputs`` holds the enclave's outputs (``{name: array}``; a bare array for single-output models,
as :func:`veil.mpc.run`); ``report`` (:class:`OffloadReport`) the times, bytes, rounds and checks
and, with ``compare=True``, the error against the plain executor on the same input. The enclave is
simulated on machines without SGX: ``hazmat_allow_simulation=True`` is required and a
:class:`~veil.simulation.SimulationWarning` is emitted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from veil.errors import InputError
from veil.options import check_batch_size, check_choice, check_int, check_timeout

__all__ = ["run", "OffloadReport"]


@dataclass
class OffloadReport:
    """What one offload run cost and how close it is to plaintext (the fields every mode reports,
    plus offload's own: Freivalds checks, backends, material left)."""

    images: int = 0
    queries: int = 0
    batch: int = 0
    online_s: float = 0.0
    offline_s: float = 0.0
    online_bytes: int = 0  # enclave <-> accelerators, both directions
    bytes_to_accelerators: int = 0
    bytes_from_accelerators: int = 0
    rounds: int = 0
    freivalds_checks: int = 0
    soundness_error: float = 0.0  # probability that one wrong output row passes a check
    material_left: int = 0
    backends: dict[str, str] = field(default_factory=dict)
    simulated: bool = True
    plain_s: float | None = None
    agreement: float | None = None
    max_abs_error: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{self.images} samples in {self.queries} queries: online {self.online_s * 1e3:.1f} ms, offline "
             f"{self.offline_s * 1e3:.1f} ms, {self.online_bytes / 1e6:.2f} MB enclave<->accelerators, "
             f"{self.rounds} rounds, {self.freivalds_checks} Freivalds checks")
        if self.agreement is not None:
            s += f", agreement {self.agreement:.2%}, max |error| {self.max_abs_error:.2e}"
        return s


def run(model: Any, x: Any, batch_size: int | None = 64, weight_privacy: str = "none", backend: str = "auto",
        freivalds_reps: int = 1, hazmat_allow_simulation: bool = False, compare: bool = True,
        timeout: float = 60.0) -> tuple[Any, OffloadReport]:
    """Offload inference of ``model`` (ONNX path/bytes, shipped network name A-D, or veil Graph) on
    ``x`` (an array, or ``{input name: array}``) with the enclave and its accelerator(s) as threads.

    ``batch_size``: samples per query (``None``: all at once). Bad options are an
    :class:`~veil.errors.OptionError`; bad inputs an :class:`~veil.errors.InputError`."""
    from veil.graph import load_model
    from veil.offload.enclave import OffloadEnclave
    from veil.offload.local import run_offload_local
    from veil.offload.party import load_offload_model
    from veil.offload.runtime import SimulatedEnclaveRuntime
    from veil.plain import check_inputs, run_plain

    batch_size = check_batch_size(batch_size)
    check_choice(weight_privacy, "weight_privacy", ("none", "shares"))
    check_int(freivalds_reps, "freivalds_reps", 1)
    check_timeout(timeout)
    graph = load_offload_model(model) if isinstance(model, str) else load_model(model)
    feeds = check_inputs(graph, x)
    n = next(iter(feeds.values())).shape[0] if feeds else 0
    if n < 1:
        raise InputError("offload needs at least one sample in the input batch")
    runtime = SimulatedEnclaveRuntime(hazmat_allow_simulation=hazmat_allow_simulation)
    enc = OffloadEnclave(graph, runtime, weight_privacy=weight_privacy, freivalds_reps=freivalds_reps,
                         timeout=timeout)
    bs = min(batch_size or n, n)
    offline = enc.precompute(n)
    queries = [{k: v[i:i + bs] for k, v in feeds.items()} for i in range(0, n, bs)]
    res = run_offload_local(enc, queries, backend=backend, timeout=timeout)
    outs = {o: np.concatenate([q[o] for q in res.outputs]) for o in graph.outputs}
    stats = res.stats["enclave"]
    rep = OffloadReport(images=n, queries=len(queries), batch=bs, online_s=res.timing["online_s"], offline_s=offline,
                        online_bytes=stats.bytes_sent + stats.bytes_recv, bytes_to_accelerators=stats.bytes_sent,
                        bytes_from_accelerators=stats.bytes_recv, rounds=res.counters["rounds"],
                        freivalds_checks=res.counters["freivalds_checks"], soundness_error=enc.soundness_error,
                        material_left=res.material_left, backends=dict(res.backends), simulated=runtime.simulated)
    if compare:
        t0 = time.perf_counter()
        ref = run_plain(graph, feeds, dtype=np.float64)
        rep.plain_s = time.perf_counter() - t0
        o = graph.outputs[0]
        got, want = np.asarray(outs[o], np.float64), np.asarray(ref[o], np.float64)
        rep.max_abs_error = float(np.abs(got - want).max()) if got.size else 0.0
        if got.ndim == 2:
            rep.agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
    pred: Any = next(iter(outs.values())) if len(outs) == 1 else outs
    return pred, rep

