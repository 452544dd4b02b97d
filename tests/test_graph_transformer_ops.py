"""Transformer operators at import: veil's plain executor against onnxruntime on random shapes.

Each test builds a small ONNX model, imports it, checks which veil ops it became, and compares
the plain executor with onnxruntime (float32, rtol = atol = 1e-4 unless stated).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_builders import run_ort
from veil.errors import ModelError, UnsupportedOpError
from veil.graph import from_onnx
from veil.plain import run_plain

TOL = 1e-4


def build(nodes, inputs, outputs, inits=None, opset=17):
    """inputs: name -> shape (float) or (shape, TensorProto type); batch dims given as None."""
    ins = []
    for k, v in inputs.items():
        shape, ty = (v if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], int) and not isinstance(v[0], int)
                     else (v, TensorProto.FLOAT))
        ins.append(helper.make_tensor_value_info(k, ty, [int(d) if d is not None else "N" for d in shape]))
    inits_p = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    ir = 10 if opset >= 21 else 8
    probe = helper.make_model(helper.make_graph(list(nodes), "t", ins, [], inits_p),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(probe).graph.value_info}
    outs = [inferred.get(o) or helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    m = helper.make_model(helper.make_graph(list(nodes), "t", ins, outs, inits_p),
                          opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(m)
    return m


def check(model, feeds, tol=TOL, **kw):
    graph = from_onnx(model, **kw)
    bound = kw.get("constants") or {}
    want = run_ort(model, {**feeds, **bound})
    got = run_plain(graph, {k: v for k, v in feeds.items() if k not in bound})
    for w, g in zip(want, got.values(), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    return graph


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def ops(g):
    return [n.op for n in g.nodes]


def const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


# --- normalisations ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_layernormalization(seed):
    rng = np.random.default_rng(seed)
    b, s, d = int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(2, 40))
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)
    g = check(build([node], {"x": [None, s, d]}, ["y"], {"g": f32(rng, d), "b": f32(rng, d)}), {"x": f32(rng, b, s, d)})
    assert ops(g) == ["layernorm"]


def test_rmsnormalization_opset23():
    rng = np.random.default_rng(0)
    node = helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)
    g = check(build([node], {"x": [None, 5, 12]}, ["y"], {"g": f32(rng, 12)}, opset=23), {"x": f32(rng, 2, 5, 12)})
    assert ops(g) == ["rmsnorm"]


def test_simplified_layernormalization_of_onnxruntime():
    """onnxruntime's RMSNorm (optimised exports) is in the default domain but not in onnx's registry."""
    rng = np.random.default_rng(20)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-6)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(f32(rng, 10), "g")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    g = check(m, {"x": f32(rng, 3, 10)})
    assert ops(g) == ["rmsnorm"]


def _decomposed_layernorm(d, eps, div=True):
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
             helper.make_node("Sub", ["x", "mu"], ["xc"]),
             helper.make_node("Pow", ["xc", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"])]
    if div:
        nodes.append(helper.make_node("Div", ["xc", "sd"], ["z"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["sd"], ["r"]), helper.make_node("Mul", ["xc", "r"], ["z"])]
    nodes += [helper.make_node("Mul", ["z", "g"], ["zg"]), helper.make_node("Add", ["zg", "b"], ["y"])]
    return nodes, {"two": np.float32(2.0), "eps": np.float32(eps)}


@pytest.mark.parametrize("div", [True, False])
def test_decomposed_layernorm_recognised(div):
    rng = np.random.default_rng(1)
    nodes, c = _decomposed_layernorm(24, 1e-5, div)
    m = build(nodes, {"x": [None, 3, 24]}, ["y"], {**c, "g": f32(rng, 24), "b": f32(rng, 24)})
    g = check(m, {"x": f32(rng, 2, 3, 24) * 3 + 1})
    assert ops(g) == ["layernorm"] and g.nodes[0].attrs["eps"] == pytest.approx(1e-5)


@pytest.mark.parametrize("rsqrt_form", ["div_sqrt", "mul_reciprocal"])
def test_decomposed_rmsnorm_recognised(rsqrt_form):
    """HF LlamaRMSNorm: x.pow(2).mean(-1, keepdim) -> + eps -> rsqrt -> x * r -> weight * h."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[2]),
             helper.make_node("Add", ["ms", "eps"], ["me"]),
             helper.make_node("Sqrt", ["me"], ["sd"])]
    if rsqrt_form == "div_sqrt":
        nodes.append(helper.make_node("Div", ["x", "sd"], ["z"]))
    else:
        nodes += [helper.make_node("Div", ["one", "sd"], ["r"]), helper.make_node("Mul", ["x", "r"], ["z"])]
    nodes.append(helper.make_node("Mul", ["g", "z"], ["y"]))
    inits = {"two": np.float32(2), "eps": np.float32(1e-6), "one": np.float32(1), "g": f32(rng, 16)}
    g = check(build(nodes, {"x": [None, 4, 16]}, ["y"], inits), {"x": f32(rng, 3, 4, 16)})
    assert ops(g) == ["rmsnorm"]


