"""The user: checks and shares its input, receives the only copy of the prediction."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from veil.errors import InputError, InputRangeError
from veil.graph.ir import Graph
from veil.mpc.compilers.public import public_inputs
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.prg import Prg, new_seed
from veil.mpc.program import SEGMENT_BYTES, apply_prefix, compile_program
from veil.mpc.public import from_public
from veil.mpc.report import Report
from veil.mpc.roles.common import abort_all, recv_msg
from veil.net.channel import Channel
from veil.plain.executor import check_inputs
from veil.plain.kernels import softmax

__all__ = ["user_role", "user_generate_role", "check_range", "UserSession"]

SERVERS = ("server0", "server1")


def check_range(x: dict[str, np.ndarray], limit: float, fp: FixedPoint, graph: Any = None) -> None:
    """Float inputs against the owner's published limit; integer inputs (token ids) against the
    vocabulary of the embeddings that read them."""
    public = public_inputs(graph) if graph is not None else {}
    for name, v in x.items():
        if name in public:  # sent in the clear: checked against the bound the model declares for it
            m = float(np.abs(np.asarray(v, np.float64)).max()) if v.size else 0.0
            if not m <= public[name]:
                raise InputRangeError(f"public input {name!r} has magnitude up to {m:.3g}, above the {public[name]:.3g} "
                                      "the model declares for it")
            continue
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


class UserSession:
    """The user's side of a session: setup with the owner's description, then queries.

    ``query(g, inputs, q)`` runs graph ``g`` (index into the owner's graphs) on this party's encoded
    inputs (only the user's inputs; state inputs stay on the servers) and returns decoded outputs."""

    def __init__(self, ch: Channel, info: dict[str, Any], graphs: list[Graph], fp: FixedPoint, rep: Report,
                 segment_bytes: int | None = None):
        self.ch, self.info, self.graphs, self.fp, self.rep = ch, info, graphs, fp, rep
        # dealer material per segment (bytes, one server's view; 0: never split): bounds every party's memory
        self.segment_bytes = SEGMENT_BYTES if segment_bytes is None else int(segment_bytes)
        self.seed = new_seed()
        self.prg = Prg(self.seed)
        self.programs: dict[tuple[int, int], Any] = {}
        self.n = 0

    def start(self) -> None:
        self.ch.send("server0", {"seed": self.seed})
        self.ch.send("server1", {"ready": True})
        self.setup_user = self.ch.stats.copy()
        if not self.info.get("range_guaranteed", True):
            self.rep.warnings.append("the model's worst-case bounds exceed the fixed-point range: results are not "
                                     "guaranteed free of overflow")
            warnings.warn(self.rep.warnings[-1], stacklevel=2)

    def query(self, gi: int, enc: dict[str, np.ndarray], b: int,
              public: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        ch, fp, rep = self.ch, self.fp, self.rep
        q = f"q{self.n}"
        self.n += 1
        graph = self.graphs[gi]
        key = (gi, b)
        if key not in self.programs:
            self.programs[key] = compile_program(graph, b, fp)
        prog = self.programs[key]
        budget = self.segment_bytes
        nseg = len(prog.segments(budget))
        t0 = time.perf_counter()
        ch.send("dealer", {"op": "query", "q": q, "batch": b, "g": gi, "seg_bytes": budget})
        for p in SERVERS:  # public inputs (in the clear) to the servers only: the dealer never sees them
            ch.send(p, {"op": "query", "q": q, "batch": b, "g": gi, "public": public or {}, "seg_bytes": budget})
        mask = recv_msg(ch, "dealer")["A"] if prog.direct is not None else None
        online_s = offline_s = 0.0
        for k in range(nseg):  # offline part of segment k, then its online part (one segment: the whole query)
            if k:
                ch.send("dealer", {"op": "segment", "q": q, "seg": k})
            for p in SERVERS:
                recv_msg(ch, p)  # ready
            t1 = time.perf_counter()
            offline_s += t1 - t0
            if k == 0:
                sent_before = ch.stats.bytes_sent
                if mask is not None:  # mask the first layer's input directly: E = X - A to both servers
                    masked = apply_prefix(prog, next(iter(enc.values()))) - mask
                    for p in SERVERS:
                        ch.send(p, masked)
                else:
                    ch.send("server1", {k_: v - self.prg.words(f"{q}/input/{k_}", v.shape) for k_, v in enc.items()})
                    ch.send("server0", {"go": q})
                user_bytes = ch.stats.bytes_sent - sent_before
            else:
                for p in SERVERS:
                    ch.send(p, {"go": q, "seg": k})
            if k == nseg - 1:
                shares = [recv_msg(ch, p) for p in SERVERS]
            else:
                for p in SERVERS:
                    recv_msg(ch, p)  # segment k done
            t0 = time.perf_counter()
            online_s += t0 - t1
        logs = [recv_msg(ch, p) for p in SERVERS]
        outs = {}
        for o in shares[0]:
            t = prog.final[o]
            z = fp.decode(shares[0][o] + shares[1][o], prog.scale[t])
            if o in prog.post:
                z = softmax(z, prog.post[o][1])
            outs[o] = z
        on_bytes = user_bytes + sum(lg["online"]["bytes_sent"] for lg in logs)
        rep.per_query.append({"q": q, "batch": b, "online_s": online_s, "offline_s": offline_s, "online_bytes": on_bytes,
                              "rounds": logs[0]["online"]["rounds"], "segments": nseg,
                              "servers": [{k: v for k, v in lg.items() if k.endswith("_s")} for lg in logs]})
        rep.online_s += online_s
        rep.offline_s += offline_s
        rep.online_bytes += on_bytes
        rep.server_bytes += logs[0]["online"]["sent_to"].get("server1", 0)
        rep.rounds += logs[0]["online"]["rounds"]
        rep.declared_rounds += prog.cost.rounds + 1  # + the round that sends the outputs to the user
        rep.declared_server_bytes += prog.cost.bytes
        rep.queries += 1
        return outs

    def finish(self) -> dict[str, Any]:
        ch = self.ch
        for p in ("owner", "dealer", *SERVERS):
            ch.send(p, {"op": "done"})
        finals = {p: recv_msg(ch, p) for p in ("owner", "dealer", *SERVERS)}
        self.rep.setup_bytes = self.setup_user.bytes_sent + sum(f["setup"]["bytes_sent"] for f in finals.values())
        self.rep.offline_bytes = sum(qq["bytes"] for qq in finals["dealer"]["queries"])
        return finals


def _receive_model(ch: Channel) -> tuple[dict[str, Any], list[Graph], FixedPoint]:
    info = recv_msg(ch, "owner")
    graphs = [from_public(info["model"])] + [from_public(d) for d in info.get("steps", [])]
    return info, graphs, FixedPoint(info["frac_bits"])


def user_role(ch: Channel, x: Any, batch_size: int | None = None, segment_bytes: int | None = None) -> dict[str, Any]:
    """Run the user's queries on ``x``; ``segment_bytes``: the dealer material per program segment
    (default :data:`~veil.mpc.program.SEGMENT_BYTES`, 0: one segment per query)."""
    t_start = time.perf_counter()
    info, graphs, fp = _receive_model(ch)
    graph = graphs[0]
    try:
        xs = check_inputs(graph, x)
        check_range(xs, info["input_limit"], fp, graph)
        n = next(iter(xs.values())).shape[0]
        pub_names = public_inputs(graph)
        pub = {k: np.asarray(v, np.float64) for k, v in xs.items() if k in pub_names}
        enc = {k: fp.encode(v, what=f"input {k!r}") for k, v in xs.items() if k not in pub_names}
    except InputError as e:
        abort_all(ch, f"the user's input was rejected before anything was sent ({type(e).__name__})")
        raise
    bs = min(batch_size or n, n)
    rep = Report(images=n, batch=bs, frac_bits=fp.frac_bits)
    sess = UserSession(ch, info, graphs, fp, rep, segment_bytes)
    sess.start()
    rep.setup_s = time.perf_counter() - t_start  # the owner's model and seeds (servers' weight setup overlaps q0)
    outs: dict[str, list[np.ndarray]] = {o: [] for o in graph.outputs}
    for start in range(0, n, bs):
        b = min(bs, n - start)
        got = sess.query(0, {k: v[start : start + b] for k, v in enc.items()}, b,
                         {k: v[start : start + b] for k, v in pub.items()})
        for o, z in got.items():
            outs[o].append(z)
    finals = sess.finish()
    result = {o: np.concatenate(v) for o, v in outs.items() if v}
    return {"role": "user", "outputs": result, "report": rep, "finals": finals}


def user_generate_role(ch: Channel, prompt: list[int], steps: int, token_input: str = "token",
                       logits_output: str = "logits") -> dict[str, Any]:
    """Greedy generation over the owner's step graphs (graph p runs position p): the user sends only
    the share of each new token id; the key/value cache stays as shares on the servers (the graphs'
    ``meta["state"]``); the user reconstructs only the logits and picks the next token."""
    t_start = time.perf_counter()
    info, graphs, fp = _receive_model(ch)
    total = len(prompt) + steps - 1
    try:
        if not prompt or steps < 1:
            raise InputError(f"generation needs a non-empty prompt and steps >= 1, got {len(prompt)} ids and {steps}")
        if total > len(graphs):
            raise InputError(f"{len(prompt)} prompt ids + {steps} steps need {total} positions; the owner offers "
                             f"{len(graphs)}")
        check_range({token_input: np.asarray([prompt], np.int64)}, info["input_limit"], fp, graphs[0])
    except InputError as e:
        abort_all(ch, f"the user's input was rejected before anything was sent ({type(e).__name__})")
        raise
    rep = Report(images=steps, batch=1, frac_bits=fp.frac_bits)
    sess = UserSession(ch, info, graphs, fp, rep)
    sess.start()
    rep.setup_s = time.perf_counter() - t_start
    ids = list(prompt)
    generated: list[int] = []
    for pos in range(total):
        tok = np.array([[ids[pos]]], np.int64)
        check_range({token_input: tok}, info["input_limit"], fp, graphs[pos])
        out = sess.query(pos, {token_input: fp.encode(tok)}, 1)
        if pos >= len(prompt) - 1:
            nxt = int(np.argmax(out[logits_output].reshape(-1)))
            generated.append(nxt)
            ids.append(nxt)
    finals = sess.finish()
    return {"role": "user", "ids": generated, "report": rep, "finals": finals}
