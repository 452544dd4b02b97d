"""A Llama decoder (llama2.c checkpoint format) as veil graphs, one per generation step.

The step graph for position ``p`` takes the current token id and the key/value cache of the ``p``
earlier positions, and returns the next-token logits and the cache extended by one position:

=========================  ===============================  =====================================
name                       shape                            meaning
=========================  ===============================  =====================================
``token`` (input)          (1, 1) int64                     the current token id (the user's)
``past_k_{l}`` (input)     (1, n_kv_heads, p, head_dim)     keys of layer l, positions < p (p > 0)
``past_v_{l}`` (input)     (1, n_kv_heads, p, head_dim)     values of layer l
``logits`` (output)        (1, 1, vocab)                    next-token scores
``present_k_{l}`` (output) (1, n_kv_heads, p + 1, head_dim)  keys for the next step
``present_v_{l}`` (output) (1, n_kv_heads, p + 1, head_dim)  values for the next step
=========================  ===============================  =====================================

``graph.meta["state"]`` maps ``past_*`` to ``present_*`` (for every layer, also at p = 0 where the
step has no ``past_*`` inputs): a runner feeds each step's ``present_*``
to the next step's ``past_*`` (the mpc mode keeps them as shares on the servers). The position is
public and baked into the graph: RoPE is ``q * cos_p + (S q) * sin_p`` with public per-position
constants ``cos_p``, ``sin_p`` and a position-independent weight ``S W_q`` (``S`` rotates each pair),
so every step uses the same weights. No attention mask is needed: a step attends to the past only.

Checkpoint layout (llama2.c ``run.c``): seven int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len; a negative vocab_size means an unshared classifier), then float32
weights. RoPE theta 10000, RMSNorm eps 1e-5, SwiGLU feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from veil.errors import InputError, ModelError, ModelFormatError
from veil.graph.ir import Graph, Node, TensorSpec

__all__ = ["LlamaConfig", "Llama", "load_llama2c", "generate_plain"]


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    eps: float = 1e-5
    theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads


@dataclass
class Llama:
    """Weights of a Llama decoder, matrices stored (out_features, in_features)."""

    config: LlamaConfig
    weights: dict[str, np.ndarray] = field(repr=False)
    name: str = "llama"

    def step_graph(self, pos: int) -> Graph:
        """The decoder step at position ``pos`` (see the module docstring)."""
        c, w = self.config, self.weights
        if not 0 <= pos < c.seq_len:
            raise InputError(f"position {pos} is outside the model's context [0, {c.seq_len})")
        hd, kv, grp = c.head_dim, c.n_kv_heads, c.n_heads // c.n_kv_heads
        cos_q, sin_q = _rope(pos, c.dim, hd, c.theta)
        cos_k, sin_k = _rope(pos, c.kv_dim, hd, c.theta)
        nodes: list[Node] = []
        inputs = [TensorSpec("token", (1, 1), "int64")]
        outputs = ["logits"]
        state: dict[str, str] = {}

        def add(name: str, op: str, ins: tuple[str, ...], params: dict[str, np.ndarray] | None = None,
                **attrs: object) -> str:
            nodes.append(Node(name, op, ins, name, params or {}, dict(attrs)))
            return name

        x = add("embed", "embedding", ("token",), {"table": w["tok_embeddings"]})  # (1, 1, dim)
        for layer in range(c.n_layers):
            p = f"l{layer}"
            h = add(f"{p}/attn_norm", "rmsnorm", (x,), {"gamma": w[f"{p}.attn_norm"]}, eps=c.eps)
            q = _rotated(add, f"{p}/q", h, w[f"{p}.wq"] / np.sqrt(hd), cos_q, sin_q)
            k = _rotated(add, f"{p}/k", h, w[f"{p}.wk"], cos_k, sin_k)
            v = add(f"{p}/v", "linear", (h,), {"W": w[f"{p}.wv"]})
            q = add(f"{p}/q_heads", "reshape", (q,), shape=(1, kv, grp, hd))  # query head = kv head * grp + m
            heads = {}
            for kind, t in (("k", k), ("v", v)):
                t = add(f"{p}/{kind}_split", "reshape", (t,), shape=(1, 1, kv, hd))
                new = f"present_{kind}_{layer}" if pos == 0 else f"{p}/{kind}_new"
                state[f"past_{kind}_{layer}"] = f"present_{kind}_{layer}"
                t = add(new, "transpose", (t,), perm=(0, 2, 1, 3))  # (1, kv, 1, hd)
                if pos > 0:
                    past = f"past_{kind}_{layer}"
                    inputs.append(TensorSpec(past, (1, kv, pos, hd), "float32"))
                    t = add(f"present_{kind}_{layer}", "concat", (past, t), axis=2)
                outputs.append(t)
                heads[kind] = t
            kt = add(f"{p}/k_t", "transpose", (heads["k"],), perm=(0, 1, 3, 2))  # (1, kv, hd, pos+1)
            s = add(f"{p}/scores", "matmul", (q, kt))  # (1, kv, grp, pos+1)
            a = add(f"{p}/attn", "softmax", (s,), axis=3)
            o = add(f"{p}/attn_out", "matmul", (a, heads["v"]))  # (1, kv, grp, hd)
            o = add(f"{p}/attn_merge", "reshape", (o,), shape=(1, 1, c.dim))
            o = add(f"{p}/wo", "linear", (o,), {"W": w[f"{p}.wo"]})
            x = add(f"{p}/attn_res", "add", (x, o))
            h = add(f"{p}/ffn_norm", "rmsnorm", (x,), {"gamma": w[f"{p}.ffn_norm"]}, eps=c.eps)
            g = add(f"{p}/w1", "linear", (h,), {"W": w[f"{p}.w1"]})
            g = add(f"{p}/silu", "silu", (g,))
            u = add(f"{p}/w3", "linear", (h,), {"W": w[f"{p}.w3"]})
            g = add(f"{p}/gate", "mul", (g, u))
            g = add(f"{p}/w2", "linear", (g,), {"W": w[f"{p}.w2"]})
            x = add(f"{p}/ffn_res", "add", (x, g))
        x = add("final_norm", "rmsnorm", (x,), {"gamma": w["norm"]}, eps=c.eps)
        add("logits", "linear", (x,), {"W": w["output"]})
        graph = Graph(nodes, inputs, outputs, name=f"{self.name}@{pos}")
        graph.meta.update({"state": state, "position": pos, "model": self.name})
        return graph


def _rope(pos: int, width: int, hd: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of llama2.c's rotation angles for every element of a (heads * hd) vector."""
    pair = (np.arange(width) % hd) // 2 * 2
    ang = pos * theta ** (-pair / hd)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _swap(wt: np.ndarray) -> np.ndarray:
    """``S @ W`` where (S q)[2i] = -q[2i+1] and (S q)[2i+1] = q[2i]."""
    out = np.empty_like(wt)
    out[0::2], out[1::2] = -wt[1::2], wt[0::2]
    return out


