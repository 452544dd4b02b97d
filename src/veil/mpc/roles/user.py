"""The user: checks and shares its input, receives the only copy of the prediction."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from veil.errors import InputError, InputRangeError
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.prg import Prg, new_seed
from veil.mpc.program import apply_prefix, compile_program
from veil.mpc.public import from_public
from veil.mpc.report import Report
from veil.mpc.roles.common import abort_all, recv_msg
from veil.net.channel import Channel
from veil.plain.executor import check_inputs
from veil.plain.kernels import softmax

__all__ = ["user_role", "check_range"]

SERVERS = ("server0", "server1")


def check_range(x: dict[str, np.ndarray], limit: float, fp: FixedPoint, graph: Any = None) -> None:
    """Float inputs against the owner's published limit; integer inputs (token ids) against the
    vocabulary of the embeddings that read them."""
    for name, v in x.items():
        if np.issubdtype(v.dtype, np.integer):
            for n in (graph.consumers(name) if graph is not None else []):
                if n.op == "embedding" and v.size and (v.min() < 0 or v.max() >= n.params["table"].shape[0]):
                    raise InputRangeError(f"input {name!r} holds ids outside [0, {n.params['table'].shape[0]}) "
                                          f"for embedding {n.name!r}")
            continue
        m = float(np.abs(v).max()) if v.size else 0.0
        if m > limit:
            raise InputRangeError(
                f"input {name!r} has magnitude up to {m:.3g}, above {limit:.3g}: the largest input for which this "
                f"model's values stay inside the fixed-point range (f={fp.frac_bits} fractional bits, limit 2^"
                f"{61 - 2 * fp.frac_bits} on products); rescale the input or use fewer fractional bits")


def user_role(ch: Channel, x: Any, batch_size: int | None = None) -> dict[str, Any]:
    info = recv_msg(ch, "owner")
    graph = from_public(info["model"])
    fp = FixedPoint(info["frac_bits"])
    try:
        xs = check_inputs(graph, x)
        check_range(xs, info["input_limit"], fp, graph)
        n = next(iter(xs.values())).shape[0]
        enc = {k: fp.encode(v, what=f"input {k!r}") for k, v in xs.items()}
    except InputError as e:
        abort_all(ch, f"the user's input was rejected before anything was sent ({type(e).__name__})")
        raise
    bs = min(batch_size or n, n)
    seed = new_seed()
    prg = Prg(seed)
    ch.send("server0", {"seed": seed})
    ch.send("server1", {"ready": True})
    rep = Report(images=n, batch=bs, frac_bits=fp.frac_bits)
    setup_user = ch.stats.copy()
    outs: dict[str, list[np.ndarray]] = {o: [] for o in graph.outputs}
    programs: dict[int, Any] = {}
    for qi, start in enumerate(range(0, n, bs)):
        b = min(bs, n - start)
        q = f"q{qi}"
        prog = programs.setdefault(b, compile_program(graph, b, fp))
        t0 = time.perf_counter()
        for p in ("dealer", *SERVERS):
            ch.send(p, {"op": "query", "q": q, "batch": b})
        mask = recv_msg(ch, "dealer")["A"] if prog.direct is not None else None
        for p in SERVERS:
            recv_msg(ch, p)  # ready
        t1 = time.perf_counter()
        sent_before = ch.stats.bytes_sent
        if mask is not None:  # mask the first layer's input directly: E = X - A to both servers
            masked = apply_prefix(prog, next(iter(enc.values()))[start : start + b]) - mask
            for p in SERVERS:
                ch.send(p, masked)
        else:
            ch.send("server1", {k: v[start : start + b] - prg.words(f"{q}/input/{k}", v[start : start + b].shape)
                                for k, v in enc.items()})
            ch.send("server0", {"go": q})
        shares = [recv_msg(ch, p) for p in SERVERS]
        t2 = time.perf_counter()
        logs = [recv_msg(ch, p) for p in SERVERS]
        for o, t in prog.final.items():
            z = fp.decode(shares[0][o] + shares[1][o], prog.scale[t])
            if o in prog.post:
                z = softmax(z, prog.post[o][1])
            outs[o].append(z)
        on_bytes = (ch.stats.bytes_sent - sent_before) + sum(lg["online"]["bytes_sent"] for lg in logs)
        rep.per_query.append({"q": q, "batch": b, "online_s": t2 - t1, "offline_s": t1 - t0, "online_bytes": on_bytes,
                              "rounds": logs[0]["online"]["rounds"],
                              "servers": [{k: v for k, v in lg.items() if k.endswith("_s")} for lg in logs]})
        rep.online_s += t2 - t1
        rep.offline_s += t1 - t0
        rep.online_bytes += on_bytes
        rep.server_bytes += logs[0]["online"]["sent_to"].get("server1", 0)
        rep.rounds += logs[0]["online"]["rounds"]
        rep.declared_rounds += prog.cost.rounds + 1  # + the round that sends the outputs to the user
        rep.declared_server_bytes += prog.cost.bytes
        rep.queries += 1
    for p in ("owner", "dealer", *SERVERS):
        ch.send(p, {"op": "done"})
    finals = {p: recv_msg(ch, p) for p in ("owner", "dealer", *SERVERS)}
    rep.setup_bytes = setup_user.bytes_sent + sum(f["setup"]["bytes_sent"] for f in finals.values())
    rep.offline_bytes = sum(qq["bytes"] for qq in finals["dealer"]["queries"])
    result = {o: np.concatenate(v) for o, v in outs.items()}
    return {"role": "user", "outputs": result, "report": rep, "finals": finals}
