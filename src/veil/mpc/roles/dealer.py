"""The dealer (crypto provider): seeds for the servers and, per query, the material (offline).

It learns the architecture and the batch sizes, never an input, a weight or an activation.
"""

from __future__ import annotations

import time
from typing import Any

from veil.errors import ProtocolError
from veil.mpc.compilers import FIXED_OPS, fixed_matrix
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.material import DealerSide
from veil.mpc.prg import Prg, new_seed
from veil.mpc.program import Program, compile_program
from veil.mpc.public import from_public
from veil.mpc.roles.common import QUERY_WAIT, recv_msg
from veil.net.channel import Channel

__all__ = ["dealer_role", "weight_masks"]


def weight_masks(side: Any, graph: Any) -> dict[str, Any]:
    """The fixed mask ``B`` of every linear/conv/embedding weight (drawn from both seeds: nothing is sent)."""
    return {n.name: side.rand(f"setup/B/{n.name}", fixed_matrix(n, n.params).shape) for n in graph.nodes
            if n.op in FIXED_OPS}


def dealer_role(ch: Channel) -> dict[str, Any]:
    info = recv_msg(ch, "owner")
    graph = from_public(info["model"])
    graphs = [graph] + [from_public(d) for d in info.get("steps", [])]
    fp = FixedPoint(info["frac_bits"])
    s0, s1 = new_seed(), new_seed()
    g0, g1 = Prg(s0), Prg(s1)
    ch.send("server0", {"seed": s0})
    ch.send("server1", {"seed": s1})
    masks = weight_masks(DealerSide(g0, g1), graph)
    setup = ch.stats.copy()
    programs: dict[tuple[int, int], Program] = {}
    served: list[dict[str, Any]] = []
    while True:
        msg = recv_msg(ch, "user", QUERY_WAIT)
        if msg.get("op") == "done":
            break
        if msg.get("op") != "query":
            raise ProtocolError(f"dealer: unexpected request {msg.get('op')!r} from the user")
        t0 = time.perf_counter()
        before = ch.stats.copy()
        batch, gi = int(msg["batch"]), int(msg.get("g", 0))
        if not 0 <= gi < len(graphs):
            raise ProtocolError(f"dealer: query {msg['q']!r} names graph {gi}, the owner sent {len(graphs)}")
        if (gi, batch) not in programs:
            programs[(gi, batch)] = compile_program(graphs[gi], batch, fp)
        side = DealerSide(g0, g1)
        prog = programs[(gi, batch)]
        mats = prog.materials(side, msg["q"], masks)
        ch.send("server1", {"q": msg["q"], "corrections": side.corrections})
        ch.send("server0", {"q": msg["q"]})
        if prog.direct is not None:  # the user masks the first layer's input itself
            ch.send("user", {"q": msg["q"], "A": mats[prog.direct["key"]]["A"]})
        served.append({"q": msg["q"], "seconds": time.perf_counter() - t0, "bytes": (ch.stats - before).bytes_sent})
    ch.send("user", {"setup": setup.as_dict(), "total": ch.stats.as_dict(), "queries": served,
                     "labels": len(g0.labels) + len(g1.labels)})
    return {"role": "dealer", "queries": served, "labels0": sorted(g0.labels), "labels1": sorted(g1.labels)}
