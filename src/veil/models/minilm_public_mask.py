"""all-MiniLM-L6-v2 with the padding mask as a *public input* (one graph for any sentence lengths).

:func:`veil.models.minilm.minilm_graph` folds one batch's attention mask into the graph as constants.
Here the mask enters at run time instead, as two public inputs derived from it by the user
(:func:`public_inputs`): ``attention_bias`` (batch, 1, 1, seq), 0 for a real token and -1e4 for padding,
added to every attention score before the softmax (exp(-1e4) is 0 in float32 and in the mpc softmax,
whose exponential is exactly 0 below -11); and ``pool_weights`` (batch, seq, 1), ``mask / count``, the
weights of the mean pooling. They are *public*: under mpc the user sends them in the clear to both
servers (``graph.meta["public_inputs"]`` declares them with their largest magnitude), which reveals
how many real tokens each sentence has; the padded shapes reveal the sequence length anyway.

The final L2 normalisation divides by ``sqrt(|e|^2 + NORM_EPS)`` (:data:`veil.models.minilm.NORM_EPS`,
2^-16): the eps proves the input of the inverse square root inside the mpc kernel's range
(:mod:`veil.mpc.bounds` refuses an inverse square root without such a proof).

    ids, mask = minilm.tokenize(texts, 16)
    g = minilm_public_mask_graph(batch=len(texts), seq_len=16)
    run_plain(g, {"input_ids": ids, **public_inputs(mask)})
"""

from __future__ import annotations

import functools

import numpy as np

from veil.errors import InputError, ModelError
from veil.graph.ir import Graph, Node, TensorSpec

__all__ = ["minilm_public_mask_graph", "public_inputs", "MASKED_BIAS"]

MASKED_BIAS = -1e4  # an additive bias at or below veil.graph.fuse.MASKED excludes a position


def public_inputs(attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The public inputs of :func:`minilm_public_mask_graph` for a (batch, seq) 0/1 attention mask."""
    m = np.asarray(attention_mask)
    if m.ndim != 2 or m.shape[1] < 2 or not np.isin(m, (0, 1)).all() or (m.sum(1) == 0).any():
        raise InputError(f"attention_mask must be (batch, seq_len) of 0/1 with at least one 1 per row, got shape {m.shape}")
    m = m.astype(np.float32)
    bias = ((1.0 - m) * MASKED_BIAS)[:, None, None, :].astype(np.float32)
    pool = (m / m.sum(1, keepdims=True))[:, :, None].astype(np.float32)
    return {"attention_bias": bias, "pool_weights": pool}


@functools.lru_cache(maxsize=4)
def _graph(batch: int, seq_len: int) -> Graph:
    from veil.graph.onnx_import import from_onnx
    from veil.models.minilm import minilm_onnx

    # fold a reference mask with padding in every row, then make its traces inputs again
    ref = np.ones((batch, seq_len), np.int64)
    ref[:, -1] = 0
    g = from_onnx(minilm_onnx(batch, seq_len), name="all-MiniLM-L6-v2", constants={"attention_mask": ref})
    nodes: list[Node] = []
    rename: dict[str, str] = {}
    softmaxes = pooled = 0
    for n in g.nodes:
        n = Node(n.name, n.op, tuple(rename.get(i, i) for i in n.inputs), n.output, dict(n.params), dict(n.attrs))
        if n.op == "softmax" and "mask" in n.params:
            biased = f"{n.inputs[0]}+attention_bias"
            nodes.append(Node(f"{n.name}/bias", "add", (n.inputs[0], "attention_bias"), biased))
            nodes.append(Node(n.name, "softmax", (biased,), n.output, {}, dict(n.attrs)))
            softmaxes += 1
        elif n.name == "/Mul" and n.op == "mul_const" and n.params["c"].shape == (batch, seq_len, 1):
            nodes.append(Node(n.name, "mul", (n.inputs[0], "pool_weights"), n.output))  # h * mask / count
            pooled += 1
        elif n.name == "/Div" and n.op == "mul_const" and n.params["c"].shape == (batch, 1):
            rename[n.output] = n.inputs[0]  # the 1 / count is in pool_weights
            pooled += 1
        else:
            nodes.append(n)
    if softmaxes != 6 or pooled != 2:
        raise ModelError(f"unexpected MiniLM export: {softmaxes} masked softmaxes (6 expected), {pooled} of the 2 "
                         "pooling nodes found")
    inputs = [*g.inputs, TensorSpec("attention_bias", (batch, 1, 1, seq_len), "float32"),
              TensorSpec("pool_weights", (batch, seq_len, 1), "float32")]
    meta = {"public_inputs": {"attention_bias": -MASKED_BIAS, "pool_weights": 1.0}}
    return Graph(nodes, inputs, list(g.outputs), "all-MiniLM-L6-v2 (public mask)", meta=meta)


def minilm_public_mask_graph(batch: int, seq_len: int) -> Graph:
    """The MiniLM graph for ``batch`` sentences of ``seq_len`` tokens whose padding mask is a public
    input (see the module docstring); inputs ``input_ids`` and :func:`public_inputs`."""
    if batch < 1 or seq_len < 2:
        raise InputError(f"MiniLM needs batch >= 1 and seq_len >= 2, got {batch} and {seq_len}")
    return _graph(int(batch), int(seq_len))
