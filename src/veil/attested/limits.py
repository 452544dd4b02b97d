"""Server limits, enforced on real sizes, and a per-credential token-bucket rate limiter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Limits", "RateLimiter"]


@dataclass(frozen=True)
class Limits:
    """``max_model_bytes``: bytes actually received for one model upload.
    ``max_input_elements``: elements actually carried by all inputs of one run request.
    ``max_request_bytes``: bytes actually received for one run request body.
    ``rate_per_s`` / ``burst``: requests per second per credential (token bucket), burst size.
    ``max_models``: models the store may hold (checked under the lock that inserts).
    ``max_output_bytes``: bytes of all outputs of one run (checked before they are encoded).
    ``max_run_seconds``: wall time of one run; onnxruntime stops a run past it.
    ``max_run_memory_bytes``: onnxruntime memory of all runs in progress together (a capped shared
    arena: a tensor that would pass it is refused before it is allocated)."""

    max_model_bytes: int = 256 * 1024 * 1024
    max_input_elements: int = 4 * 1024 * 1024
    max_request_bytes: int = 64 * 1024 * 1024
    rate_per_s: float = 100.0
    burst: int = 200
    max_models: int = 64
    max_output_bytes: int = 64 * 1024 * 1024
    max_run_seconds: float = 60.0
    max_run_memory_bytes: int = 4 * 1024 * 1024 * 1024


class RateLimiter:
    """Token buckets keyed by credential fingerprint; thread-safe."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst = float(rate_per_s), float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token for ``key``; return 0.0 if allowed, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")
