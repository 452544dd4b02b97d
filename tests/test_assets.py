"""Checks on the shipped MNIST assets: the four SecureNN networks (A-D) as ONNX, their manifest and the slice.

References: the manifest's sha256/params against the files, onnxruntime for accuracy, and the shared MNIST
test set (../shared/data/mnist_test.npz beside the repository) for the slice labels and the recorded
held-out-2k accuracy (images 8000..9999; the models were trained on images 0..7999).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

ASSETS = Path(__file__).resolve().parents[1] / "src" / "veil" / "assets"
MODELS = ASSETS / "models"
SLICE = ASSETS / "mnist_slice.npz"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist_test.npz"

NAMES = ("A", "B", "C", "D")
ALLOWED_OPS = {
    "Gemm",
    "MatMul",
    "Conv",
    "Relu",
    "MaxPool",
    "Flatten",
    "Reshape",
    "Add",
    "Constant",
    "Identity",
}
# Floors on the recorded held-out-2k accuracy and on the 256-image slice (stated targets: >95% A, >97% B/C/D).
HELDOUT_FLOOR = {"A": 0.95, "B": 0.97, "C": 0.97, "D": 0.97}
SLICE_FLOOR = {"A": 0.93, "B": 0.95, "C": 0.95, "D": 0.95}
EXPECTED_PARAMS = {
    "A": 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10,
    "B": 16 * 25 + 16 + 16 * 16 * 25 + 16 + 256 * 100 + 100 + 100 * 10 + 10,
    "C": 20 * 25 + 20 + 50 * 20 * 25 + 50 + 800 * 500 + 500 + 500 * 10 + 10,
    "D": 5 * 25 + 5 + 980 * 100 + 100 + 100 * 10 + 10,
}


def _to_input(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((MODELS / "manifest.json").read_text())


@pytest.fixture(scope="module")
def mnist_slice() -> dict[str, np.ndarray]:
    with np.load(SLICE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def sessions() -> dict[str, ort.InferenceSession]:
    return {
        n: ort.InferenceSession(str(MODELS / f"{n}.onnx"), providers=["CPUExecutionProvider"]) for n in NAMES
    }


@pytest.fixture(scope="module")
def shared_mnist() -> tuple[np.ndarray, np.ndarray]:
    if not SHARED_DATA.is_file():
        pytest.skip(f"shared MNIST data not found at {SHARED_DATA} (CI keeps ../shared beside the clone)")
    with np.load(SHARED_DATA) as data:
        return data["x_test"], data["y_test"]


def test_manifest_lists_all_models_with_matching_sha256(manifest):
    assert sorted(manifest["models"]) == list(NAMES)
    for name in NAMES:
        entry = manifest["models"][name]
        path = MODELS / entry["file"]
        assert path.name == f"{name}.onnx"
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name}: sha256 mismatch"
        assert len(data) == entry["bytes"]
        assert entry["command"].startswith("python scripts/train_mnist.py")
        assert isinstance(entry["seed"], int)


def test_total_asset_size_under_3mb():
    # the MNIST assets; stories260K.bin (1 MB language model for the permute/mpc tests) is counted apart
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file() and p.name != "stories260K.bin")
    assert total < 3 * 1024 * 1024, f"assets take {total} bytes"


@pytest.mark.parametrize("name", NAMES)
def test_onnx_graph_is_self_contained_and_uses_allowed_ops(name, manifest):
    proto = onnx.load(str(MODELS / f"{name}.onnx"), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert {op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")} == {17}
    ops = {node.op_type for node in proto.graph.node}
    assert ops <= ALLOWED_OPS, f"{name}: unexpected ops {sorted(ops - ALLOWED_OPS)}"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    n_params = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer)
    assert n_params == EXPECTED_PARAMS[name] == manifest["models"][name]["params"]


@pytest.mark.parametrize("name", NAMES)
def test_model_accuracy_on_slice_and_recorded_accuracy(name, manifest, mnist_slice, sessions):
    x = _to_input(mnist_slice["x"])
    y = mnist_slice["y"].astype(np.int64)
    logits = sessions[name].run(["logits"], {"x": x})[0]
    assert logits.shape == (len(x), 10) and logits.dtype == np.float32
    acc = float((logits.argmax(axis=1) == y).mean())
    recorded = manifest["models"][name]["heldout_2k_accuracy"]
    assert acc >= SLICE_FLOOR[name], f"{name}: slice accuracy {acc:.4f} below {SLICE_FLOOR[name]}"
    assert HELDOUT_FLOOR[name] <= recorded <= 1.0
    # The slice is 256 of the 2,000 held-out images: its accuracy should sit within 4 binomial standard
    # deviations (plus one image) of the recorded held-out-2k accuracy.
    sd = math.sqrt(max(recorded * (1 - recorded), 1e-4) / len(y))
    assert abs(acc - recorded) <= 4 * sd + 1 / len(y), f"{name}: slice {acc:.4f} vs recorded {recorded:.4f}"


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_batch_gives_same_logits_as_single_images(name, mnist_slice, sessions):
    x = _to_input(mnist_slice["x"][:64])
    batched = sessions[name].run(["logits"], {"x": x})[0]
    singles = np.concatenate([sessions[name].run(["logits"], {"x": x[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(batched[:8], singles, rtol=1e-5, atol=1e-5)  # float32 summation-order slack


def test_slice_layout(mnist_slice):
    assert mnist_slice["x"].shape == (256, 28, 28) and mnist_slice["x"].dtype == np.uint8
    assert mnist_slice["y"].shape == (256,) and mnist_slice["y"].dtype == np.uint8
    np.testing.assert_array_equal(mnist_slice["index"], np.arange(8000, 8256))
    assert set(np.unique(mnist_slice["y"])) == set(range(10))


def test_slice_matches_shared_data(mnist_slice, shared_mnist):
    x_all, y_all = shared_mnist
    idx = mnist_slice["index"]
    np.testing.assert_array_equal(mnist_slice["x"], x_all[idx])
    np.testing.assert_array_equal(mnist_slice["y"], y_all[idx])


def test_recorded_heldout_accuracy_reproduces(manifest, sessions, shared_mnist):
    x_all, y_all = shared_mnist
    x, y = _to_input(x_all[8000:10000]), y_all[8000:10000].astype(np.int64)
    for name in NAMES:
        acc = float((sessions[name].run(["logits"], {"x": x})[0].argmax(axis=1) == y).mean())
        # Same images, same onnxruntime: identical up to the 4-decimal rounding in the manifest.
        assert abs(acc - manifest["models"][name]["heldout_2k_accuracy"]) <= 5e-5, name
