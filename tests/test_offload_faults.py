"""Bad input and faults: lying, dying, silent or malformed accelerators; exhausted or tampered material;
unsupported ops; missing simulation opt-in; values too large for the field. Clear errors, no hang."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from veil.errors import (
    InputShapeError,
    IntegrityError,
    MaterialExhaustedError,
    SimulationNotAllowedError,
    UnsupportedOpError,
)
from veil.net.local import run_local
from veil.offload import (
    AcceleratorProtocolError,
    AcceleratorUnavailableError,
    FieldRangeError,
    OffloadEnclave,
    SealError,
    SimulatedEnclaveRuntime,
    SimulatedEnclaveWarning,
    compile_offload,
    run_offload_local,
)
from veil.offload.accelerator import Accelerator
from veil.offload.examples import mnist_graph
from veil.offload.field import P


@pytest.fixture(scope="module")
def runtime() -> SimulatedEnclaveRuntime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SimulatedEnclaveRuntime(hazmat_allow_simulation=True)


@pytest.fixture(scope="module")
def graph_b():
    return mnist_graph("B")[0]


def x_batch(n: int = 2) -> np.ndarray:
    return np.random.default_rng(9).random((n, 1, 28, 28)).astype(np.float32)


class Liar(Accelerator):
    """Adds 1 to one output element of one layer (the smallest possible lie)."""

    def __init__(self, layer: int, where: int = 0):
        super().__init__("numpy")
        self.layer, self.where = layer, where

    def compute(self, layer: int, z: np.ndarray) -> np.ndarray:
        y = super().compute(layer, z)
        if layer == self.layer:
            flat = y.reshape(-1)
            flat[self.where % flat.size] = (int(flat[self.where % flat.size]) + 1) % P
        return y


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_lying_accelerator_is_caught(graph_b, runtime, layer) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(2)
    with pytest.raises(IntegrityError, match="Freivalds"):
        run_offload_local(enc, [x_batch()], accelerator_factory=lambda name: Liar(layer, where=17 * layer + 3))


def test_every_single_element_lie_is_caught_over_many_positions(graph_b, runtime) -> None:
    """Freivalds' miss probability is 1/p per wrong row; 12 independent lies at random places: all caught."""
    rng = np.random.default_rng(0)
    for _ in range(12):
        enc = OffloadEnclave(graph_b, runtime)
        enc.precompute(1)
        layer, where = int(rng.integers(0, 4)), int(rng.integers(0, 10**6))
        with pytest.raises(IntegrityError):
            run_offload_local(enc, [x_batch(1)], accelerator_factory=lambda name, lw=(layer, where): Liar(*lw))


class Replayer(Accelerator):
    """Answers every query of a layer with its first (correct) answer: a replay of an old result."""

    def __init__(self) -> None:
        super().__init__("numpy")
        self.cache: dict[int, np.ndarray] = {}

    def compute(self, layer: int, z: np.ndarray) -> np.ndarray:
        return self.cache.setdefault(layer, super().compute(layer, z))


class WrongWeights(Accelerator):
    """Computes honestly with one weight changed by one quantisation step."""

    def _setup(self, msg):
        msg["layers"][1]["w"] = msg["layers"][1]["w"].copy()
        msg["layers"][1]["w"].reshape(-1)[5] += 1
        return super()._setup(msg)


