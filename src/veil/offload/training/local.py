"""Run offload training in one process: the enclave and three accelerators as threads over in-memory
channels (tests and benchmarks). The same roles run as processes over mutual TLS in a deployment
(:mod:`veil.offload.training.party`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from veil.net.channel import Channel, Stats
from veil.net.local import run_local
from veil.offload.runtime import EnclaveRuntime
from veil.offload.training.accelerator import TrainAccelerator, serve_train_accelerator
from veil.offload.training.protocol import TRAIN_ACCELERATORS, SecureMatmul
from veil.offload.training.trainer import Trainer

__all__ = ["TrainRun", "train_offload_local"]


@dataclass
class TrainRun:
    """Losses, per-party traffic and the engine's counters of one local run."""

    losses: list[float]
    stats: dict[str, Stats]
    counters: dict[str, float]
    backends: dict[str, str]


def train_offload_local(trainer: Trainer, runtime: EnclaveRuntime, backend: str = "numpy", steps: int | None = None,
                        accelerator_factory: Callable[[str], TrainAccelerator] | None = None,
                        freivalds_reps: int = 1, timeout: float = 60.0, checkpoint: Any = None,
                        checkpoint_every: int = 0, on_step: Any = None, min_intensity: float = 0.0) -> TrainRun:
    """Train ``trainer`` (``steps`` more steps, default: to the end) with accelerator threads.

    ``min_intensity``: see :class:`~veil.offload.training.protocol.SecureMatmul` (0: offload every product)."""
    counters: dict[str, float] = {}
    start = len(trainer.history)

    def enclave(ch: Channel) -> None:
        eng = SecureMatmul(ch, runtime, freivalds_reps=freivalds_reps, timeout=timeout, min_intensity=min_intensity)
        try:
            trainer.train(eng, on_step=on_step, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                          runtime=runtime, stop_after=steps)
        finally:
            counters.update(eng.counters)
            eng.close()

    def acc(name: str) -> Callable[[Channel], dict[str, Any]]:
        def body(ch: Channel) -> dict[str, Any]:
            a = accelerator_factory(name) if accelerator_factory else TrainAccelerator(backend)
            return serve_train_accelerator(ch, "enclave", accelerator=a, idle_timeout=timeout)
        return body

    parties: dict[str, Callable[[Channel], Any]] = {"enclave": enclave}
    for name in TRAIN_ACCELERATORS:
        parties[name] = acc(name)
    results, chans = run_local(parties, timeout=timeout)
    return TrainRun(trainer.history[start:], {k: c.stats for k, c in chans.items()}, counters,
                    {k: v["backend"] for k, v in results.items() if k != "enclave"})
