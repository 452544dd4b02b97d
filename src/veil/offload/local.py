"""Run offload mode in one process: the enclave and its accelerator(s) as threads over in-memory channels.

Used by tests, benchmarks and ``veil offload run``. The same party functions run over mutual TLS in a
deployment (:mod:`veil.offload.party`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veil.net.channel import Channel, Stats
from veil.net.local import run_local
from veil.offload.accelerator import Accelerator, serve_accelerator
from veil.offload.enclave import OffloadEnclave

__all__ = ["OffloadRun", "run_offload_local"]


@dataclass
class OffloadRun:
    """Outputs of every query and what it cost."""

    outputs: list[dict[str, np.ndarray]]
    stats: dict[str, Stats]  # per party
    backends: dict[str, str]
    counters: dict[str, int]
    timing: dict[str, float]
    material_left: int
    traces: list[dict[str, Any]] = field(default_factory=list)


def run_offload_local(enclave: OffloadEnclave, queries: Sequence[Any], backend: str = "auto",
                      accelerator_factory: Callable[[str], Accelerator] | None = None, keep: bool = False,
                      timeout: float = 60.0) -> OffloadRun:
    """Connect ``enclave`` to fresh accelerator threads, run every query, say bye.

    Material must already be precomputed (``enclave.precompute``). ``accelerator_factory(name)`` can
    supply custom accelerators (tests use it to model faulty or lying ones).
    """
    outputs: list[dict[str, np.ndarray]] = []
    traces: list[dict[str, Any]] = []

    def enclave_party(ch: Channel) -> dict[str, str]:
        try:
            backends = enclave.connect(ch)
            for q in queries:
                outputs.append(enclave.infer(ch, q, keep=keep))
                traces.append(enclave.last_trace)
            return backends
        finally:
            enclave.close(ch)

    def acc_party(name: str) -> Callable[[Channel], dict[str, Any]]:
        def body(ch: Channel) -> dict[str, Any]:
            acc = accelerator_factory(name) if accelerator_factory else Accelerator(backend)
            return serve_accelerator(ch, "enclave", accelerator=acc, idle_timeout=timeout)
        return body

    parties: dict[str, Callable[[Channel], Any]] = {"enclave": enclave_party}
    for name in enclave.accelerators:
        parties[name] = acc_party(name)
    results, chans = run_local(parties, timeout=timeout)
    return OffloadRun(outputs, {k: c.stats for k, c in chans.items()}, results["enclave"], dict(enclave.counters),
                      dict(enclave.timing), enclave.material.available, traces)