def test_replayed_results_are_caught(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(2)
    with pytest.raises(IntegrityError, match="Freivalds"):
        run_offload_local(enc, [x_batch(1), x_batch(1)], accelerator_factory=lambda name: Replayer())
    assert enc.counters["queries"] == 1  # the first, honest query went through


def test_subtly_wrong_weights_are_caught(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(1)
    with pytest.raises(IntegrityError, match="/3/Conv"):
        run_offload_local(enc, [x_batch(1)], accelerator_factory=lambda name: WrongWeights("numpy"))


def test_more_freivalds_repetitions(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime, freivalds_reps=3)
    assert enc.soundness_error == pytest.approx(float(P) ** -3)
    enc.precompute(2)
    run = run_offload_local(enc, [x_batch(2)])
    assert run.counters["freivalds_checks"] == 2 * 3 * len(enc.plan.layers)
    enc.precompute(1)
    with pytest.raises(IntegrityError):
        run_offload_local(enc, [x_batch(1)], accelerator_factory=lambda name: Liar(3))


def test_lying_share_holder_is_named(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime, weight_privacy="shares")
    enc.precompute(2)

    def factory(name: str) -> Accelerator:
        return Liar(2) if name == "accelerator1" else Accelerator("numpy")

    with pytest.raises(IntegrityError, match="accelerator1"):
        run_offload_local(enc, [x_batch()], accelerator_factory=factory)


class Silent(Accelerator):
    def compute(self, layer: int, z: np.ndarray) -> np.ndarray:
        if layer == 1:
            time.sleep(2)
        return super().compute(layer, z)


class WrongShape(Accelerator):
    def compute(self, layer: int, z: np.ndarray) -> np.ndarray:
        return super().compute(layer, z)[..., :1]


def test_dead_accelerator_is_a_clear_error_fast(graph_b, runtime) -> None:
    """The accelerator answers setup and the first round, then its process goes away."""
    enc = OffloadEnclave(graph_b, runtime, timeout=20)
    enc.precompute(2)

    def dying(ch) -> str:
        acc = Accelerator("numpy")
        for _ in range(2):
            ch.send("enclave", acc.handle(ch.recv("enclave")))
        ch.close()
        return "died"

    def enclave(ch):
        enc.connect(ch)
        return enc.infer(ch, x_batch())

    t0 = time.monotonic()
    with pytest.raises(AcceleratorUnavailableError, match="accelerator 'accelerator' .* round 1.*closed"):
        run_local({"enclave": enclave, "accelerator": dying}, timeout=20)
    assert time.monotonic() - t0 < 10  # a disconnect is noticed at once, not after the 20 s timeout


def test_silent_accelerator_times_out(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime, timeout=0.5)
    enc.precompute(2)
    t0 = time.monotonic()
    with pytest.raises(AcceleratorUnavailableError, match="within 0.5 s"):
        run_offload_local(enc, [x_batch()], accelerator_factory=lambda name: Silent("numpy"), timeout=10)
    assert time.monotonic() - t0 < 8


def test_malformed_result_is_rejected(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(2)
    with pytest.raises(AcceleratorProtocolError, match="expected uint32"):
        run_offload_local(enc, [x_batch()], accelerator_factory=lambda name: WrongShape("numpy"))


def test_material_runs_out_with_a_clear_error_and_is_never_reused(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(5)
    assert enc.material.supplied == 5 and enc.material.available == 5
    with pytest.raises(MaterialExhaustedError, match="needs 3 .* only 2 are left"):
        run_offload_local(enc, [x_batch(3), x_batch(3)])
    assert enc.material.consumed == 3 and enc.material.available == 2
    # slots taken by a failed query are gone too
    with pytest.raises(IntegrityError):
        run_offload_local(enc, [x_batch(2)], accelerator_factory=lambda name: Liar(0))
    assert enc.material.available == 0
    with pytest.raises(MaterialExhaustedError):
        run_offload_local(enc, [x_batch(1)])
    enc.precompute(1)  # the offline phase can always top up
    assert run_offload_local(enc, [x_batch(1)]).material_left == 0


def test_tampered_or_swapped_sealed_material_is_refused(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(2)
    blobs = enc.material._blobs
    blob = bytearray(blobs[(0, 0)])
    blob[40] ^= 1
    blobs[(0, 0)] = bytes(blob)
    with pytest.raises(SealError, match="failed authentication"):
        run_offload_local(enc, [x_batch(1)])
    enc2 = OffloadEnclave(graph_b, runtime)
    enc2.precompute(2)
    b = enc2.material._blobs
    b[(0, 0)], b[(0, 1)] = b[(0, 1)], b[(0, 0)]  # replaying another slot's material
    with pytest.raises(SealError):
        run_offload_local(enc2, [x_batch(1)])


def test_unsupported_op_fails_at_compile_time(graph_b) -> None:
    g = mnist_graph("D")[0]
    g.nodes[1].op = "no_such_op"  # an op no executor knows (bypassing the IR's own check)
    with pytest.raises(UnsupportedOpError, match="offload mode"):
        compile_offload(g)


def test_onnx_model_with_unsupported_op_is_refused_at_load(runtime) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Sin", ["x"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]))
    with pytest.raises(UnsupportedOpError, match="Sin"):
        OffloadEnclave(onnx.ModelProto.FromString(model.SerializeToString()), runtime)


def test_simulation_needs_explicit_opt_in_and_warns() -> None:
    with pytest.raises(SimulationNotAllowedError, match="hazmat_allow_simulation"):
        SimulatedEnclaveRuntime()
    with pytest.warns(SimulatedEnclaveWarning, match="SIMULATED"):
        SimulatedEnclaveRuntime(hazmat_allow_simulation=True)


def test_wrong_input_shape_is_the_plain_executors_error(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(1)
    with pytest.raises(InputShapeError, match="expects"):
        run_offload_local(enc, [np.zeros((1, 1, 27, 28), np.float32)])
    assert enc.material.available == 1  # nothing consumed by a rejected input


def test_values_too_large_for_the_field_are_refused(graph_b, runtime) -> None:
    enc = OffloadEnclave(graph_b, runtime)
    enc.precompute(1)
    with pytest.raises(FieldRangeError, match="too large"):
        run_offload_local(enc, [np.full((1, 1, 28, 28), 1e9, np.float32)])
