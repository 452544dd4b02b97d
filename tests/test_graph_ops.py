"""Every supported ONNX operator: veil's plain executor against onnxruntime, random shapes and weights.

Tolerance: float32 computations, compared with rtol=1e-4, atol=1e-4 (accumulation order differs
between NumPy/BLAS and onnxruntime; errors observed are ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnx_builders import make_model, run_ort
from veil.graph import from_onnx
from veil.plain import run_plain

RTOL = ATOL = 1e-4


def check(model, feeds):
    graph = from_onnx(model)
    want = run_ort(model, feeds)
    got = run_plain(graph, feeds)
    assert list(got) == graph.outputs
    for w, g in zip(want, got.values(), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    return graph


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("seed", range(3))
def test_gemm(seed, trans_b):
    rng = np.random.default_rng(seed)
    n, k, m = rng.integers(1, 9), rng.integers(1, 40), rng.integers(1, 30)
    w = f32(rng, m, k) if trans_b else f32(rng, k, m)
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)
    g = check(make_model([node], {"x": [None, k]}, ["y"], {"W": w, "b": f32(rng, m)}), {"x": f32(rng, n, k)})
    assert [n.op for n in g.nodes] == ["linear"]


@pytest.mark.parametrize("seed", range(3))
def test_matmul_constant_and_activations(seed):
    rng = np.random.default_rng(seed)
    b, s, d, e = 2, rng.integers(1, 7), rng.integers(1, 20), rng.integers(1, 20)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["y"])]
    g = check(make_model(nodes, {"x": [b, s, d]}, ["y"], {"W": f32(rng, d, e)}), {"x": f32(rng, b, s, d)})
    assert [n.op for n in g.nodes] == ["linear", "transpose", "matmul"]


@pytest.mark.parametrize("seed", range(4))
def test_conv(seed):
    rng = np.random.default_rng(seed)
    c, o, k = rng.integers(1, 4), rng.integers(1, 6), int(rng.integers(1, 5))
    h, w = rng.integers(k, 12), rng.integers(k, 12)
    strides = [int(rng.integers(1, 3)), int(rng.integers(1, 3))]
    pads = [int(p) for p in rng.integers(0, 3, size=4)]
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], strides=strides, pads=pads, kernel_shape=[k, k])
    check(make_model([node], {"x": [None, c, h, w]}, ["y"], {"W": f32(rng, o, c, k, k), "b": f32(rng, o)}),
          {"x": f32(rng, 2, c, h, w)})


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("seed", range(3))
def test_pools(op, seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 4))
    pads = [int(p) for p in rng.integers(0, k, size=4)] if seed else [0, 0, 0, 0]
    attrs = {"kernel_shape": [k, k], "strides": [int(rng.integers(1, 3))] * 2, "pads": pads}
    if op == "AveragePool":
        attrs["count_include_pad"] = seed % 2
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    check(make_model([node], {"x": [None, 3, 9, 8]}, ["y"]), {"x": f32(rng, 2, 3, 9, 8)})


def test_global_avgpool_flatten_relu(rng):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["y"], axis=1)]
    check(make_model(nodes, {"x": [None, 4, 5, 6]}, ["y"]), {"x": f32(rng, 3, 4, 5, 6)})


@pytest.mark.parametrize("fold", [True, False])
def test_batchnorm(rng, fold):
    c = 4
    bn = {"s": np.abs(f32(rng, c)) + 0.5, "bb": f32(rng, c), "m": f32(rng, c), "v": np.abs(f32(rng, c)) + 0.1}
    if fold:  # Conv -> BN is folded into the conv
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3]),
                 helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"], epsilon=1e-3)]
        inits = {"W": f32(rng, c, 2, 3, 3), **bn}
        g = check(make_model(nodes, {"x": [None, 2, 7, 7]}, ["y"], inits), {"x": f32(rng, 2, 2, 7, 7)})
        assert [n.op for n in g.nodes] == ["conv2d"]
    else:  # BN on a graph input stays as a per-channel affine map
        nodes = [helper.make_node("BatchNormalization", ["x", "s", "bb", "m", "v"], ["y"])]
        g = check(make_model(nodes, {"x": [None, c, 3, 3]}, ["y"], bn), {"x": f32(rng, 2, c, 3, 3)})
        assert [n.op for n in g.nodes] == ["mul_const", "add_const"]


def test_batchnorm_not_folded_when_conv_output_is_shared(rng):
    c = 3
    bn = {"s": np.abs(f32(rng, c)) + 0.5, "bb": f32(rng, c), "m": f32(rng, c), "v": np.abs(f32(rng, c)) + 0.1}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
             helper.make_node("Add", ["n", "c"], ["y"])]
    check(make_model(nodes, {"x": [None, c, 4, 4]}, ["y"], {"W": f32(rng, c, c, 1, 1), **bn}), {"x": f32(rng, 2, c, 4, 4)})


def test_reshape_and_flatten_axis(rng):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Flatten", ["r"], ["y"], axis=2)]
    check(make_model(nodes, {"x": [None, 6, 4]}, ["y"], {"shape": np.array([0, 3, -1, 2], np.int64)}),
          {"x": f32(rng, 2, 6, 4)})


# Div is supported by a constant on the right only (division by an activation: test_errors)
_BINARY = [(op, side) for op in ("Add", "Sub", "Mul") for side in ("left", "right", "none")] + [("Div", "right")]


@pytest.mark.parametrize(("op", "const_side"), _BINARY)
def test_binary(rng, op, const_side):
    c = f32(rng, 5) + (3.0 if op == "Div" else 0.0)
    if const_side == "none":
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["x", "r"], ["y"])]
        check(make_model(nodes, {"x": [None, 5]}, ["y"]), {"x": f32(rng, 3, 5)})
    else:
        ins = ["c", "x"] if const_side == "left" else ["x", "c"]
        check(make_model([helper.make_node(op, ins, ["y"])], {"x": [None, 5]}, ["y"], {"c": c}), {"x": f32(rng, 3, 5)})


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_argmax(rng, axis):
    from onnx import TensorProto

    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=axis),
             helper.make_node("ArgMax", ["x"], ["k"], axis=axis, keepdims=0)]
    m = make_model(nodes, {"x": [None, 4, 10]}, ["p", "k"], out_types={"k": TensorProto.INT64})
    check(m, {"x": f32(rng, 3, 4, 10)})


def test_erf(rng):
    check(make_model([helper.make_node("Erf", ["x"], ["y"])], {"x": [None, 7]}, ["y"]), {"x": 3 * f32(rng, 50, 7)})


def test_layernorm_gelu_tanh_sigmoid(rng):
    d = 16
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["l"], axis=-1, epsilon=1e-5),
             helper.make_node("Gelu", ["l"], ["e"], domain=""),
             helper.make_node("Tanh", ["e"], ["t"]), helper.make_node("Sigmoid", ["t"], ["y"])]
    m = make_model(nodes, {"x": [None, 3, d]}, ["y"], {"g": f32(rng, d), "b": f32(rng, d)}, opset=20)
    check(m, {"x": f32(rng, 2, 3, d)})


def test_constant_and_identity_nodes(rng):
    from onnx import numpy_helper

    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(f32(rng, 4))),
             helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Add", ["i", "c"], ["y"])]
    check(make_model(nodes, {"x": [None, 4]}, ["y"]), {"x": f32(rng, 2, 4)})


def test_shipped_networks_match_onnxruntime():
    from veil.assets import NETWORKS, load_slice, model_path

    x, _ = load_slice(16)
    for name in NETWORKS:
        import onnx

        m = onnx.load(str(model_path(name)))
        check(m, {"x": x})
