"""A test hook for fault injection across processes: ``VEIL_MPC_STOP_AT="server1:NAME"`` makes that party
print ``server1: stopped at NAME`` (to its log) when it enters a compound kernel (softmax, LayerNorm,
GELU, ...) whose node name contains ``NAME``, and then wait, so that a test can kill it while the
others are inside that step (e.g. an attention softmax). Unset (the default), it does nothing. It only
ever stalls the party whose environment sets it: a stalled party is what a dead or slow one looks like
to its peers, which stop at their receive timeout or when its connections close."""

from __future__ import annotations

import os
import sys
import time

__all__ = ["stop_point", "STOP_ENV"]

STOP_ENV = "VEIL_MPC_STOP_AT"


def stop_point(party: str, name: str) -> None:
    """Stall here if ``VEIL_MPC_STOP_AT`` names this party and a substring of ``name``."""
    spec = os.environ.get(STOP_ENV)
    if not spec:
        return
    who, _, where = spec.partition(":")
    if who == party and where and where in name:
        print(f"{party}: stopped at {name} ({STOP_ENV})", file=sys.stdout, flush=True)
        while True:
            time.sleep(60)
