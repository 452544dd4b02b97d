"""Multi-step sessions: a decoder generating tokens under mpc with its key/value cache kept as
shares on the servers.

>>> ids, report = veil.mpc.generate(load_llama2c(path), steps=20)      # doctest: +SKIP

The model provides one graph per position (``model.step_graph(pos)``, or a callable ``pos ->
Graph``), each with the same secret weights; ``graph.meta["state"]`` maps the inputs fed from the
previous step (``past_k_l``...) to the outputs that produce them (``present_k_l``...). The owner
publishes all step graphs at setup; for every position the user sends only the share of the new
token id, the servers run the step with the state they kept (never revealed, never sent back), keep
the new state, and return only the logits, from which the user picks the next token (greedy).

Leaks beyond a single query: the number of steps (hence the sequence length) and the timing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from veil.errors import OptionError
from veil.graph.ir import Graph
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.party import blas_single_thread
from veil.mpc.report import Report
from veil.mpc.roles import dealer_role, owner_role, server_role
from veil.mpc.roles.user import user_generate_role
from veil.net.local import run_local

__all__ = ["generate", "generate_session", "step_graphs"]


def step_graphs(model: Any, positions: int) -> list[Graph]:
    """The graphs of positions 0 .. positions-1 (``model.step_graph`` or a callable)."""
    fn: Callable[[int], Graph] = model.step_graph if hasattr(model, "step_graph") else model
    return [fn(p) for p in range(positions)]


def generate_session(model: Any, steps: int, prompt: Sequence[int] = (1,), frac_bits: int = 16,
                     timeout: float = 300.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The five roles as threads; returns (results by party, channels by party)."""
    if int(steps) < 1:
        raise OptionError(f"steps must be at least 1, got {steps}")
    graphs = step_graphs(model, len(prompt) + int(steps) - 1)
    fp = FixedPoint(frac_bits)
    parties = {
        "owner": lambda ch: owner_role(ch, graphs[0], fp, graphs[1:]),
        "user": lambda ch: user_generate_role(ch, list(prompt), int(steps)),
        "server0": lambda ch: server_role(ch, 0),
        "server1": lambda ch: server_role(ch, 1),
        "dealer": lambda ch: dealer_role(ch),
    }
    with blas_single_thread():
        return run_local(parties, timeout=timeout)


def generate(model: Any, steps: int, prompt: Sequence[int] = (1,), frac_bits: int = 16,
             timeout: float = 300.0) -> tuple[list[int], Report]:
    """Greedy generation of ``steps`` tokens after ``prompt`` under mpc; returns (ids, report)."""
    res, _ = generate_session(model, steps, prompt, frac_bits, timeout)
    return res["user"]["ids"], res["user"]["report"]