def test_region_not_fused_when_intermediate_is_reused():
    """The mean is also an output: replacing the region would lose it, so nothing is fused."""
    rng = np.random.default_rng(3)
    nodes, c = _decomposed_layernorm(8, 1e-5)
    g = check(build(nodes, {"x": [None, 8]}, ["y", "mu"], {**c, "g": f32(rng, 8), "b": f32(rng, 8)}), {"x": f32(rng, 2, 8)})
    assert "layernorm" not in ops(g) and "reduce_mean" in ops(g)


# --- activations ---------------------------------------------------------------------------------
def test_gelu_erf_pattern_and_tanh_form():
    rng = np.random.default_rng(4)
    erf = [helper.make_node("Div", ["x", "s2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
           helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["x", "e1"], ["m"]),
           helper.make_node("Mul", ["m", "half"], ["y"])]
    inits = {"s2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}
    x = f32(rng, 4, 33) * 4
    assert ops(check(build(erf, {"x": [None, 33]}, ["y"], inits), {"x": x})) == ["gelu"]
    # the tanh form as torch/HF spell it: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
    tanh = [helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Pow", ["x", "three"], ["x3"]),
            helper.make_node("Mul", ["x3", "k"], ["kx3"]), helper.make_node("Add", ["x", "kx3"], ["in"]),
            helper.make_node("Mul", ["in", "c"], ["ci"]), helper.make_node("Tanh", ["ci"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["t1"]), helper.make_node("Mul", ["hx", "t1"], ["y"])]
    inits = {"half": np.float32(0.5), "three": np.float32(3), "k": np.float32(0.044715),
             "c": np.float32(np.sqrt(2 / np.pi)), "one": np.float32(1)}
    assert ops(check(build(tanh, {"x": [None, 33]}, ["y"], inits), {"x": x})) == ["gelu_tanh"]
    node = helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")
    assert ops(check(build([node], {"x": [None, 33]}, ["y"], opset=20), {"x": x})) == ["gelu_tanh"]


def test_silu_sigmoid_tanh():
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"]),
             helper.make_node("Sigmoid", ["x"], ["y2"]), helper.make_node("Tanh", ["x"], ["y3"])]
    g = check(build(nodes, {"x": [None, 7]}, ["y", "y2", "y3"]), {"x": f32(rng, 3, 7) * 5})
    assert sorted(ops(g)) == ["sigmoid", "silu", "tanh"]


def test_reciprocal_sqrt_pow_neg():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Reciprocal", ["x"], ["r"]), helper.make_node("Sqrt", ["x"], ["s"]),
             helper.make_node("Pow", ["x", "mh"], ["p"]), helper.make_node("Neg", ["x"], ["n"]),
             helper.make_node("Div", ["three", "x"], ["d"])]
    g = check(build(nodes, {"x": [None, 9]}, ["r", "s", "p", "n", "d"], {"mh": np.float32(-0.5), "three": np.float32(3)}),
              {"x": rng.uniform(0.1, 5, (2, 9)).astype(np.float32)})
    assert {"reciprocal", "sqrt", "rsqrt", "mul_const"} <= set(ops(g))


# --- softmax and masks -------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_softmax_any_axis(axis):
    rng = np.random.default_rng(7)
    node = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    g = check(build([node], {"x": [None, 5, 6]}, ["y"]), {"x": f32(rng, 3, 5, 6)})
    assert g.nodes[0].attrs["axis"] == axis % 3


def test_softmax_with_causal_mask_becomes_masked_softmax():
    rng = np.random.default_rng(8)
    s = 6
    causal = np.triu(np.full((s, s), np.finfo(np.float32).min, np.float32), 1)
    nodes = [helper.make_node("MatMul", ["x", "xt"], ["sc"]), helper.make_node("Add", ["sc", "mask"], ["sm"]),
             helper.make_node("Softmax", ["sm"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "x"], ["y"]),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2])]
    nodes = [nodes[4]] + nodes[:4]
    g = check(build(nodes, {"x": [None, 2, s, 4]}, ["y"], {"mask": causal}), {"x": f32(rng, 2, 2, s, 4)})
    sm = next(n for n in g.nodes if n.op == "softmax")
    assert "add_const" not in ops(g) and np.isneginf(sm.params["mask"][0, 1]) and sm.params["mask"][1, 0] == 0


