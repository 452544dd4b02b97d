"""Offload training, enclave side: every layer's backward against torch autograd, losses, optimizers,
and the secure products (Beaver masks over three accelerators) against float products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_train_helpers import runtime, small_cnn, small_residual, torch_mirror
from veil.errors import UnsupportedOpError
from veil.graph import Graph, Node, TensorSpec
from veil.offload.field import HALF
from veil.offload.training import SGD, Adam, PlainMatmul, TrainGraph, make_optimizer
from veil.offload.training.layers import binary_cross_entropy, softmax_cross_entropy
from veil.offload.training.local import train_offload_local  # noqa: F401  (public surface)
from veil.offload.training.protocol import choose_scales


def _grads_vs_torch(graph: Graph, feeds: dict[str, np.ndarray], labels: np.ndarray, loss: str) -> None:
    net = TrainGraph(graph)
    eng = PlainMatmul()
    out, cache = net.forward(feeds, eng)
    fn = softmax_cross_entropy if loss == "ce" else binary_cross_entropy
    val, dout = fn(out, labels)
    grads = net.backward(dout, cache, eng)

    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in net.params.items()}
    tout = torch_mirror(graph, tp, feeds)
    if loss == "ce":
        tl = torch.nn.functional.cross_entropy(tout, torch.as_tensor(labels))
    else:
        tl = torch.nn.functional.binary_cross_entropy(tout.reshape(-1), torch.as_tensor(labels, dtype=torch.float64))
    tl.backward()
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert abs(val - float(tl.detach())) < 1e-10
    assert set(grads) == set(tp)
    for k in tp:
        np.testing.assert_allclose(grads[k], tp[k].grad.numpy(), rtol=1e-8, atol=1e-11, err_msg=k)


@pytest.mark.parametrize("pool,act,head", [("max", "relu", None), ("avg", "sigmoid", None), ("avg_incl", "tanh", None),
                                           ("max", "relu", "softmax")])
def test_conv_pool_activation_gradients_match_torch_autograd(pool, act, head):
    """conv2d (stride 1 and 2, padding), max/avg pooling (with and without counting the padding), ReLU,
    sigmoid, tanh, flatten, linear, softmax node, cross-entropy loss."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 1, 8, 8))
    y = rng.integers(0, 5, 5)
    _grads_vs_torch(small_cnn(1, pool, act, head), {"x": x}, y, "ce")


def test_residual_embedding_sigmoid_bce_gradients_match_torch_autograd():
    """Embedding (linear on one-hot), add of two branches (residual), reshape, global average pooling,
    constant scale/shift, tanh, sigmoid output with binary cross-entropy."""
    rng = np.random.default_rng(4)
    cats = rng.integers(0, 6, 7)
    oh = np.eye(6)[cats]
    dense = rng.normal(size=(7, 3))
    _grads_vs_torch(small_residual(2), {"cat0": oh, "dense": dense}, rng.integers(0, 2, 7), "bce")


