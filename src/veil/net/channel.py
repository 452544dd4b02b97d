"""The channel base class: every backend's bytes and rounds are counted here, in one place.

A :class:`Channel` is one party's endpoint: ``send(peer, msg)`` and ``recv(peer)`` with a timeout.
Backends implement only ``_send_bytes``, ``_recv_bytes`` and ``close``.

Rounds: a party's round counter increases when it sends after having received (or sends for the
first time). Messages sent back to back, to one peer or several, belong to one round; a
send-then-receive exchange between two servers costs each of them one round. This matches the
latency a protocol pays: one network delay per round.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from veil.errors import ChannelError, PeerAbortedError, VeilError
from veil.net.wire import decode, decode_abort, encode, encode_abort, is_abort

__all__ = ["Channel", "Stats", "abort_reason"]


def abort_reason(error: BaseException | str) -> tuple[str, str | None]:
    """(reason, culprit) to tell peers when a party stops because of ``error``.

    A veil error's message is sent (veil's messages never hold secret values); any other exception
    only by its type. The culprit is the party a channel error blames (a dead or refused peer, or
    the party an abort notice blamed), so that the blame reaches every survivor unchanged."""
    if isinstance(error, str):
        return error, None
    culprit = error.peer if isinstance(error, ChannelError) else None
    if isinstance(error, PeerAbortedError):
        return error.reason, culprit
    if isinstance(error, VeilError):
        return f"{type(error).__name__}: {error}", culprit
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", None
    if isinstance(error, SystemExit):
        # `veil` turns SIGTERM into SystemExit(128 + signal number) (veil.cli.main) so that cleanup runs
        code = error.code
        if isinstance(code, int) and 128 < code < 128 + signal.NSIG:
            try:
                return f"it was stopped ({signal.Signals(code - 128).name})", None
            except ValueError:
                pass
        return f"it exited (status {0 if code is None else code})", None
    return f"internal error ({type(error).__name__})", None


@dataclass
class Stats:
    """Communication counters of one party (payload bytes, excluding transport framing and TLS)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0
    rounds: int = 0
    sent_to: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def copy(self) -> Stats:
        s = Stats(self.bytes_sent, self.bytes_recv, self.msgs_sent, self.msgs_recv, self.rounds)
        s.sent_to.update(self.sent_to)
        return s

    def __sub__(self, other: Stats) -> Stats:
        s = Stats(self.bytes_sent - other.bytes_sent, self.bytes_recv - other.bytes_recv,
                  self.msgs_sent - other.msgs_sent, self.msgs_recv - other.msgs_recv, self.rounds - other.rounds)
        for k, v in self.sent_to.items():
            s.sent_to[k] = v - other.sent_to.get(k, 0)
        return s

    def as_dict(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "bytes_recv": self.bytes_recv, "msgs_sent": self.msgs_sent,
                "msgs_recv": self.msgs_recv, "rounds": self.rounds, "sent_to": dict(self.sent_to)}


class Channel(ABC):
    """One party's connections to its peers."""

    def __init__(self, me: str, peers: Iterable[str], timeout: float = 30.0):
        self.me = me
        self.peers = tuple(p for p in peers if p != me)
        self.timeout = float(timeout)
        self.stats = Stats()
        self._lock = threading.Lock()
        self._last_was_recv = True

    # --- public API -----------------------------------------------------------------------------
    def send(self, peer: str, msg: Any) -> None:
        """Send one message to ``peer``."""
        self._check_peer(peer)
        data = encode(msg)
        with self._lock:
            if self._last_was_recv:
                self.stats.rounds += 1
                self._last_was_recv = False
            self.stats.bytes_sent += len(data)
            self.stats.msgs_sent += 1
            self.stats.sent_to[peer] += len(data)
        self._send_bytes(peer, data)

    def recv(self, peer: str, timeout: float | None = None) -> Any:
        """Receive the next message from ``peer``; :class:`PeerTimeoutError` after ``timeout`` seconds,
        :class:`PeerDisconnectedError` at once if the peer is gone."""
        self._check_peer(peer)
        data = self._recv_bytes(peer, self.timeout if timeout is None else timeout)
        if is_abort(data):
            reason, culprit = decode_abort(data)
            raise PeerAbortedError(self.me, peer, reason, culprit)
        with self._lock:
            self._last_was_recv = True
            self.stats.bytes_recv += len(data)
            self.stats.msgs_recv += 1
        return decode(data)

    def exchange(self, peer: str, msg: Any, timeout: float | None = None) -> Any:
        """Send ``msg`` to ``peer`` and receive its message (both sides call this): one round."""
        self.send(peer, msg)
        return self.recv(peer, timeout)

    def abort(self, error: BaseException | str) -> None:
        """Tell every peer that this party stops and why (best effort, never raises): their pending
        and next receives from this party raise :class:`PeerAbortedError` naming the party at fault."""
        frame = encode_abort(*abort_reason(error))
        for p in self.peers:
            with contextlib.suppress(Exception):
                self._send_abort_bytes(p, frame)

    @contextlib.contextmanager
    def aborting(self) -> Iterator[Channel]:
        """``with channel.aborting(): run(channel)``: any error inside is sent to the peers
        (:meth:`abort`) before it propagates."""
        try:
            yield self
        except BaseException as e:
            self.abort(e)
            raise

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- backend --------------------------------------------------------------------------------
    @abstractmethod
    def _send_bytes(self, peer: str, data: bytes) -> None: ...

    @abstractmethod
    def _recv_bytes(self, peer: str, timeout: float) -> bytes: ...

    def _send_abort_bytes(self, peer: str, data: bytes) -> None:
        """Send an abort notice without waiting for a slow peer (backends override when sends can block)."""
        self._send_bytes(peer, data)

    @abstractmethod
    def close(self) -> None:
        """Close all connections; peers waiting on this party get PeerDisconnectedError."""

    def _check_peer(self, peer: str) -> None:
        if peer not in self.peers:
            raise ChannelError(f"party {self.me!r} has no channel to {peer!r}; its peers are {list(self.peers)}")
