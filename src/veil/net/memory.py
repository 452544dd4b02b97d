"""In-memory channels: parties as threads in one process (tests, single-machine runs)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

from veil.errors import ChannelError, PeerDisconnectedError, PeerTimeoutError
from veil.net.channel import Channel

__all__ = ["MemoryNetwork", "MemoryChannel"]

_CLOSED = object()


class MemoryNetwork:
    """A set of named parties connected by in-process queues."""

    def __init__(self, parties: Iterable[str], timeout: float = 30.0):
        self.parties = tuple(parties)
        if len(set(self.parties)) != len(self.parties):
            raise ChannelError(f"duplicate party names in {self.parties}")
        self.timeout = timeout
        self._queues: dict[tuple[str, str], queue.Queue[object]] = {
            (a, b): queue.Queue() for a in self.parties for b in self.parties if a != b
        }
        self._closed: set[str] = set()
        self._lock = threading.Lock()

    def channel(self, name: str) -> MemoryChannel:
        if name not in self.parties:
            raise ChannelError(f"unknown party {name!r}; parties are {list(self.parties)}")
        return MemoryChannel(self, name)

    def _close(self, name: str) -> None:
        with self._lock:
            if name in self._closed:
                return
            self._closed.add(name)
        for p in self.parties:
            if p != name:
                self._queues[(name, p)].put(_CLOSED)


class MemoryChannel(Channel):
    """One party's endpoint on a :class:`MemoryNetwork`."""

    def __init__(self, net: MemoryNetwork, me: str):
        super().__init__(me, net.parties, net.timeout)
        self._net = net

    def _send_bytes(self, peer: str, data: bytes) -> None:
        if self.me in self._net._closed:
            raise ChannelError(f"party {self.me!r}: channel is closed")
        if peer in self._net._closed:
            raise PeerDisconnectedError(f"party {self.me!r}: peer {peer!r} has closed its channel", peer=peer)
        self._net._queues[(self.me, peer)].put(data)

    def _recv_bytes(self, peer: str, timeout: float) -> bytes:
        try:
            item = self._net._queues[(peer, self.me)].get(timeout=timeout)
        except queue.Empty:
            raise PeerTimeoutError(f"party {self.me!r}: no message from {peer!r} within {timeout:g} s", peer=peer) from None
        if item is _CLOSED:
            self._net._queues[(peer, self.me)].put(_CLOSED)  # stay closed for later receives
            raise PeerDisconnectedError(f"party {self.me!r}: peer {peer!r} closed its channel or failed", peer=peer)
        assert isinstance(item, bytes)
        return item

    def close(self) -> None:
        self._net._close(self.me)
