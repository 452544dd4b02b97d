"""Offload training on the two model families of the issue, tiny versions: network C on the shipped
MNIST slice and a DeepCrossing-style click model on the synthetic click data; each compared with the
same training in float64 inside the enclave (enclave-only), and exported to ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from offload_train_helpers import runtime
from veil.assets import load_slice
from veil.graph import load_model
from veil.offload.examples import mnist_module
from veil.offload.training import PlainMatmul, TrainConfig, Trainer, synthetic_clicks, train_offload_local
from veil.offload.training.models import click_inputs, deep_crossing, torch_to_graph
from veil.plain import run_plain


def _pair(graph, feeds, y, cfg, steps):
    sec = Trainer(graph, feeds, y, cfg)
    run = train_offload_local(sec, runtime(), steps=steps)
    ref = Trainer(graph, feeds, y, cfg)
    ref.train(PlainMatmul(), stop_after=steps)
    return sec, ref, run


def test_network_c_few_steps_on_the_shipped_slice_follow_the_enclave_only_run():
    torch.manual_seed(0)
    graph = torch_to_graph(mnist_module("C"), torch.zeros(1, 1, 28, 28))
    x, y = load_slice(48)
    cfg = TrainConfig(optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, batch_size=16, seed=0)
    sec, ref, run = _pair(graph, {"x": x}, y, cfg, 3)
    assert len(sec.history) == 3 and sec.history[-1] < sec.history[0]
    np.testing.assert_allclose(sec.history, ref.history, atol=2e-3)
    for k, v in ref.net.params.items():
        assert np.abs(sec.net.params[k] - v).max() <= 1e-2 * np.abs(v).max(), k
    # 3 steps x (4 layers x (forward + dX + dW) - first dX), each as two secure products at precision double
    assert run.counters["split_products"] == 3 * (4 * 3 - 1) and run.counters["products"] == 2 * 3 * (4 * 3 - 1)


def test_deep_crossing_on_synthetic_clicks_trains_and_exports_with_several_inputs():
    data = synthetic_clicks(96, seed=3)
    vocab = data.vocab
    mod = deep_crossing(vocab, data.dense.shape[1], d=8, hidden=16, units=2, seed=0)
    ex = tuple(torch.zeros(1, v) for v in vocab) + (torch.zeros(1, data.dense.shape[1]),)
    graph = torch_to_graph(mod, ex, click_inputs(vocab), "p")
    assert {"sigmoid", "add", "linear", "relu"} <= graph.ops
    cfg = TrainConfig(optimizer={"name": "adam", "lr": 0.01}, batch_size=32, seed=0, loss="bce")
    feeds = data.feeds()
    sec, ref, _ = _pair(graph, feeds, data.y, cfg, 3)
    np.testing.assert_allclose(sec.history, ref.history, atol=2e-3)
    # the exported model: veil's loader + plain executor and onnxruntime agree with the trainer's own forward
    onnx_bytes = sec.onnx_bytes()
    g2 = load_model(onnx_bytes)
    got = run_plain(g2, feeds)["p"]
    np.testing.assert_allclose(got, sec.predict(feeds), rtol=1e-4, atol=1e-6)
    sess = ort.InferenceSession(onnx_bytes)
    np.testing.assert_allclose(sess.run(None, feeds)[0], got, rtol=1e-4, atol=1e-6)


def test_synthetic_click_data_is_seeded_and_skewed():
    a, b, c = synthetic_clicks(2000, seed=1), synthetic_clicks(2000, seed=1), synthetic_clicks(2000, seed=2)
    assert np.array_equal(a.cats, b.cats) and np.array_equal(a.y, b.y) and not np.array_equal(a.y, c.y)
    assert 0.15 < a.y.mean() < 0.45
    top = np.bincount(a.cats[:, 0], minlength=a.vocab[0])
    assert top[0] > 3 * top[-1]  # Zipf-like category frequencies
