"""Measure SPU (PyPI `spu`) on veil's benchmark workloads; run with the SPU venv's python (see setup.sh).

SEMI2K over Z_2^64 (SPU's default 18 fraction bits), two parties as threads of one process over SPU's
in-memory link (no sockets, no TLS), SPU's default Beaver source (trusted first party: party 0 derives
the triples, no offline traffic, generated during the run). Both the model's weights and the user's input
are secret. SPU does not split offline from online, so only the total per query is reported.
Results go to --out as JSON (what bench/peers/driver.py reads).

    networks --npz nets.npz --nets A,B,C,D --batches 1,64 --out res.json
        nets.npz holds, per network, its layer chain exported from veil's ONNX files by the driver
        (Conv, Relu, MaxPool, Flatten, Gemm) and x (N, 1, 28, 28). Per (net, batch):
        setup_s: compiling the jax function to SPU's IR and secret-sharing the weights (once);
        total_bytes, rounds: a first query with SPU's profiler on (party 0's link counters: bytes sent +
            received, and its send actions), which is also the warm-up;
        total_s: one query: sharing the input, the run, reconstructing the output (median of --queries
            after the warm-up); logits: the last query's output.
    encoder --npz layer.npz --out res.json
        the encoder layer of bench/encoder_layer.py in jax, twice: "exact" (jax.nn.softmax, erf GELU,
        rsqrt LayerNorm, SPU's default approximations of exp, erf, reciprocal and rsqrt) and "PUMA"
        (PUMA's piecewise-polynomial GELU, softmax with exp clipped to 0 below -14 and SPU's Taylor exp,
        as described in the PUMA paper, Dong et al. 2023).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import spu
import spu.utils.frontend as spu_fe
from spu import libspu

jax.config.update("jax_platforms", "cpu")
LINK_RE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+)")


def _config(puma: bool = False, profile: bool = False) -> libspu.RuntimeConfig:
    cfg = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.SEMI2K, field=libspu.FieldType.FM64)
    if puma:
        cfg.fxp_exp_mode = libspu.RuntimeConfig.ExpMode.EXP_TAYLOR
    cfg.enable_pphlo_profile = profile
    return cfg


class Session:
    """A compiled function with its weights shared once; `query(x)` shares x, runs both parties, reveals."""

    def __init__(self, fn, weights: list[np.ndarray], x: np.ndarray, cfg: libspu.RuntimeConfig) -> None:
        self.cfg = cfg
        self.io = spu.Io(2, cfg)
        names = [f"w{i}" for i in range(len(weights))] + ["x"]
        self.exe, _ = spu_fe.compile(spu_fe.Kind.JAX, fn, (*weights, x), {}, names,
                                     [libspu.Visibility.VIS_SECRET] * len(names),
                                     lambda outs: [f"out{i}" for i in range(len(outs))])
        self.shares = [self.io.make_shares(w, libspu.Visibility.VIS_SECRET) for w in weights]

    def query(self, x: np.ndarray, profile: bool = False) -> np.ndarray:
        xs = self.io.make_shares(np.asarray(x), libspu.Visibility.VIS_SECRET)
        desc = libspu.link.Desc()
        for r in range(2):
            desc.add_party(f"id_{r}", f"thread_{r}")
        outs: list = [None, None]
        errs: list = []

        def party(rank: int) -> None:
            try:
                lctx = libspu.link.create_mem(desc, rank)
                cfg = libspu.RuntimeConfig(self.cfg)
                cfg.enable_pphlo_profile = profile and rank == 0
                rt = spu.Runtime(lctx, cfg)
                for i, sh in enumerate(self.shares):
                    rt.set_var(f"w{i}", sh[rank])
                rt.set_var("x", xs[rank])
                rt.run(self.exe)
                outs[rank] = [rt.get_var(n) for n in self.exe.output_names]
            except Exception as e:  # noqa: BLE001  (re-raised in the caller's thread)
                errs.append(e)

        threads = [threading.Thread(target=party, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errs:
            raise errs[0]
        return np.asarray(self.io.reconstruct([outs[0][0], outs[1][0]]))


def _profiled(session: Session, x: np.ndarray) -> tuple[float, int]:
    """Party 0's link counters for one query (SPU prints them from C++ when profiling is on)."""
    with tempfile.TemporaryFile(mode="w+b") as f:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            session.query(x, profile=True)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for s in saved:
                os.close(s)
        f.seek(0)
        text = f.read().decode(errors="replace")
    m = LINK_RE.findall(text)
    if not m:
        return float("nan"), -1
    sent, recv, actions = (int(v) for v in m[-1])
    return float(sent + recv), actions


def _timed(session: Session, x: np.ndarray, queries: int) -> tuple[list[float], np.ndarray]:
    times = []
    for _ in range(queries):
        t0 = time.perf_counter()
        y = session.query(x)
        times.append(time.perf_counter() - t0)
    return times, y