def test_unsupported_op_is_refused_with_the_list():
    g = Graph([Node("n", "layernorm", ("x",), "y", {"gamma": np.ones(3, np.float32), "beta": np.zeros(3, np.float32)},
                    {"eps": 1e-5})], [TensorSpec("x", (None, 3))], ["y"])
    with pytest.raises(UnsupportedOpError, match="layernorm"):
        TrainGraph(g)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizers_follow_torch_update_rules(name):
    rng = np.random.default_rng(5)
    p0 = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=5)}
    grads = [{k: rng.normal(size=v.shape) for k, v in p0.items()} for _ in range(4)]
    cfg = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3} if name == "sgd" else \
        {"name": "adam", "lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-7}
    opt = make_optimizer(cfg)
    assert isinstance(opt, SGD if name == "sgd" else Adam)
    ours = {k: v.copy() for k, v in p0.items()}
    tp = [torch.tensor(v, requires_grad=True) for v in p0.values()]
    topt = (torch.optim.SGD(tp, lr=0.1, momentum=0.9, weight_decay=1e-3) if name == "sgd" else
            torch.optim.Adam(tp, lr=0.01, betas=(0.8, 0.99), eps=1e-7))
    for g in grads:
        opt.step(ours, g)
        for t, k in zip(tp, p0, strict=True):
            t.grad = torch.tensor(g[k])
        topt.step()
    for t, k in zip(tp, p0, strict=True):
        np.testing.assert_allclose(ours[k], t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_scales_keep_every_product_inside_the_field():
    rng = np.random.default_rng(6)
    for scale_u, scale_v in [(1.0, 1.0), (1e-4, 30.0), (500.0, 1e-3)]:
        u, v = rng.normal(size=(9, 300)) * scale_u, rng.normal(size=(300, 7)) * scale_v
        fu, fv = choose_scales(u, v)
        uq, vq = np.rint(u * 2.0**fu), np.rint(v * 2.0**fv)
        assert np.abs(uq @ vq).max() < HALF
        # and not wastefully small: within 2 bits of the Cauchy-Schwarz limit
        assert np.sqrt((uq**2).sum(1).max() * (vq**2).sum(0).max()) > HALF / 8


def test_secure_products_match_float_and_report_the_error():
    """Training gradients through the protocol equal the float64 ones up to the fixed-point error."""
    rng = np.random.default_rng(7)
    graph = small_cnn(2)
    x, y = rng.normal(size=(6, 1, 8, 8)), rng.integers(0, 5, 6)
    plain = TrainGraph(graph)
    out_p, cache_p = plain.forward({"x": x}, PlainMatmul())
    g_p = plain.backward(softmax_cross_entropy(out_p, y)[1], cache_p, PlainMatmul())

    from veil.net.local import run_local
    from veil.offload.training import TRAIN_ACCELERATORS, SecureMatmul, serve_train_accelerator

    rt = runtime()
    got: dict = {}

    def enclave(ch):
        eng = SecureMatmul(ch, rt)
        try:
            net = TrainGraph(graph)
            out, cache = net.forward({"x": x}, eng)
            got["out"] = out
            got["grads"] = net.backward(softmax_cross_entropy(out, y)[1], cache, eng)
            got["counters"] = dict(eng.counters)
        finally:
            eng.close()

    parties = {"enclave": enclave, **{a: (lambda ch: serve_train_accelerator(ch, backend="numpy")) for a in TRAIN_ACCELERATORS}}
    run_local(parties)
    rel = np.abs(got["out"] - out_p).max() / np.abs(out_p).max()
    assert rel < 1e-3
    for k, v in g_p.items():
        assert np.abs(got["grads"][k] - v).max() <= 2e-3 * np.abs(v).max() + 1e-9, k
    c = got["counters"]
    # 3 layers x (forward + dX + dW), no dX for the first layer (its input is the data); one Freivalds check
    # per product, on the reconstructed sum Z0 + Z1 + C
    assert c["products"] == 8 and c["rounds"] == 6 and c["freivalds_checks"] == 8


def test_field_products_are_exact_up_to_the_karatsuba_limit_and_beyond():
    """Three-product (Karatsuba) and four-product paths against Python integers, incl. the worst case."""
    from veil.offload.backend import NumpyBackend, TorchBackend
    from veil.offload.field import P
    from veil.offload.training.protocol import MAX_INNER_KARATSUBA, field_matmul

    g = np.random.default_rng(8)
    for k in (1, 33, 3000):
        u, v = g.integers(0, P, (3, k)), g.integers(0, P, (k, 2))
        ref = np.array([[sum(int(a) * int(b) for a, b in zip(u[i], v[:, j], strict=True)) % P for j in range(2)]
                        for i in range(3)])
        for be in (NumpyBackend(), TorchBackend("cpu")):
            assert np.array_equal(field_matmul(be, u, v), ref), (k, be.name)
    # beyond the limit: the four-product path (itself tested against Python integers in test_offload_field.py)
    u, v = g.integers(0, P, (2, MAX_INNER_KARATSUBA + 5)), g.integers(0, P, (MAX_INNER_KARATSUBA + 5, 2))
    from veil.offload.field import mul_full

    nb = NumpyBackend()
    assert np.array_equal(field_matmul(nb, u, v), mul_full(nb, u, *nb.prepare(np.ascontiguousarray(v.T), True), nb.matmul_t))
    k = MAX_INNER_KARATSUBA - 1  # every limb and every partial sum at its maximum
    worst = field_matmul(NumpyBackend(), np.full((2, k), P - 1), np.full((k, 2), P - 1))
    assert (worst == ((P - 1) ** 2 * k) % P).all()


def test_low_intensity_products_stay_in_the_enclave():
    """min_intensity: a product whose nkm / (nk + km + nm) is below it is computed in the enclave (float64,
    nothing sent); the others go to the accelerators."""
    from offload_train_helpers import DirectSecureMatmul
    from veil.offload.training import TRAIN_ACCELERATORS, TrainAccelerator

    accs = {a: TrainAccelerator("numpy") for a in TRAIN_ACCELERATORS}
    eng = DirectSecureMatmul.make(runtime(), accs)
    eng.min_intensity = 16.0
    g = np.random.default_rng(1)
    thin = (g.normal(size=(500, 25)), g.normal(size=(25, 10)))  # intensity ~5.7
    wide = (g.normal(size=(64, 400)), g.normal(size=(400, 300)))  # intensity ~33
    out_thin, out_wide = eng.matmuls([thin, wide])
    assert np.array_equal(out_thin, thin[0] @ thin[1])
    assert np.abs(out_wide - wide[0] @ wide[1]).max() < 1e-3 * np.abs(wide[0] @ wide[1]).max()
    assert eng.counters["local_products"] == 1 and eng.counters["rounds"] == 1
    assert accs["accelerator0"].requests == 1


def test_training_data_that_does_not_fit_the_model_is_a_clear_error():
    from veil.offload.training import TrainConfig, Trainer
    from veil.offload.training.trainer import TrainingDataError

    cfg = TrainConfig(optimizer={"name": "sgd", "lr": 0.1})
    g = small_cnn(0)
    with pytest.raises(TrainingDataError, match="lacks model input"):
        Trainer(g, {"image": np.zeros((4, 1, 8, 8))}, np.zeros(4, np.int64), cfg)
    with pytest.raises(TrainingDataError, match=r"sample shape \(1, 9, 9\)"):
        Trainer(g, {"x": np.zeros((4, 1, 9, 9))}, np.zeros(4, np.int64), cfg)
    with pytest.raises(TrainingDataError, match="number of samples"):
        Trainer(g, {"x": np.zeros((4, 1, 8, 8))}, np.zeros(3, np.int64), cfg)
