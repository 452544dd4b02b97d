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


def test_power_of_two_activations_is_unsupported():
    m = make_model([helper.make_node("Pow", ["x", "x"], ["y"])], {"x": [None, 3]}, ["y"])
    with pytest.raises(UnsupportedOpError, match="Pow"):
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


# --- options: one OptionError, with the same words in every mode --------------------------------
def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "veil.cli.main", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (("mpc", "run", "A", "--n", "2", "--frac-bits", "40"), "frac_bits must be a whole number from 4 to 28"),
    (("mpc", "run", "A", "--n", "2", "--batch-size", "0"), "batch_size must be a whole number >= 1"),
    (("mpc", "plan", "A", "--batch-size", "-1"), "--batch-size must be a whole number >= 1"),
    (("offload", "run", "A", "--n", "2", "--batch-size", "0", "--hazmat-allow-simulation"),
     "--batch-size must be a whole number >= 1"),
    (("offload", "run", "A", "--n", "2", "--weight-privacy", "all", "--hazmat-allow-simulation"),
     "weight_privacy must be one of none, shares"),
    (("demo", "--plain", "--n", "5000"), "held-out set has 2000 images"),
    (("offload", "run", "A", "--inputs", "no-such-file.npy", "--hazmat-allow-simulation"), "cannot read inputs from"),
])
def test_bad_options_are_one_clear_line(args, words):
    r = _cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert words in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_batch_size_is_checked_not_guessed(bad):
    """0 used to mean 'all at once' silently and -1 failed inside numpy."""
    import veil.mpc
    import veil.offload
    from veil.assets import load_slice, model_path
    from veil.errors import OptionError

    x, _ = load_slice(2)
    with pytest.raises(OptionError, match="batch_size must be a whole number >= 1"):
        veil.mpc.run(model_path("A"), x, batch_size=bad)
    with pytest.raises(OptionError, match="batch_size must be a whole number >= 1"):
        veil.offload.run("A", x, batch_size=bad, hazmat_allow_simulation=True)


def test_offload_boundaries_raise_veil_errors():
    import warnings

    from veil.assets import model_path
    from veil.errors import OptionError, VeilError
    from veil.offload import OffloadEnclave, SimulatedEnclaveRuntime

    with pytest.raises(OptionError, match="runtime must be an EnclaveRuntime"):
        OffloadEnclave(model_path("A"), object())  # was a TypeError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = SimulatedEnclaveRuntime(hazmat_allow_simulation=True)
    with pytest.raises(OptionError, match="freivalds_reps must be a whole number >= 1"):
        OffloadEnclave(model_path("A"), rt, freivalds_reps=0)  # was a ValueError
    with pytest.raises(OptionError, match="weight_privacy must be one of none, shares"):
        OffloadEnclave(model_path("A"), rt, weight_privacy="both")
    enc = OffloadEnclave(model_path("A"), rt)
    with pytest.raises(OptionError, match="samples must be a whole number >= 0"):
        enc.precompute(-1)  # was a ValueError
    assert issubclass(OptionError, VeilError) and issubclass(OptionError, ValueError)  # old except clauses still work


def test_shipped_images_are_checked():
    from veil.assets import HELDOUT, load_slice

    for bad in (0, -3, HELDOUT + 1):
        with pytest.raises(InputError, match="held-out set has 2000 images"):
            load_slice(bad)