def test_where_with_constant_condition_padding_mask():
    """scores.masked_fill(~keep, -inf) spelt as Where(keep, scores, -inf) before a softmax."""
    rng = np.random.default_rng(9)
    keep = np.ones((2, 1, 1, 5), bool)
    keep[1, ..., 3:] = False
    nodes = [helper.make_node("Where", ["keep", "x", "neg"], ["w"]), helper.make_node("Softmax", ["w"], ["y"], axis=-1),
             helper.make_node("Where", ["keep", "x", "z"], ["y2"])]
    inits = {"keep": keep, "neg": np.float32(-np.inf)}
    g = check(build(nodes, {"x": [2, 3, 4, 5], "z": [2, 3, 4, 5]}, ["y", "y2"], inits),
              {"x": f32(rng, 2, 3, 4, 5), "z": f32(rng, 2, 3, 4, 5)})
    assert "softmax" in ops(g) and next(n for n in g.nodes if n.op == "softmax").inputs == ("x",)


def test_where_with_computed_condition_is_refused():
    node = helper.make_node("Where", ["c", "x", "x"], ["y"])
    m = build([node], {"c": ([None, 3], TensorProto.BOOL), "x": [None, 3]}, ["y"])
    with pytest.raises(UnsupportedOpError, match="constant condition"):
        from_onnx(m)


# --- products and data movement ----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_batched_matmul_with_broadcast(seed):
    rng = np.random.default_rng(seed)
    b, h, s, d = 2, int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 9))
    node = helper.make_node("MatMul", ["a", "k"], ["y"])
    g = check(build([node], {"a": [None, h, s, d], "k": [1, h, d, s]}, ["y"]), {"a": f32(rng, b, h, s, d), "k": f32(rng, 1, h, d, s)})
    assert ops(g) == ["matmul"]


def test_concat_split_slice_gather_transpose_squeeze():
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=2),
             helper.make_node("Concat", ["c", "a"], ["ca"], axis=-1),
             helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["sl"]),
             helper.make_node("Gather", ["x", "idx"], ["ga"], axis=2),
             helper.make_node("Gather", ["x", "one"], ["g1"], axis=1),
             helper.make_node("Transpose", ["x"], ["tr"]),
             helper.make_node("Unsqueeze", ["g1", "uax"], ["un"]),
             helper.make_node("Squeeze", ["un", "uax"], ["sq"]),
             helper.make_node("Squeeze", ["b"], ["sq2"])]
    inits = {"sizes": np.array([3, 1, 4], np.int64), "st": np.array([-1, 1], np.int64), "en": np.array([-100, 6], np.int64),
             "ax": np.array([2, 1], np.int64), "sp": np.array([-2, 2], np.int64), "idx": np.array([[0, -1], [2, 2]], np.int64),
             "one": np.array(-2, np.int64), "uax": np.array([-1, 1], np.int64)}
    outs = ["ca", "sl", "ga", "g1", "tr", "un", "sq", "b"]
    g = check(build(nodes, {"x": [2, 5, 8]}, outs + ["sq2"], inits), {"x": f32(rng, 2, 5, 8)})
    assert {"concat", "slice", "gather", "transpose", "unsqueeze", "squeeze"} <= set(ops(g))


