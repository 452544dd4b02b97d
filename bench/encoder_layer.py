"""One transformer encoder layer with fixed-seed weights, shared by veil's mpc transformer bench and the
peers (bench/peers: CrypTen, SPU), so every framework runs the same layer on the same input.

The layer is BERT/MiniLM's post-LayerNorm block at all-MiniLM-L6-v2's sizes: hidden 384, 12 heads of 32,
FFN 1536 with exact (erf) GELU, LayerNorm eps 1e-12, sequence 16 by default:

    a = softmax((x Wq + bq)(x Wk + bk)^T / sqrt(32)) (x Wv + bv)        per head
    h = LayerNorm(x + a Wo + bo)
    y = LayerNorm(h + GELU(h W1 + b1) W2 + b2)

Weights are drawn with numpy (seed 0): W ~ N(0, 1/fan_in) (Wq, Wk scaled by 1.5 so attention is not
flat), biases N(0, 0.1^2), LayerNorm gamma 1 + N(0, 0.1^2), beta N(0, 0.1^2); the input is N(0, 1)
(seed 1). `reference` is the float64 forward pass; `build_onnx` writes the same layer as an ONNX graph
(MatMul, Add, Reshape, Transpose, Mul, Softmax, LayerNormalization, Div/Erf GELU; opset 17) and
`save_npz` the weights, input and reference output for the peers' virtual environments (numpy only).

    python bench/encoder_layer.py --onnx layer.onnx --npz layer.npz [--seq 16]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

__all__ = ["HIDDEN", "HEADS", "FFN", "SEQ", "EPS", "weights", "inputs", "reference", "build_onnx", "save_npz"]

HIDDEN, HEADS, FFN, SEQ, EPS = 384, 12, 1536, 16, 1e-12
HEAD = HIDDEN // HEADS


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The layer's parameters (float32), matrices as (in, out) so that y = x @ W + b."""
    rng = np.random.default_rng(seed)

    def mat(i: int, o: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((i, o)) * scale / math.sqrt(i)).astype(np.float32)

    def vec(n: int, mean: float = 0.0) -> np.ndarray:
        return (mean + 0.1 * rng.standard_normal(n)).astype(np.float32)

    return {
        "wq": mat(HIDDEN, HIDDEN, 1.5), "bq": vec(HIDDEN), "wk": mat(HIDDEN, HIDDEN, 1.5), "bk": vec(HIDDEN),
        "wv": mat(HIDDEN, HIDDEN), "bv": vec(HIDDEN), "wo": mat(HIDDEN, HIDDEN), "bo": vec(HIDDEN),
        "ln1_g": vec(HIDDEN, 1.0), "ln1_b": vec(HIDDEN),
        "w1": mat(HIDDEN, FFN), "b1": vec(FFN), "w2": mat(FFN, HIDDEN), "b2": vec(HIDDEN),
        "ln2_g": vec(HIDDEN, 1.0), "ln2_b": vec(HIDDEN),
    }


def inputs(seq: int = SEQ, seed: int = 1) -> np.ndarray:
    """The user's hidden states, float32 (1, seq, HIDDEN)."""
    return np.random.default_rng(seed).standard_normal((1, seq, HIDDEN)).astype(np.float32)


def _layernorm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * g + b


def reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The float64 forward pass: (1, seq, HIDDEN) -> (1, seq, HIDDEN)."""
    from scipy.special import erf

    x = x.astype(np.float64)
    p = {k: v.astype(np.float64) for k, v in w.items()}
    n, s, _ = x.shape

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(n, s, HEADS, HEAD).transpose(0, 2, 1, 3)

    q, k, v = (heads(x @ p["w" + c] + p["b" + c]) for c in "qkv")
    sc = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HEAD)
    sc = np.exp(sc - sc.max(-1, keepdims=True))
    a = (sc / sc.sum(-1, keepdims=True)) @ v
    a = a.transpose(0, 2, 1, 3).reshape(n, s, HIDDEN)
    h = _layernorm(x + a @ p["wo"] + p["bo"], p["ln1_g"], p["ln1_b"])
    f = h @ p["w1"] + p["b1"]
    f = 0.5 * f * (1.0 + erf(f / math.sqrt(2.0)))
    return _layernorm(h + f @ p["w2"] + p["b2"], p["ln2_g"], p["ln2_b"])


def build_onnx(path: str | Path, seq: int = SEQ, seed: int = 0) -> Path:
    """Write the layer as an ONNX model: input `x` float32 (1, seq, 384), output `y` (1, seq, 384)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = weights(seed)
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    const("shape_heads", np.array([1, seq, HEADS, HEAD], np.int64))
    const("shape_hidden", np.array([1, seq, HIDDEN], np.int64))
    const("inv_sqrt_head", np.array(1.0 / math.sqrt(HEAD), np.float32))
    const("sqrt2", np.array(math.sqrt(2.0), np.float32))
    const("one", np.array(1.0, np.float32))
    const("half", np.array(0.5, np.float32))
    nodes = []

    def node(op: str, ins: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def linear(x: str, c: str, out: str) -> str:
        return node("Add", [node("MatMul", [x, "w" + c], out + "_mm"), "b" + c], out)

    q = node("Transpose", [node("Reshape", [linear("x", "q", "q"), "shape_heads"], "q_r")], "q_t", perm=[0, 2, 1, 3])
    k = node("Transpose", [node("Reshape", [linear("x", "k", "k"), "shape_heads"], "k_r")], "k_t", perm=[0, 2, 3, 1])
    v = node("Transpose", [node("Reshape", [linear("x", "v", "v"), "shape_heads"], "v_r")], "v_t", perm=[0, 2, 1, 3])
    sc = node("Mul", [node("MatMul", [q, k], "scores_mm"), "inv_sqrt_head"], "scores")
    a = node("MatMul", [node("Softmax", [sc], "probs", axis=-1), v], "attn")
    a = node("Reshape", [node("Transpose", [a], "attn_t", perm=[0, 2, 1, 3]), "shape_hidden"], "attn_r")
    h = node("Add", ["x", linear(a, "o", "o")], "res1")
    h = node("LayerNormalization", [h, "ln1_g", "ln1_b"], "ln1", axis=-1, epsilon=EPS)
    f = linear(h, "1", "ffn1")
    g = node("Add", [node("Erf", [node("Div", [f, "sqrt2"], "gelu_div")], "gelu_erf"), "one"], "gelu_add")
    g = node("Mul", [node("Mul", [f, g], "gelu_mul"), "half"], "gelu")
    y = node("Add", [h, linear(g, "2", "ffn2")], "res2")
    node("LayerNormalization", [y, "ln2_g", "ln2_b"], "y", axis=-1, epsilon=EPS)
    graph = helper.make_graph(
        nodes, "encoder_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="veil-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def save_npz(path: str | Path, seq: int = SEQ, seed: int = 0, input_seed: int = 1) -> Path:
    """Weights, input `x` and float64 reference output `y` in one .npz (what the peers load)."""
    w = weights(seed)
    x = inputs(seq, input_seed)
    path = Path(path)
    np.savez(path, x=x, y=reference(x, w), **w)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx")
    ap.add_argument("--npz")
    ap.add_argument("--seq", type=int, default=SEQ)
    a = ap.parse_args()
    if a.onnx:
        print(build_onnx(a.onnx, a.seq))
    if a.npz:
        print(save_npz(a.npz, a.seq))


if __name__ == "__main__":
    main()
