"""Bad models and bad inputs fail early with messages that say what was wrong and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnx_builders import make_model
from veil.errors import InputDtypeError, InputError, InputShapeError, ModelFormatError, UnsupportedOpError
from veil.graph import from_onnx, load_model
from veil.plain import run_plain


def test_unsupported_op_names_node_op_and_supported_list():
    m = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Cos", ["r"], ["y"], name="the_cos")],
                   {"x": [None, 3]}, ["y"])
    with pytest.raises(UnsupportedOpError) as ei:
        from_onnx(m)
    msg = str(ei.value)
    assert "the_cos" in msg and "'Cos'" in msg and "Gemm" in msg and "Conv" in msg
    assert ei.value.op == "Cos" and ei.value.node == "the_cos"


def test_unsupported_attribute_is_reported():
    w = np.ones((2, 1, 3, 3), np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], dilations=[2, 2], name="dil")],
                   {"x": [None, 1, 8, 8]}, ["y"], {"W": w})
    with pytest.raises(UnsupportedOpError, match="dilations"):
        from_onnx(m)


def test_division_by_activation_is_unsupported():
    m = make_model([helper.make_node("Div", ["x", "x"], ["y"])], {"x": [None, 3]}, ["y"])
    with pytest.raises(UnsupportedOpError, match="Div"):
        from_onnx(m)


def test_not_an_onnx_file(tmp_path):
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelFormatError, match="ONNX"):
        load_model(p)
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def graph():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [None, 3, 4]}, ["y"])
    return from_onnx(m)


def test_shape_mismatch_names_both_shapes(graph):
    with pytest.raises(InputShapeError) as ei:
        run_plain(graph, np.zeros((2, 4, 3), np.float32))
    assert "(2, 4, 3)" in str(ei.value) and "(?, 3, 4)" in str(ei.value)
    with pytest.raises(InputShapeError):
        run_plain(graph, np.zeros((3, 4), np.float32))


def test_dtype_mismatch_names_both_dtypes(graph):
    with pytest.raises(InputDtypeError, match="int32.*float32"):
        run_plain(graph, np.zeros((1, 3, 4), np.int32))
    # another float precision is accepted and cast
    assert run_plain(graph, np.ones((1, 3, 4), np.float64))["y"].dtype == np.float32


def test_wrong_input_names_and_nan(graph):
    with pytest.raises(InputError, match="missing"):
        run_plain(graph, {"z": np.zeros((1, 3, 4), np.float32)})
    with pytest.raises(InputError, match="NaN"):
        run_plain(graph, np.full((1, 3, 4), np.nan, np.float32))
