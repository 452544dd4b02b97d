"""Networks A-D and a BERT-style encoder layer in offload mode against the plain executor.

Tolerances (stated, and derived in docs/offload.md):
* per offloaded layer, rigorous: |offloaded - exact| <= 2^-(fw+1) ||x_row||_1 + 2^-(fx+1) ||W_row||_1
  + K 2^-(fw+fx+2) for every output (the enclave reports fx and this bound; float64 slack 1e-9);
* end to end: max |offload - plain float64| <= 2e-3 * max(1, max |plain|) (the per-layer errors
  propagated through the network), and the same predicted class on the shipped MNIST slice.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from veil.offload import OffloadEnclave, SimulatedEnclaveRuntime, run_offload_local
from veil.offload.examples import encoder_graph, mnist_graph
from veil.plain import run_plain

REL_TOL = 2e-3


@pytest.fixture(scope="module")
def runtime() -> SimulatedEnclaveRuntime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SimulatedEnclaveRuntime(hazmat_allow_simulation=True)


def mnist_inputs(n: int) -> np.ndarray:
    try:
        from veil.assets import load_slice

        return load_slice(n)[0]
    except (OSError, ImportError):
        return np.random.default_rng(5).random((n, 1, 28, 28)).astype(np.float32)


def plain_layer(node, x: np.ndarray) -> np.ndarray:
    """The exact (float64) linear/conv output for the enclave's own input, via the plain executor."""
    from veil.graph import Graph, TensorSpec

    node2 = type(node)(node.name, node.op, node.inputs, node.output, dict(node.params), dict(node.attrs))
    node2.params.pop("b", None)
    g = Graph([node2], [TensorSpec(node.inputs[0], (None,) * x.ndim, "float64")], [node.output])
    y = run_plain(g, {node.inputs[0]: x})[node.output]
    b = node.params.get("b")
    if b is not None:
        y = y + (b.astype(np.float64) if node.op == "linear" else b.astype(np.float64).reshape(1, -1, 1, 1))
    return y


def check_layer_bounds(enc: OffloadEnclave, env: dict[str, np.ndarray], n: int) -> int:
    checked = 0
    for lay in enc.plan.layers:
        x, got = env[lay.node.inputs[0]], env[lay.node.output]
        ref = plain_layer(lay.node, x)
        err = np.abs(got - ref).reshape(n, -1).max(axis=1)
        bound = enc.last_trace["bound"][lay.node.name]
        assert (err <= bound * (1 + 1e-9) + 1e-9).all(), (lay.node.name, err, bound)
        assert (enc.last_trace["fx"][lay.node.name] >= 4).all()
        checked += 1
    return checked


@pytest.mark.parametrize("name", ["A", "B", "C", "D"])
@pytest.mark.parametrize("weight_privacy", ["none", "shares"])
def test_mnist_network_matches_plain(name, weight_privacy, runtime) -> None:
    graph, _ = mnist_graph(name)
    enc = OffloadEnclave(graph, runtime, weight_privacy=weight_privacy)
    x1, x8 = mnist_inputs(1), mnist_inputs(8)
    enc.precompute(9)
    run = run_offload_local(enc, [x1, x8], backend="numpy", keep=True)
    assert run.material_left == 0 and enc.material.consumed == 9
    for x, env in zip([x1, x8], run.outputs, strict=True):
        ref = run_plain(graph, x, dtype=np.float64)
        for o, r in ref.items():
            assert np.abs(env[o] - r).max() <= REL_TOL * max(1.0, np.abs(r).max())
            assert (env[o].argmax(-1) == r.argmax(-1)).all()
    assert check_layer_bounds(enc, run.outputs[1], 8) == len(enc.plan.layers)
    # the enclave's Freivalds checks ran: one per sample, layer and accelerator
    assert run.counters["freivalds_checks"] == 9 * len(enc.plan.layers) * len(enc.accelerators)


def test_plain_outputs_are_returned_in_model_dtype(runtime) -> None:
    graph, _ = mnist_graph("D")
    enc = OffloadEnclave(graph, runtime)
    enc.precompute(2)
    out = run_offload_local(enc, [mnist_inputs(2)], backend="numpy").outputs[0]
    ref = run_plain(graph, mnist_inputs(2))
    assert out.keys() == ref.keys() and all(out[k].dtype == ref[k].dtype for k in ref)


@pytest.fixture(scope="module")
def encoder():
    return encoder_graph(hidden=64, heads=4, ff=128, seq=16, seed=3)


@pytest.mark.parametrize("weight_privacy", ["none", "shares"])
def test_encoder_layer_matches_plain_and_torch(encoder, weight_privacy, runtime) -> None:
    import torch

    graph, module = encoder
    assert {"matmul", "softmax", "layernorm", "gelu", "transpose"} <= graph.ops
    enc = OffloadEnclave(graph, runtime, weight_privacy=weight_privacy)
    # Q, K, V share a round; then o, f1, f2: 4 rounds for 6 linear layers
    assert len(enc.plan.layers) == 6 and enc.plan.rounds == 4
    x = np.random.default_rng(11).standard_normal((3, 16, 64)).astype(np.float32)
    enc.precompute(3)
    run = run_offload_local(enc, [x], backend="numpy", keep=True)
    env = run.outputs[0]
    out = graph.outputs[0]
    ref = run_plain(graph, x, dtype=np.float64)[out]
    assert np.abs(env[out] - ref).max() <= REL_TOL * max(1.0, np.abs(ref).max())
    with torch.no_grad():
        tref = module(torch.from_numpy(x)).numpy()
    assert np.abs(env[out] - tref).max() <= REL_TOL * max(1.0, np.abs(tref).max())
    check_layer_bounds(enc, env, 3)
    assert run.stats["enclave"].rounds >= 4


def test_torch_cpu_accelerator_gives_identical_outputs(runtime) -> None:
    graph, _ = mnist_graph("B")
    x = mnist_inputs(4)
    results = []
    for backend in ("numpy", "torch-cpu"):
        enc = OffloadEnclave(graph, runtime)
        enc.precompute(4)
        run = run_offload_local(enc, [x], backend=backend)
        results.append(run.outputs[0])
        assert run.backends == {"accelerator": backend}
    # masks differ between the runs but unblinding is exact, so outputs are bit-identical
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k])