def test_expand_that_broadcasts_an_activation():
    """GQA's repeat_kv: (B, kv, 1, S, d) expanded to (B, kv, rep, S, d)."""
    rng = np.random.default_rng(19)
    node = helper.make_node("Expand", ["x", "shp"], ["y"])
    g = check(build([node], {"x": [2, 2, 1, 3, 4]}, ["y"], {"shp": np.array([2, 2, 3, 3, 4], np.int64)}),
              {"x": f32(rng, 2, 2, 1, 3, 4)})
    assert ops(g) == ["add_const"] and g.nodes[0].params["c"].shape == (1, 1, 3, 1, 1)


def test_expand_noop_and_cast():
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Expand", ["x", "shp"], ["e"]), helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT)]
    g = check(build(nodes, {"x": [2, 3, 4]}, ["y"], {"shp": np.array([1, 4], np.int64)}), {"x": f32(rng, 2, 3, 4)})
    assert ops(g) == []


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_and_sum(keepdims):
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, -1], keepdims=keepdims),
             helper.make_node("ReduceSum", ["x", "ax"], ["s"], keepdims=keepdims)]
    g = check(build(nodes, {"x": [None, 3, 4, 5]}, ["m", "s"], {"ax": np.array([-2], np.int64)}), {"x": f32(rng, 2, 3, 4, 5)})
    assert ops(g) == ["reduce_mean", "reduce_sum"]


@pytest.mark.parametrize("group", [2, "depthwise"])
def test_grouped_and_depthwise_conv(group):
    rng = np.random.default_rng(13)
    c = 6
    grp = c if group == "depthwise" else group
    o = c if group == "depthwise" else 4
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=grp, pads=[1, 0, 1, 2], strides=[1, 2])
    g = check(build([node], {"x": [None, c, 7, 8]}, ["y"], {"w": f32(rng, o, c // grp, 3, 3), "b": f32(rng, o)}),
              {"x": f32(rng, 2, c, 7, 8)})
    assert ops(g) == ["conv2d"] and g.nodes[0].attrs["group"] == grp


def test_embedding_gather_of_ids():
    rng = np.random.default_rng(14)
    table = f32(rng, 50, 8)
    node = helper.make_node("Gather", ["table", "ids"], ["y"])
    m = build([node], {"ids": ([None, 6], TensorProto.INT64)}, ["y"], {"table": table})
    g = check(m, {"ids": rng.integers(0, 50, (3, 6)).astype(np.int64)})
    assert ops(g) == ["embedding"] and g.inputs[0].dtype == "int64"


@pytest.mark.parametrize("rank", [2, 3])
def test_batchnorm_on_2d_and_3d_tensors(rank):
    """BatchNorm1d after a ReLU: scale and shift broadcast over (N, C) or (N, C, L), not (-1, 1, 1)."""
    rng = np.random.default_rng(15)
    c = 5
    shape = [None, c] + ([7] if rank == 3 else [])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "s", "bb", "m", "v"], ["y"], epsilon=1e-3)]
    inits = {"s": f32(rng, c), "bb": f32(rng, c), "m": f32(rng, c), "v": rng.uniform(0.5, 2, c).astype(np.float32)}
    g = check(build(nodes, {"x": shape}, ["y"], inits), {"x": f32(rng, 4, *[d for d in shape[1:]])})
    assert ops(g) == ["relu", "mul_const", "add_const"]


