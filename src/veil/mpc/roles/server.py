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
from veil.mpc.roles.common import QUERY_WAIT, recv_msg
from veil.mpc.roles.dealer import weight_masks
from veil.net.channel import Channel

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
    want = {s.name: s.concrete(batch) for s in graph.inputs if s.name in public_inputs(graph)}
    if set(got) != set(want):
        raise ProtocolError(f"server{i}: the query's public inputs are {sorted(got)}, the model declares {sorted(want)}")
    out = {k: np.asarray(v, np.float64) for k, v in got.items()}
    bad = [k for k, v in out.items() if v.shape != want[k]]
    if bad:
        raise ProtocolError(f"server{i}: public input {bad[0]!r} has shape {out[bad[0]].shape}, expected {want[bad[0]]}")
    return out


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
        # offline: material from the dealer, expanded and precomputed
        t0 = time.perf_counter()
        if (gi, batch) not in programs:
            programs[(gi, batch)] = compile_program(graph, batch, fp)
        prog = programs[(gi, batch)]
        side = ServerSide(i, dealer_prg)
        early = prog.precompute(st, side, q)  # while the dealer works
        t_early = time.perf_counter()
        got = recv_msg(ch, "dealer")
        t_recv = time.perf_counter()
        if got.get("q") != q:
            raise ProtocolError(f"server{i}: dealer material is for query {got.get('q')!r}, expected {q!r}")
        side.corrections = dict(got.get("corrections") or {})
        store = MaterialStore(q)
        for key, item in prog.materials(side, q, {}).items():
            store.put(key, item)
        t_expand = time.perf_counter()
        prog.prepare(st, store, early)
        t_prep = time.perf_counter()
        mine = user_inputs(graph)
        if i == 0 and prog.direct is None:
            assert user_prg is not None
            x = {s.name: user_prg.words(f"{q}/input/{s.name}", s.concrete(batch)) for s in mine}
        offline_s = time.perf_counter() - t0
        ch.send("user", {"ready": q})
        # online
        before = ch.stats.copy()
        t1 = time.perf_counter()
        if prog.direct is not None:
            x = {DIRECT_INPUT: recv_msg(ch, "user")}  # E = X - A for the first layer, from the user
        elif i == 1:
            x = recv_msg(ch, "user")  # its input share
        else:
            recv_msg(ch, "user")  # the input exists: go (server0's share comes from the user's seed)
        x = {k: np.asarray(v, np.uint64) for k, v in x.items()}
        x.update(_public_values(graph, batch, msg.get("public") or {}, i))
        kept = state_of(graph)
        for s in graph.inputs:
            if s.name in (graph.meta.get("state") or {}):
                if s.name not in st.state:
                    raise ProtocolError(f"server{i}: query {q!r} reads state {s.name!r}, which no earlier query produced")
                x[s.name] = st.state[s.name]
        out = prog.run(st, x, store)
        if len(store):
            raise ProtocolError(f"server{i}: {len(store)} material items of query {q!r} were not consumed")
        st.state = {inp: out.pop(o) for inp, o in kept.items()}  # secret state stays here
        ch.send("user", out)
        online = ch.stats - before
        log.append({"q": q, "offline_s": offline_s, "online_s": time.perf_counter() - t1, "precompute_s": t_early - t0,
                    "wait_dealer_s": t_recv - t_early, "expand_s": t_expand - t_recv, "prepare_s": t_prep - t_expand,
                    "online": online.as_dict()})
        ch.send("user", log[-1])
    ch.send("user", {"setup": setup.as_dict(), "total": ch.stats.as_dict()})
    return {"role": f"server{i}", "queries": log, "labels": sorted(dealer_prg.labels)}
