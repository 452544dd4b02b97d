"""Seed-compressed correlated randomness: one description, two views (dealer and server).

The dealer holds seed ``s0`` (shared with server0) and ``s1`` (shared with server1). Material is
described once, by a function of a *side* (see :mod:`veil.mpc.dealer`):

* ``side.rand(label, shape)``: a uniform secret ``v = PRG(s0, label) + PRG(s1, label)``. Nothing
  is sent: each server expands its own half, the dealer knows ``v``.
* ``side.share(label, fn, shape)``: a secret that depends on others (e.g. ``c = a * b``). Server0's
  share is ``PRG(s0, label)``; server1's share ``fn() - PRG(s0, label)`` is the only thing sent
  (the *correction*). The dealer evaluates ``fn``; servers never call it.
* ``rand_bits`` / ``share_bits``: the same for XOR-shared packed bits (uint8).

:class:`DealerSide` collects server1's corrections; :class:`ServerSide` replays the same calls
with one seed (and, for server1, the received corrections). Since every label is drawn once
(:class:`~veil.mpc.prg.Prg`), material is never reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from veil.errors import MaterialExhaustedError, ProtocolError
from veil.mpc.prg import Prg

__all__ = ["DealerSide", "ServerSide", "SizeSide", "MaterialStore"]

Shape = tuple[int, ...]


class DealerSide:
    """The dealer's view: full values; records server1's corrections."""

    is_dealer = True

    def __init__(self, g0: Prg, g1: Prg):
        self.g0, self.g1 = g0, g1
        self.corrections: dict[str, np.ndarray] = {}

    def rand(self, label: str, shape: Shape) -> np.ndarray:
        return self.g0.words(label, shape) + self.g1.words(label, shape)

    def share(self, label: str, fn: Callable[[], np.ndarray], shape: Shape) -> np.ndarray:
        v = np.asarray(fn(), np.uint64)
        if v.shape != tuple(shape):
            raise ProtocolError(f"material {label!r}: dealer produced shape {v.shape}, planned {shape}")
        self.corrections[label] = v - self.g0.words(label, shape)
        return v

    def rand_bits(self, label: str, shape: Shape) -> np.ndarray:
        return self.g0.bytes_(label, shape) ^ self.g1.bytes_(label, shape)

    def share_bits(self, label: str, fn: Callable[[], np.ndarray], shape: Shape) -> np.ndarray:
        v = np.asarray(fn(), np.uint8)
        if v.shape != tuple(shape):
            raise ProtocolError(f"material {label!r}: dealer produced shape {v.shape}, planned {shape}")
        self.corrections[label] = v ^ self.g0.bytes_(label, shape)
        return v


class ServerSide:
    """A server's view: its own share of every value."""

    is_dealer = False

    def __init__(self, party: int, g: Prg, corrections: dict[str, np.ndarray] | None = None):
        self.party, self.g = party, g
        self.corrections = dict(corrections or {})
        self._early: dict[str, np.ndarray] = {}

    def prefetch(self, label: str, shape: Shape) -> np.ndarray:
        """Draw a seeded value before the dealer's corrections arrive (to precompute with it); the
        later ``rand`` of the same label returns it instead of drawing again."""
        v = self.g.words(label, shape)
        self._early[label] = v
        return v

    def rand(self, label: str, shape: Shape) -> np.ndarray:
        if label in self._early:
            return self._early.pop(label)
        return self.g.words(label, shape)

    def rand_bits(self, label: str, shape: Shape) -> np.ndarray:
        return self.g.bytes_(label, shape)

    def _corr(self, label: str, shape: Shape) -> np.ndarray:
        try:
            v = self.corrections.pop(label)
        except KeyError:
            raise MaterialExhaustedError(f"server1 has no dealer correction for {label!r}") from None
        if tuple(v.shape) != tuple(shape):
            raise ProtocolError(f"dealer correction {label!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
        return v

    def share(self, label: str, fn: Callable[[], np.ndarray], shape: Shape) -> np.ndarray:
        # server1 keeps the received correction itself (no copy: it is popped from ``corrections``)
        return self.g.words(label, shape) if self.party == 0 else np.asarray(self._corr(label, shape), np.uint64)

    def share_bits(self, label: str, fn: Callable[[], np.ndarray], shape: Shape) -> np.ndarray:
        return self.g.bytes_(label, shape) if self.party == 0 else np.asarray(self._corr(label, shape), np.uint8)


class SizeSide:
    """Counts the bytes of one server's view of some material, drawing nothing (read-only zero
    views of the planned shapes): how a program is cut into segments."""

    is_dealer = False

    def __init__(self) -> None:
        self.nbytes = 0

    def _zeros(self, shape: Shape, dtype: Any) -> np.ndarray:
        shape = tuple(shape)
        self.nbytes += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return np.broadcast_to(np.zeros((), dtype), shape)

    def rand(self, label: str, shape: Shape) -> np.ndarray:
        return self._zeros(shape, np.uint64)

    def rand_bits(self, label: str, shape: Shape) -> np.ndarray:
        return self._zeros(shape, np.uint8)

    def share(self, label: str, fn: Callable[[], np.ndarray], shape: Shape) -> np.ndarray:
        return self._zeros(shape, np.uint64)

    def share_bits(self, label: str, fn: Callable[[], np.ndarray], shape: Shape) -> np.ndarray:
        return self._zeros(shape, np.uint8)


class MaterialStore:
    """One server's material for one query, consumed exactly once per key."""

    def __init__(self, query: str):
        self.query = query
        self._items: dict[str, dict[str, Any]] = {}
        self.taken: list[str] = []

    def put(self, key: str, item: dict[str, Any]) -> None:
        if key in self._items or key in self.taken:
            raise ProtocolError(f"material {key!r} of query {self.query!r} produced twice")
        self._items[key] = item

    def take(self, key: str) -> dict[str, Any]:
        try:
            item = self._items.pop(key)
        except KeyError:
            why = "already consumed" if key in self.taken else "never produced"
            raise MaterialExhaustedError(f"material {key!r} for query {self.query!r} is {why}; material is never reused") from None
        self.taken.append(key)
        return item

    def transform(self, key: str, fn: Any) -> None:
        """Replace an unconsumed item by ``fn(item)`` (offline precomputation)."""
        self._items[key] = fn(self._items[key])

    def __len__(self) -> int:
        return len(self._items)