# --- shape chains and bound inputs -------------------------------------------------------------
def test_shape_chain_with_dynamic_batch_folds_to_reshape():
    """x.view(x.size(0), -1) as exported: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    rng = np.random.default_rng(16)
    nodes = [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]), helper.make_node("Concat", ["n1", "m1"], ["tgt"], axis=0),
             helper.make_node("Reshape", ["x", "tgt"], ["y"])]
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "m1": np.array([-1], np.int64)}
    m = build(nodes, {"x": [None, 3, 4, 4]}, ["y"], inits)
    g = from_onnx(m)
    assert ops(g) == ["reshape"] and g.nodes[0].attrs["shape"] == (0, -1)
    for b in (1, 5):
        x = f32(rng, b, 3, 4, 4)
        np.testing.assert_allclose(run_plain(g, x)["y"], run_ort(m, {"x": x})[0], rtol=TOL, atol=TOL)


def test_bound_input_folds_into_masks():
    rng = np.random.default_rng(17)
    nodes = [helper.make_node("Sub", ["one", "am"], ["inv"]), helper.make_node("Mul", ["inv", "big"], ["add"]),
             helper.make_node("Add", ["x", "add"], ["xm"]), helper.make_node("Softmax", ["xm"], ["y"], axis=-1)]
    m = build(nodes, {"x": [2, 4], "am": [2, 4]}, ["y"], {"one": np.float32(1), "big": np.float32(-1e9)})
    am = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    g = check(m, {"x": f32(rng, 2, 4)}, constants={"am": am})
    assert ops(g) == ["softmax"] and [s.name for s in g.inputs] == ["x"]
    with pytest.raises(ModelError, match="not inputs"):
        from_onnx(m, constants={"nope": am})


def test_batch_dependent_constant_is_refused():
    nodes = [helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("ConstantOfShape", ["shp"], ["z"]),
             helper.make_node("Add", ["x", "z"], ["y"])]
    with pytest.raises(ModelError, match="static batch"):
        from_onnx(build(nodes, {"x": [None, 3]}, ["y"]))


# --- per-mode operator lists ----------------------------------------------------------------------
def test_each_mode_declares_its_ops_and_the_loader_lists_them():
    from veil.graph import load_model, mode_ops, onnx_ops_for
    from veil.mpc import MPC_OPS
    from veil.plain import PLAIN_OPS

    assert mode_ops("mpc") == MPC_OPS and mode_ops("plain") == PLAIN_OPS
    with pytest.raises(ModelError, match="runs no veil graph"):
        mode_ops("permute")
    # an ONNX operator nobody converts: the message lists the ONNX operators of the chosen mode
    m = build([helper.make_node("Mod", ["x", "x"], ["y"])], {"x": [None, 3]}, ["y"])
    with pytest.raises(UnsupportedOpError, match="by mpc mode") as e:
        load_model(m, mode="mpc")
    assert e.value.supported == sorted(onnx_ops_for(MPC_OPS))
    # a veil op outside a mode's set: refused at load naming the mode and listing that mode's ops
    m = build([helper.make_node("ArgMax", ["x"], ["y"], axis=1)], {"x": [None, 3]}, ["y"])
    small = frozenset({"relu"})
    with pytest.raises(UnsupportedOpError, match="'argmax' is not supported by tiny mode") as e:
        from_onnx(m, supported=small, where="tiny mode")
    assert e.value.supported == ["relu"]
    assert load_model(m, mode="plain").ops == {"argmax"}


def test_float64_run_keeps_token_ids_integer():
    rng = np.random.default_rng(18)
    node = helper.make_node("Gather", ["table", "ids"], ["y"])
    g = from_onnx(build([node], {"ids": ([None, 3], TensorProto.INT64)}, ["y"], {"table": f32(rng, 9, 4)}))
    ids = np.array([[1, 8, 0]], np.int64)
    np.testing.assert_array_equal(run_plain(g, ids, dtype=np.float64)["y"], g.nodes[0].params["table"][ids])


def test_range_constantofshape_and_comparisons_fold():
    """Position ids and masks built from constants (as exporters emit them) fold into one add_const."""
    rng = np.random.default_rng(21)
    nodes = [helper.make_node("Range", ["zero", "five", "one"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
             helper.make_node("ConstantOfShape", ["shp"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Less", ["posf", "three"], ["lt"]),
             helper.make_node("Where", ["lt", "ones", "posf"], ["c"]),
             helper.make_node("Add", ["x", "c"], ["y"])]
    inits = {"zero": np.array(0, np.int64), "five": np.array(5, np.int64), "one": np.array(1, np.int64),
             "shp": np.array([5], np.int64), "three": np.array(3.0, np.float32)}
    g = check(build(nodes, {"x": [None, 5]}, ["y"], inits), {"x": f32(rng, 2, 5)})
    assert ops(g) == ["add_const"]
    np.testing.assert_array_equal(g.nodes[0].params["c"], [1, 1, 1, 3, 4])


def test_cli_inspect_with_mode_lists_that_modes_ops(tmp_path):
    import subprocess
    import sys

    m = build([helper.make_node("Mod", ["x", "x"], ["y"])], {"x": [None, 3]}, ["y"])
    path = tmp_path / "mod.onnx"
    onnx.save(m, str(path))
    res = subprocess.run([sys.executable, "-m", "veil.cli.main", "inspect", str(path), "--mode", "mpc"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "not supported by mpc mode" in res.stderr and "LayerNormalization" in res.stderr
