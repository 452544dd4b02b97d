"""The model owner: shares its weights between the servers and publishes the architecture."""

from __future__ import annotations

from typing import Any

from veil.errors import ModelError, VeilError
from veil.graph.ir import Graph
from veil.mpc.bounds import input_limit
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.prg import Prg, new_seed
from veil.mpc.program import compile_program
from veil.mpc.public import secret_params, to_public
from veil.mpc.roles.common import QUERY_WAIT, abort_all, recv_msg
from veil.net.channel import Channel

__all__ = ["owner_role", "encode_weights"]


def encode_weights(graph: Graph, fp: FixedPoint) -> dict[str, Any]:
    """Weights at scale f, biases at scale 2f (they are added to products)."""
    out = {}
    for key, v in secret_params(graph).items():
        scale = 2 * fp.frac_bits if key.endswith("/b") else fp.frac_bits
        out[key] = fp.encode(v, scale=scale, what=f"weight {key}")
    return out


def owner_role(ch: Channel, graph: Graph, fp: FixedPoint, steps: list[Graph] | None = None) -> dict[str, Any]:
    """Share the weights, publish the architecture. ``steps``: the further graphs of a multi-step
    session (a decoder's step graphs for positions 1, 2, ...; ``graph`` is position 0); they must hold
    the same secret weights, and their public descriptions go to every party at setup."""
    steps = list(steps or [])
    try:
        for g in [graph, *steps[:1], *steps[-1:]]:  # unsupported ops fail here, before anything is sent
            compile_program(g, 1, fp)
        enc = encode_weights(graph, fp)
        for g in steps:
            if {k: v.shape for k, v in secret_params(g).items()} != {k: v.shape for k, v in secret_params(graph).items()}:
                raise ModelError(f"step graph {g.name!r} does not hold the same secret weights as the first one")
        limit, _ = input_limit(graph, fp)
        # a model whose worst-case bounds exceed the ring even at input 0 cannot be guaranteed exact:
        # said to the user (flagged in its report), who decides
        range_ok = limit > 0.0
    except VeilError as e:
        abort_all(ch, f"the model owner cannot run this model: {e}")
        raise
    pub = to_public(graph)
    seed = new_seed()
    prg = Prg(seed)
    shares1 = {k: v - prg.words(f"owner/{k}", v.shape) for k, v in enc.items()}
    info = {"model": pub, "frac_bits": fp.frac_bits, "steps": [to_public(g) for g in steps]}
    ch.send("server0", {**info, "seed": seed})
    ch.send("server1", {**info, "shares": shares1})
    ch.send("dealer", info)
    ch.send("user", {**info, "input_limit": limit, "uncovered": [], "range_guaranteed": range_ok})
    setup = ch.stats.copy()
    recv_msg(ch, "user", QUERY_WAIT)  # done
    ch.send("user", {"setup": setup.as_dict(), "total": ch.stats.as_dict()})
    return {"role": "owner"}
