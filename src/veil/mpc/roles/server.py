"""A compute server (server0 or server1): holds shares only, runs the online phase with its peer."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from veil.errors import ProtocolError
from veil.mpc.compilers import fixed_matrix
from veil.mpc.compilers.public import public_inputs
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels.base import Ctx
from veil.mpc.kernels.products import FixedWeight
from veil.mpc.material import MaterialStore, ServerSide
from veil.mpc.prg import Prg
from veil.mpc.program import (
    DIRECT_INPUT,
    Program,
    ServerState,
    compile_program,
    fixed_spec,
    state_of,
    user_inputs,
)
from veil.mpc.public import SECRET_PARAMS, from_public, secret_params
from veil.mpc.roles.common import QUERY_WAIT, recv_msg, segment_budget
from veil.mpc.roles.dealer import weight_masks
from veil.net.channel import Channel, Stats

__all__ = ["server_role"]


def _setup(ch: Channel, i: int) -> tuple[list[Any], FixedPoint, ServerState, Prg, Prg | None]:
    peer = f"server{1 - i}"
    info = recv_msg(ch, "owner")
    graph = from_public(info["model"])
    graphs = [graph] + [from_public(d) for d in info.get("steps", [])]
    fp = FixedPoint(info["frac_bits"])
    dealer_prg = Prg(recv_msg(ch, "dealer")["seed"])
    hello = recv_msg(ch, "user")  # before talking to the peer, so a user's abort reaches both servers
    user_prg = Prg(hello["seed"]) if i == 0 else None
    if i == 0:
        owner = Prg(info["seed"])
        shares = {k: owner.words(f"owner/{k}", v.shape) for k, v in secret_params(graph).items()}
    else:
        shares = info["shares"]
    nodes = {n.name: n for n in graph.nodes}
    masks = weight_masks(ServerSide(i, dealer_prg), graph)
    mine_w = {name: fixed_matrix(nodes[name], _node_shares(shares, name)) for name in masks}
    mine = {name: mine_w[name] - b for name, b in masks.items()}
    theirs = ch.exchange(peer, mine)  # open F = W - B once per session
    fixed, bias, params = {}, {}, {}
    for n in graph.nodes:
        if n.name in masks:
            fixed[n.name] = FixedWeight.build(mine_w[n.name], mine[n.name] + theirs[n.name], fixed_spec(n))
            if f"{n.name}/b" in shares:
                bias[n.name] = shares[f"{n.name}/b"]
        elif n.op in SECRET_PARAMS:
            params.update({k: v for k, v in shares.items() if k.startswith(f"{n.name}/")})
    return graphs, fp, ServerState(Ctx(i, ch, peer, fp), fixed, bias, params), dealer_prg, user_prg


def _node_shares(shares: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {k.split("/")[-1]: v for k, v in shares.items() if k.rsplit("/", 1)[0] == name}


def _public_values(graph: Any, batch: int, got: dict[str, Any], i: int) -> dict[str, np.ndarray]:
    """The user's public inputs of a query (in the clear), checked against the graph's declaration."""
    declared = public_inputs(graph)
    want = {s.name: s.concrete(batch) for s in graph.inputs if s.name in declared}
    if set(got) != set(want):
        raise ProtocolError(f"server{i}: the query's public inputs are {sorted(got)}, the model declares {sorted(want)}")
    out = {k: np.asarray(v, np.float64) for k, v in got.items()}
    bad = [k for k, v in out.items() if v.shape != want[k]]
    if bad:
        raise ProtocolError(f"server{i}: public input {bad[0]!r} has shape {out[bad[0]].shape}, expected {want[bad[0]]}")
    return out


def _plus(a: Stats, b: Stats) -> Stats:
    s = Stats(a.bytes_sent + b.bytes_sent, a.bytes_recv + b.bytes_recv, a.msgs_sent + b.msgs_sent,
              a.msgs_recv + b.msgs_recv, a.rounds + b.rounds)
    for d in (a.sent_to, b.sent_to):
        for k, v in d.items():
            s.sent_to[k] += v
    return s


def _offline_segment(ch: Channel, i: int, prog: Program, st: ServerState, side: ServerSide, store: MaterialStore,
                     q: str, k: int, lo: int, hi: int, times: dict[str, float]) -> None:
    """Segment ``k`` (instructions ``lo..hi``) offline: precompute from the seed while the dealer works,
    take server1's corrections for this segment only, expand this server's material into ``store``."""
    t0 = time.perf_counter()
    early = prog.precompute(st, side, q, lo, hi)
    t1 = time.perf_counter()
    got = recv_msg(ch, "dealer")
    t2 = time.perf_counter()
    if got.get("q") != q or got.get("seg", 0) != k:
        raise ProtocolError(f"server{i}: dealer material is for query {got.get('q')!r} segment {got.get('seg', 0)!r}, "
                            f"expected {q!r} segment {k}")
    side.corrections = got.pop("corrections", None) or {}  # popped as they are used: no second copy
    del got
    for key, item in prog.materials(side, q, {}, lo, hi).items():
        store.put(key, item)
    if side.corrections:
        raise ProtocolError(f"server{i}: the dealer sent {len(side.corrections)} corrections that segment {k} of "
                            f"query {q!r} does not use")
    t3 = time.perf_counter()
    prog.prepare(st, store, early, lo, hi)
    for name, dt in (("precompute_s", t1 - t0), ("wait_dealer_s", t2 - t1), ("expand_s", t3 - t2),
                     ("prepare_s", time.perf_counter() - t3)):
        times[name] += dt


def server_role(ch: Channel, i: int) -> dict[str, Any]:
    """Serve the user's queries. A query names the graph it runs (``g``: index into the owner's step
    graphs, 0 for single-graph models); the inputs listed in the graph's ``meta["state"]`` come from
    the secret state this server kept from the previous query (never from the user), and the state
    outputs are kept for the next one instead of being sent to the user."""
    graphs, fp, st, dealer_prg, user_prg = _setup(ch, i)
    setup = ch.stats.copy()
    programs: dict[tuple[int, int], Program] = {}
    log: list[dict[str, Any]] = []
    while True:
        msg = recv_msg(ch, "user", QUERY_WAIT)
        if msg.get("op") == "done":
            break
        if msg.get("op") != "query":
            raise ProtocolError(f"server{i}: unexpected request {msg.get('op')!r} from the user")
        q, batch, gi = msg["q"], int(msg["batch"]), int(msg.get("g", 0))
        if not 0 <= gi < len(graphs):
            raise ProtocolError(f"server{i}: query {q!r} names graph {gi}, the owner sent {len(graphs)}")
        graph = graphs[gi]
        # the program runs in segments (Program.segments): each segment's material is made, expanded
        # and precomputed (offline) right before its instructions run (online); one segment unless
        # the query's material exceeds the user's budget
        t0 = time.perf_counter()
        if (gi, batch) not in programs:
            programs[(gi, batch)] = compile_program(graph, batch, fp)
        prog = programs[(gi, batch)]
        segs = prog.segments(segment_budget(msg, f"server{i}"))
        side = ServerSide(i, dealer_prg)
        store = MaterialStore(q)
        times = {"precompute_s": 0.0, "wait_dealer_s": 0.0, "expand_s": 0.0, "prepare_s": 0.0}
        offline_s = online_s = 0.0
        online = Stats()
        env: dict[str, np.ndarray] = {}
        for k, (lo, hi) in enumerate(segs):
            if k:
                t0 = time.perf_counter()
            _offline_segment(ch, i, prog, st, side, store, q, k, lo, hi, times)
            if k == 0:
                mine = user_inputs(graph)
                if i == 0 and prog.direct is None:
                    assert user_prg is not None
                    x = {s.name: user_prg.words(f"{q}/input/{s.name}", s.concrete(batch)) for s in mine}
            offline_s += time.perf_counter() - t0
            ch.send("user", {"ready": q, "seg": k})
            if k:
                go = recv_msg(ch, "user")  # both servers have their material: run the next segment
                if go.get("go") != q or go.get("seg") != k:
                    raise ProtocolError(f"server{i}: expected the go of segment {k} of query {q!r}, got {go!r}")
            # online
            before = ch.stats.copy()
            t1 = time.perf_counter()
            if k == 0:
                if prog.direct is not None:
                    x = {DIRECT_INPUT: recv_msg(ch, "user")}  # E = X - A for the first layer, from the user
                elif i == 1:
                    x = recv_msg(ch, "user")  # its input share
                else:
                    recv_msg(ch, "user")  # the input exists: go (server0's share comes from the user's seed)
                x = {k_: np.asarray(v, np.uint64) for k_, v in x.items()}
                x.update(_public_values(graph, batch, msg.get("public") or {}, i))
                kept = state_of(graph)
                for s in graph.inputs:
                    if s.name in (graph.meta.get("state") or {}):
                        if s.name not in st.state:
                            raise ProtocolError(f"server{i}: query {q!r} reads state {s.name!r}, which no earlier query produced")
                        x[s.name] = st.state[s.name]
                env = dict(x)
                del x
            prog.run_range(st, env, store, lo, hi)
            if len(store):
                raise ProtocolError(f"server{i}: {len(store)} material items of query {q!r} were not consumed")
            if k == len(segs) - 1:
                out = {o: env[t] for o, t in prog.final.items()}
                env = {}
                st.state = {inp: out.pop(o) for inp, o in kept.items()}  # secret state stays here
                ch.send("user", out)
            online = _plus(online, ch.stats - before)
            online_s += time.perf_counter() - t1
            if k < len(segs) - 1:
                ch.send("user", {"done": q, "seg": k})  # after the online counters: control, not protocol
        log.append({"q": q, "offline_s": offline_s, "online_s": online_s, **times, "segments": len(segs),
                    "online": online.as_dict()})
        ch.send("user", log[-1])
    ch.send("user", {"setup": setup.as_dict(), "total": ch.stats.as_dict()})
    return {"role": f"server{i}", "queries": log, "labels": sorted(dealer_prg.labels)}