def _network_fn(spec: list[dict]):
    def fn(*args):
        *ws, h = args
        i = 0
        for op in spec:
            kind = op["op"]
            if kind == "conv":
                w, b = ws[i], ws[i + 1]
                i += 2
                p = op["pads"]
                h = jax.lax.conv_general_dilated(h, w, tuple(op["strides"]), [(p[0], p[2]), (p[1], p[3])],
                                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
                h = h + b.reshape(1, -1, 1, 1)
            elif kind == "relu":
                h = jax.nn.relu(h)
            elif kind == "maxpool":
                k, s = op["kernel"], op["strides"]
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, k[0], k[1]), (1, 1, s[0], s[1]), "VALID")
            elif kind == "flatten":
                h = h.reshape(h.shape[0], -1)
            elif kind == "gemm":
                w, b = ws[i], ws[i + 1]
                i += 2
                h = h @ (w.T if op["transB"] else w) + b
            else:
                raise ValueError(f"unsupported op in the exported chain: {kind}")
        return h

    return fn


def networks(a: argparse.Namespace) -> list[dict]:
    data = np.load(a.npz)
    specs = json.loads(str(data["specs"]))
    x_all = data["x"].astype(np.float32)
    out = []
    for net in a.nets.split(","):
        spec = specs[net]
        weights = [data[f"{net}_{i}"] for i in range(spec["n_weights"])]
        fn = _network_fn(spec["ops"])
        for b in (int(v) for v in a.batches.split(",")):
            x = x_all[:b]
            t0 = time.perf_counter()
            session = Session(fn, weights, x, _config())
            setup_s = time.perf_counter() - t0
            nbytes, actions = _profiled(session, x)  # also the warm-up
            times, y = _timed(session, x, a.queries)
            out.append({"net": net, "batch": b, "setup_s": setup_s, "total_s": statistics.median(times),
                        "total_s_all": times, "total_bytes": nbytes, "rounds": actions, "logits": y.tolist()})
    return out


def _layernorm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    d = x - mu
    return d * jax.lax.rsqrt((d * d).mean(-1, keepdims=True) + eps) * g + b


def _puma_gelu(x):
    """PUMA's GELU: 0 below -4, a cubic on [-4, -1.95), a degree-6 polynomial on [-1.95, 3], x above 3."""
    x2 = x * x
    f0 = ((-0.011034134030615728 * x - 0.11807612951181953) * x - 0.42226581151983866) * x - 0.5054031199708174
    f1 = ((0.0018067462606141187 * x2 - 0.037688200365904236) * x2 + 0.3603292692789629) * x2 + 0.5 * x \
        + 0.008526321541038084
    return jnp.where(x < -4.0, 0.0, jnp.where(x < -1.95, f0, jnp.where(x <= 3.0, f1, x)))


def _puma_softmax(x):
    d = x - jax.lax.stop_gradient(x.max(-1, keepdims=True))
    e = jnp.where(d < -14.0, 0.0, jnp.exp(d))
    return e / e.sum(-1, keepdims=True)


KEYS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln1_g", "ln1_b", "w1", "b1", "w2", "b2", "ln2_g", "ln2_b")


def _encoder_fn(puma: bool, heads: int, eps: float):
    def fn(*args):
        *ws, x = args
        p = dict(zip(KEYS, ws, strict=True))
        n, s, hidden = x.shape
        hd = hidden // heads

        def split(t):
            return t.reshape(n, s, heads, hd).transpose(0, 2, 1, 3)

        q, k, v = (split(x @ p["w" + c] + p["b" + c]) for c in "qkv")
        sc = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / np.sqrt(hd))
        pr = _puma_softmax(sc) if puma else jax.nn.softmax(sc, axis=-1)
        att = (pr @ v).transpose(0, 2, 1, 3).reshape(n, s, hidden)
        h = _layernorm(x + att @ p["wo"] + p["bo"], p["ln1_g"], p["ln1_b"], eps)
        f = h @ p["w1"] + p["b1"]
        f = _puma_gelu(f) if puma else jax.nn.gelu(f, approximate=False)
        return _layernorm(h + f @ p["w2"] + p["b2"], p["ln2_g"], p["ln2_b"], eps)

    return fn


def encoder(a: argparse.Namespace) -> list[dict]:
    data = np.load(a.npz)
    x = data["x"].astype(np.float32)
    weights = [data[k].astype(np.float32) for k in KEYS]
    out = []
    for puma in (False, True):
        t0 = time.perf_counter()
        session = Session(_encoder_fn(puma, 12, 1e-12), weights, x, _config(puma=puma))
        setup_s = time.perf_counter() - t0
        nbytes, actions = _profiled(session, x)  # also the warm-up
        times, y = _timed(session, x, a.queries)
        out.append({"variant": "PUMA approximations" if puma else "exact (SPU defaults)", "setup_s": setup_s,
                    "total_s": statistics.median(times), "total_s_all": times, "total_bytes": nbytes,
                    "rounds": actions, "y": y.tolist()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    n = sub.add_parser("networks")
    n.add_argument("--npz", required=True)
    n.add_argument("--nets", default="A,B,C,D")
    n.add_argument("--batches", default="1,64")
    e = sub.add_parser("encoder")
    e.add_argument("--npz", required=True)
    for p in (n, e):
        p.add_argument("--queries", type=int, default=3)
        p.add_argument("--out", required=True)
    a = ap.parse_args()
    records = networks(a) if a.kind == "networks" else encoder(a)
    meta = {"peer": f"SPU {spu.__version__}", "protocol": "SEMI2K, FM64, 2 parties as threads in one process",
            "jax": jax.__version__, "records": records}
    with open(a.out, "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