def _rotated(add, name: str, h: str, wt: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> str:  # type: ignore[no-untyped-def]
    a = add(f"{name}", "linear", (h,), {"W": wt.astype(np.float32)})
    b = add(f"{name}_swap", "linear", (h,), {"W": _swap(wt).astype(np.float32)})
    a = add(f"{name}_cos", "mul_const", (a,), {"c": cos})
    b = add(f"{name}_sin", "mul_const", (b,), {"c": sin})
    return str(add(f"{name}_rope", "add", (a, b)))


def load_llama2c(path: str | Path) -> Llama:
    """Read a llama2.c checkpoint (``run.c`` layout, float32)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"llama2.c checkpoint {str(p)!r} does not exist")
    raw = p.read_bytes()
    if len(raw) < 28:
        raise ModelFormatError(f"{p.name}: too short for a llama2.c header (7 int32)")
    dim, hidden, layers, heads, kv, vocab, seq = (int(v) for v in np.frombuffer(raw[:28], "<i4"))
    if min(dim, hidden, layers, heads, kv, seq) <= 0 or dim % heads or heads % kv or vocab == 0:
        raise ModelFormatError(f"{p.name}: implausible llama2.c header {(dim, hidden, layers, heads, kv, vocab, seq)}")
    cfg = LlamaConfig(dim, hidden, layers, heads, kv, abs(vocab), seq, shared_classifier=vocab > 0)
    data = np.frombuffer(raw[28:], "<f4")
    off = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal off
        n = int(np.prod(shape))
        if off + n > data.size:
            raise ModelFormatError(f"{p.name}: file ends inside the weights (expected the llama2.c layout for {cfg})")
        out = data[off:off + n].reshape(shape).astype(np.float32)
        off += n
        return out

    V, L, kvd, hd = cfg.vocab_size, layers, cfg.kv_dim, cfg.head_dim
    emb = take(V, dim)
    per = {"attn_norm": take(L, dim), "wq": take(L, dim, dim), "wk": take(L, kvd, dim), "wv": take(L, kvd, dim),
           "wo": take(L, dim, dim), "ffn_norm": take(L, dim), "w1": take(L, hidden, dim), "w2": take(L, dim, hidden),
           "w3": take(L, hidden, dim)}
    w = {"tok_embeddings": emb, "norm": take(dim)}
    take(seq, hd // 2)  # legacy RoPE tables (cos, sin), recomputed instead
    take(seq, hd // 2)
    w["output"] = emb if cfg.shared_classifier else take(V, dim)
    for k, v in per.items():
        for i in range(L):
            w[f"l{i}.{k}"] = v[i]
    return Llama(cfg, w, name=p.stem)


def generate_plain(model: Llama, steps: int, bos: int = 1) -> list[int]:
    """Greedy decoding with the plain executor, step graphs and an explicit cache (the oracle for mpc)."""
    from veil.plain import run_plain

    token, out = bos, []
    cache: dict[str, np.ndarray] = {}
    for pos in range(steps):
        g = model.step_graph(pos)
        past = {s.name: cache[g.meta["state"][s.name]] for s in g.inputs if s.name != "token"}
        res = run_plain(g, {"token": np.array([[token]], np.int64), **past})
        token = int(np.argmax(res["logits"][0, -1]))
        out.append(token)
        cache = {o: res[o] for o in g.outputs if o != "logits"}
    return out
