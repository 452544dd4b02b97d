"""Run the parties of a protocol as threads in one process, each with its own channel.

The party context (its channel) is passed in, never global (SPU's ``simulate`` habit). When a
party fails, it tells its peers why (an abort notice) and its channel is closed, so every other
party fails fast (PeerAbortedError naming the party at fault) instead of waiting for a timeout;
the first root error is re-raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from veil.errors import ChannelError, VeilError
from veil.net.channel import Channel
from veil.net.memory import MemoryNetwork

__all__ = ["run_local"]


def run_local(parties: Mapping[str, Callable[[Channel], Any]], timeout: float = 30.0,
              join_timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Channel]]:
    """Run ``parties[name](channel)`` for every name in its own thread.

    Returns (results by party, channels by party, for their ``stats``).
    """
    net = MemoryNetwork(parties, timeout=timeout)
    chans: dict[str, Channel] = {name: net.channel(name) for name in parties}
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def body(name: str) -> None:
        try:
            results[name] = parties[name](chans[name])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[name] = e
            chans[name].abort(e)  # the others stop at once and learn whom to blame
            chans[name].close()

    threads = [threading.Thread(target=body, args=(n,), name=f"veil-{n}", daemon=True) for n in parties]
    for t in threads:
        t.start()
    limit = join_timeout if join_timeout is not None else timeout * 4 + 60
    for t in threads:
        t.join(limit)
    alive = [t.name for t in threads if t.is_alive()]
    if errors:
        # report the root cause: prefer an error that is not a consequence of another party failing
        root = next((e for e in errors.values() if not isinstance(e, ChannelError)), next(iter(errors.values())))
        raise root
    if alive:
        raise VeilError(f"parties {alive} did not finish within {limit:g} s")
    return results, chans
