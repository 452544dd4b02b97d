"""What every kernel shares: the server context and declared costs.

A kernel runs on both servers at once (SPMD): each holds a :class:`Ctx` with its party index, its
channel and its peer. Costs are declared per server (both servers send the same amounts) as the
exact list of messages a kernel sends, so tests compare them byte for byte with the channel's
counters (:mod:`veil.net.channel` counts payload bytes including veil's own array header).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from veil.mpc.fixedpoint import FixedPoint
from veil.net.channel import Channel

__all__ = ["Ctx", "Cost", "arr", "lst"]


@dataclass
class Ctx:
    """One server's context: party index (0 or 1), channel, peer name, fixed-point format."""

    party: int
    ch: Channel
    peer: str
    fp: FixedPoint

    def exchange(self, msg: Any) -> Any:
        """Send ``msg`` to the other server and receive its message: one round."""
        return self.ch.exchange(self.peer, msg)

    def open(self, share: np.ndarray) -> np.ndarray:
        """Reconstruct an arithmetic value towards both servers (one round)."""
        return share + self.exchange(share)

    def open_bits(self, share: np.ndarray) -> np.ndarray:
        return share ^ self.exchange(share)


def arr(dtype: str, shape: tuple[int, ...]) -> int:
    """Wire size of one array message (mirrors :mod:`veil.net.wire`)."""
    head = json.dumps([dtype, [int(d) for d in shape]]).encode()
    return 1 + 12 + len(head) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def lst(*sizes: int) -> int:
    """Wire size of a list message made of items of the given sizes."""
    return 1 + 4 + sum(sizes)


@dataclass
class Cost:
    """Declared communication of one kernel, per server."""

    rounds: int = 0
    bytes: int = 0
    msgs: int = 0
    parts: list[str] = field(default_factory=list)

    def send(self, size: int, what: str = "") -> Cost:
        self.rounds += 1
        self.bytes += size
        self.msgs += 1
        if what:
            self.parts.append(what)
        return self

    def __add__(self, o: Cost) -> Cost:
        return Cost(self.rounds + o.rounds, self.bytes + o.bytes, self.msgs + o.msgs, self.parts + o.parts)
