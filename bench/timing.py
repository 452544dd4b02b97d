"""Timing shared by the bench scripts (they run as ``python bench/<script>.py``, so this folder is on the path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["best_time"]


def best_time(fn: Callable[[], Any], reps: int, warmup: bool = False) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn`` (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)
