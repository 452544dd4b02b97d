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
from veil.mpc.roles.common import QUERY_WAIT, recv_msg, segment_budget
from veil.net.channel import Channel

__all__ = ["dealer_role", "weight_masks"]


def weight_masks(side: Any, graph: Any) -> dict[str, Any]:
    """The fixed mask ``B`` of every linear/conv/embedding weight (drawn from both seeds: nothing is sent)."""
    return {n.name: side.rand(f"setup/B/{n.name}", fixed_matrix(n, n.params).shape) for n in graph.nodes
            if n.op in FIXED_OPS}


def _serve_segment(ch: Channel, cur: dict[str, Any], masks: dict[str, Any], g0: Prg, g1: Prg) -> None:
    """Make the material of the query's next segment instruction by instruction, keeping only server1's
    corrections (the full values are dropped as soon as each instruction's material is made), and send
    them; the user gets the first layer's mask when the program masks it directly."""
    prog: Program = cur["prog"]
    q, k = cur["q"], cur["next"]
    lo, hi = cur["segs"][k]
    side = DealerSide(g0, g1)
    direct_a = None
    for j in range(lo, hi):
        mats = prog.materials(side, q, masks, j, j + 1)
        if prog.direct is not None and prog.direct["key"] in mats:
            direct_a = mats[prog.direct["key"]]["A"]
        del mats
    ch.send("server1", {"q": q, "seg": k, "corrections": side.corrections})
    side.corrections = {}
    ch.send("server0", {"q": q, "seg": k})
    if direct_a is not None:  # the user masks the first layer's input itself
        ch.send("user", {"q": q, "A": direct_a})
    cur["next"] = k + 1


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
    cur: dict[str, Any] | None = None  # the query whose segments are being served
    while True:
        msg = recv_msg(ch, "user", QUERY_WAIT)
        op = msg.get("op")
        if op == "done":
            break
        t0 = time.perf_counter()
        before = ch.stats.copy()
        if op == "query":
            batch, gi = int(msg["batch"]), int(msg.get("g", 0))
            if not 0 <= gi < len(graphs):
                raise ProtocolError(f"dealer: query {msg['q']!r} names graph {gi}, the owner sent {len(graphs)}")
            if (gi, batch) not in programs:
                programs[(gi, batch)] = compile_program(graphs[gi], batch, fp)
            prog = programs[(gi, batch)]
            cur = {"q": msg["q"], "prog": prog, "segs": prog.segments(segment_budget(msg, "dealer")), "next": 0}
            served.append({"q": msg["q"], "seconds": 0.0, "bytes": 0, "segments": len(cur["segs"])})
        elif op == "segment":
            if cur is None or msg.get("q") != cur["q"] or msg.get("seg") != cur["next"] or cur["next"] >= len(cur["segs"]):
                want = None if cur is None else (cur["q"], cur["next"])
                raise ProtocolError(f"dealer: the user asked for segment {msg.get('seg')!r} of query {msg.get('q')!r}; "
                                    f"expected (query, segment) {want}")
        else:
            raise ProtocolError(f"dealer: unexpected request {op!r} from the user")
        assert cur is not None
        _serve_segment(ch, cur, masks, g0, g1)
        served[-1]["seconds"] += time.perf_counter() - t0
        served[-1]["bytes"] += (ch.stats - before).bytes_sent
    ch.send("user", {"setup": setup.as_dict(), "total": ch.stats.as_dict(), "queries": served,
                     "labels": len(g0.labels) + len(g1.labels)})
    return {"role": "dealer", "queries": served, "labels0": sorted(g0.labels), "labels1": sorted(g1.labels)}
