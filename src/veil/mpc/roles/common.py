"""Helpers shared by the roles: abort messages and checked receives."""

from __future__ import annotations

import contextlib
from typing import Any

from veil.errors import ProtocolError
from veil.net.channel import Channel

__all__ = ["recv_msg", "abort_all", "segment_budget", "QUERY_WAIT"]

QUERY_WAIT = 600.0  # how long a party waits for the user's next request


def recv_msg(ch: Channel, peer: str, timeout: float | None = None) -> Any:
    """Receive from ``peer``; an abort message becomes a :class:`ProtocolError` naming its sender."""
    msg = ch.recv(peer, timeout)
    if isinstance(msg, dict) and msg.get("op") == "abort":
        raise ProtocolError(f"party {ch.me!r}: {peer!r} aborted the session: {msg.get('reason', 'no reason given')}")
    return msg


def abort_all(ch: Channel, reason: str) -> None:
    """Tell every reachable peer why this party stops (best effort: peers may be gone)."""
    for p in ch.peers:
        with contextlib.suppress(Exception):
            ch.send(p, {"op": "abort", "reason": reason})


def segment_budget(msg: dict[str, Any], who: str) -> int:
    """The user's material budget per segment from its query message (0: one segment)."""
    v = msg.get("seg_bytes", 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProtocolError(f"{who}: the query's segment budget must be a byte count >= 0, got {v!r}")
    return v
