"""Run one kernel on two in-process servers with a local dealer (SPU's ``simulate`` habit).

Used by the tests and handy for experiments: ``simulate(fn, material, shares)`` deals the
material with fresh seeds, gives each server its view, runs ``fn(ctx, material, *my_shares)`` on
both servers as threads over in-memory channels, and returns both outputs and both channels
(for their byte and round counters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels.base import Ctx
from veil.mpc.material import DealerSide, ServerSide
from veil.mpc.prg import Prg, new_seed
from veil.net.channel import Channel
from veil.net.local import run_local

__all__ = ["simulate"]


def simulate(fn: Callable[..., Any], material: Callable[[Any], Any] | None, shares: Sequence[Sequence[Any]],
             fp: FixedPoint | None = None, timeout: float = 30.0) -> tuple[list[Any], dict[str, Channel], Any]:
    """Returns ([out0, out1], channels, the dealer's full material)."""
    fp = fp or FixedPoint()
    s0, s1 = new_seed(), new_seed()
    full = None
    views: list[Any] = [None, None]
    if material is not None:
        dealer = DealerSide(Prg(s0), Prg(s1))
        full = material(dealer)
        views = [material(ServerSide(0, Prg(s0))), material(ServerSide(1, Prg(s1), dealer.corrections))]

    def party(i: int) -> Callable[[Channel], Any]:
        return lambda ch: fn(Ctx(i, ch, f"server{1 - i}", fp), views[i], *shares[i])

    res, chans = run_local({"server0": party(0), "server1": party(1)}, timeout=timeout)
    return [res["server0"], res["server1"]], chans, full
