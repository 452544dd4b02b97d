"""Whole models under mpc (five parties as threads) against the plain executor; material
accounting; faults. Tolerance: predictions (arg-max) must agree exactly; logits within 5e-3."""

import time

import numpy as np
import pytest

import veil.mpc as M
from veil.assets import load_slice, model_path
from veil.errors import (
    InputDtypeError,
    InputRangeError,
    InputShapeError,
    MaterialExhaustedError,
    ProtocolError,
    UnsupportedOpError,
    VeilError,
)
from veil.graph import load_model
from veil.graph.ir import Graph, Node, TensorSpec
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import compare
from veil.mpc.material import MaterialStore
from veil.mpc.roles import dealer_role, owner_role, server_role, user_role
from veil.net.local import run_local
from veil.plain import run_plain

RNG = np.random.default_rng(5)
TOL = 5e-3


@pytest.fixture(scope="module")
def mnist():
    return load_slice(6)


@pytest.mark.parametrize("net", ["A", "B", "C", "D"])
def test_shipped_networks_agree_with_plain(net, mnist):
    x, y = mnist
    pred, rep = M.run(str(model_path(net)), x)
    ref = run_plain(load_model(str(model_path(net))), x)["logits"]
    assert np.array_equal(pred.argmax(1), ref.argmax(1))
    assert rep.agreement == 1.0 and rep.max_abs_error < TOL
    assert np.abs(pred - ref).max() < TOL
    # the kernels' declared cost is what the channels counted, for the whole network
    assert rep.rounds == rep.declared_rounds and rep.server_bytes == rep.declared_server_bytes
    assert rep.offline_bytes > 0 and rep.online_bytes > 0


def _graph_with_many_ops() -> Graph:
    r = np.random.default_rng(3)
    nodes = [
        Node("c1", "conv2d", ("x",), "h1", {"W": r.normal(0, 0.3, (4, 2, 3, 3)), "b": r.normal(0, 0.1, 4)},
             {"strides": (1, 1), "pads": (1, 1, 1, 1)}),
        Node("ac", "add_const", ("h1",), "h2", {"c": np.array(0.25)}),
        Node("r1", "relu", ("h2",), "h3"),
        Node("ap", "avgpool", ("h3",), "h4", attrs={"kernel": (2, 2), "strides": (2, 2), "pads": (0, 0, 0, 0),
                                                   "count_include_pad": False}),
        Node("mc", "mul_const", ("h4",), "h5", {"c": np.array(1.5)}),
        Node("ad", "add", ("h5", "h4"), "h6"),
        Node("mu", "mul", ("h6", "h4"), "h7"),
        Node("gp", "global_avgpool", ("h7",), "h8"),
        Node("fl", "flatten", ("h8",), "h9", attrs={"axis": 1}),
        Node("l1", "linear", ("h9",), "h10", {"W": r.normal(0, 0.5, (5, 4)), "b": r.normal(0, 0.1, 5)}),
        Node("sm", "softmax", ("h10",), "probs", attrs={"axis": -1}),
    ]
    return Graph(nodes, [TensorSpec("x", (None, 2, 6, 6))], ["probs"], "many")


def test_many_ops_graph_and_softmax_at_output():
    g = _graph_with_many_ops()
    x = RNG.normal(0, 1, (3, 2, 6, 6)).astype(np.float32)
    pred, rep = M.run(g, x)
    ref = run_plain(g, x, dtype=np.float64)["probs"]
    assert np.abs(pred - ref).max() < TOL and rep.agreement == 1.0
    assert rep.rounds == rep.declared_rounds


def test_argmax_output_and_torch_model():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 7))
    x = RNG.normal(0, 1, (9, 3, 4)).astype(np.float32)
    pred, rep = M.run(model, x)
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.abs(pred - ref).max() < TOL and np.array_equal(pred.argmax(1), ref.argmax(1))
    g = M.api.load(model, x)
    g.nodes.append(Node("am", "argmax", (g.outputs[0],), "cls", attrs={"axis": 1, "keepdims": False}))
    g.outputs = ["cls"]
    cls, rep = M.run(g, x)
    assert np.array_equal(np.rint(cls).astype(np.int64), ref.argmax(1))


def test_material_is_never_reused():
    """Two queries draw disjoint randomness labels; each server consumes exactly what the dealer made."""
    g = _graph_with_many_ops()
    x = RNG.normal(0, 1, (4, 2, 6, 6)).astype(np.float32)
    res, _ = M.run_session(g, x, batch_size=2)
    d = res["dealer"]
    assert [q["q"] for q in d["queries"]] == ["q0", "q1"]
    for labels, server in ((d["labels0"], "server0"), (d["labels1"], "server1")):
        assert labels == res[server]["labels"]  # the server expanded exactly the dealer's streams
        q0 = {lab[3:] for lab in labels if lab.startswith("q0/")}
        q1 = {lab[3:] for lab in labels if lab.startswith("q1/")}
        assert q0 and q0 == q1  # same plan, distinct labels (hence independent streams) per query
        assert len(set(labels)) == len(labels)
    store = MaterialStore("q")
    store.put("k", {"a": np.zeros(1)})
    store.take("k")
    with pytest.raises(MaterialExhaustedError, match="already consumed"):
        store.take("k")


def _parties(graph, x, fp=None):
    fp = fp or FixedPoint()
    errors: dict[str, BaseException] = {}

    def wrap(name, fn):
        def body(ch):
            try:
                return fn(ch)
            except BaseException as e:
                errors[name] = e
                raise
        return body

    parties = {"owner": wrap("owner", lambda ch: owner_role(ch, graph, fp)),
               "user": wrap("user", lambda ch: user_role(ch, x)),
               "server0": wrap("server0", lambda ch: server_role(ch, 0)),
               "server1": wrap("server1", lambda ch: server_role(ch, 1)),
               "dealer": wrap("dealer", dealer_role)}
    return parties, errors


def _small_graph():
    g = _graph_with_many_ops()
    return g


@pytest.mark.parametrize("bad,err", [
    (np.zeros((2, 3, 6, 6), np.float32), InputShapeError),
    (np.full((2, 2, 6, 6), 1e9, np.float32), InputRangeError),
    (np.zeros((2, 2, 6, 6), np.int32), InputDtypeError),
])
def test_bad_input_fails_on_every_party_before_anything_is_sent(bad, err):
    parties, errors = _parties(_small_graph(), bad)
    t0 = time.perf_counter()
    with pytest.raises(err):
        run_local(parties, timeout=10)
    assert time.perf_counter() - t0 < 5
    assert set(errors) == {"owner", "user", "server0", "server1", "dealer"}
    for name in ("owner", "server0", "server1", "dealer"):
        assert isinstance(errors[name], ProtocolError) and "rejected" in str(errors[name])
    assert "1e+09" not in str(errors["server0"])  # the input's values are not in other parties' errors


def test_unsupported_op_fails_at_load_on_every_party():
    """Every op of veil's IR has an mpc compiler; one that refuses its shapes (a product of two 1-D
    activations) fails on the owner at load and every other party stops with the node named."""
    g = Graph([Node("dot", "matmul", ("x", "x"), "y")], [TensorSpec("x", (3,))], ["y"])
    parties, errors = _parties(g, np.zeros((3,), np.float32))
    with pytest.raises(UnsupportedOpError, match="matmul"):
        run_local(parties, timeout=10)
    assert set(errors) == {"owner", "user", "server0", "server1", "dealer"}
    assert all("'dot'" in str(e) for e in errors.values())


def test_party_dying_mid_inference_fails_everyone_quickly(monkeypatch):
    orig = compare.relu_a

    def dying(ctx, *a, **k):
        if ctx.party == 1:
            raise RuntimeError("server1 crashed")
        return orig(ctx, *a, **k)

    monkeypatch.setattr(compare, "relu_a", dying)
    x = load_slice(2)[0]
    graph = load_model(str(model_path("A")))
    parties, errors = _parties(graph, x)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="crashed"):
        run_local(parties, timeout=20)
    assert time.perf_counter() - t0 < 10
    assert set(errors) == {"owner", "user", "server0", "server1", "dealer"}
    for name in ("owner", "user", "server0", "dealer"):
        assert isinstance(errors[name], VeilError), (name, errors[name])


def test_softmax_inside_the_graph_runs_under_mpc():
    """Softmax followed by another op is computed by the servers (no longer left to the user)."""
    g = _graph_with_many_ops()
    g.nodes.append(Node("r", "mul_const", ("probs",), "out", {"c": np.array(3.0)}))
    g.outputs = ["out"]
    prog = M.compile_program(g, 1, FixedPoint())
    assert not prog.post
    x = RNG.normal(0, 1, (2, 2, 6, 6)).astype(np.float32)
    pred, rep = M.run(g, x)
    assert np.abs(pred - run_plain(g, x, dtype=np.float64)["out"]).max() < 3e-3
    assert rep.rounds == rep.declared_rounds


def test_matmul_of_two_activations_and_other_frac_bits():
    r = np.random.default_rng(9)
    nodes = [Node("l1", "linear", ("x",), "h", {"W": r.normal(0, 0.5, (6, 4)), "b": r.normal(0, 0.1, 6)}),
             Node("t", "transpose", ("h",), "ht", attrs={"perm": (1, 0)}),
             Node("mm", "matmul", ("h", "ht"), "y")]
    g = Graph(nodes, [TensorSpec("x", (3, 4))], ["y"], "mm")
    x = r.normal(0, 1, (3, 4)).astype(np.float32)
    for f in (12, 16, 20):
        pred, rep = M.run(g, x, frac_bits=f)
        ref = run_plain(g, x, dtype=np.float64)["y"]
        assert np.abs(pred - ref).max() < 40 * 2.0**-f, f  # a few ulps after two products
        assert rep.rounds == rep.declared_rounds


def test_input_limit_follows_the_weights_and_the_format():
    from veil.mpc.bounds import input_limit

    w = np.array([[3.0, -1.0], [0.5, 0.5]])
    g = Graph([Node("l", "linear", ("x",), "y", {"W": w, "b": np.array([2.0, 0.0])}),
               Node("r", "relu", ("y",), "z")], [TensorSpec("x", (None, 2))], ["z"])
    fp = FixedPoint(16)
    lim, uncovered = input_limit(g, fp)
    assert lim == pytest.approx((2.0 ** (61 - 32) - 2.0) / 4.0) and uncovered == []
    assert input_limit(g, FixedPoint(20))[0] < lim / 200  # more fractional bits, less integer range
    x = np.full((1, 2), lim * 1.01, np.float32)
    parties, errors = _parties(g, x)
    with pytest.raises(InputRangeError, match="fixed-point range"):
        run_local(parties, timeout=10)
    assert isinstance(errors["server0"], ProtocolError)


def test_direct_first_layer_and_the_shared_input_path():
    """When the input reaches the first linear/conv through shape ops only, the user masks it itself
    (one round less); otherwise the input is secret-shared (server0's share from the user's seed)."""
    prog = M.compile_program(load_model(str(model_path("A"))), 1, FixedPoint())
    assert prog.direct is not None and [n.op for n in prog.direct["prefix"]] == ["flatten"]
    assert prog.instrs[0].cost.rounds == 0
    r = np.random.default_rng(4)
    g = Graph([Node("r0", "relu", ("x",), "h"),
               Node("l", "linear", ("h",), "y", {"W": r.normal(0, 0.5, (3, 5)), "b": r.normal(0, 0.1, 3)})],
              [TensorSpec("x", (None, 5))], ["y"])
    assert M.compile_program(g, 2, FixedPoint()).direct is None
    x = r.normal(0, 1, (4, 5)).astype(np.float32)
    pred, rep = M.run(g, x, batch_size=2)
    assert np.abs(pred - run_plain(g, x, dtype=np.float64)["y"]).max() < TOL
    assert rep.rounds == rep.declared_rounds == 2 * (3 + 1 + 1)  # relu (small: 3 rounds), linear, output


def test_products_of_activations_are_bounded_soundly():
    """Issue 13: a product of two activations used to be left out of the published input limit
    (inputs of 1e4 under a limit of 2e7 silently disagreed). The limit now bounds the product: inputs
    just under it agree with plaintext, inputs just over it are refused before anything is sent."""
    from veil.mpc.bounds import input_limit

    r = np.random.default_rng(13)
    g = Graph([Node("l1", "linear", ("x",), "h", {"W": r.normal(0, 0.5, (6, 4)), "b": r.normal(0, 0.1, 6)}),
               Node("sq", "mul", ("h", "h"), "h2"),
               Node("l2", "linear", ("h2",), "y", {"W": r.normal(0, 0.5, (3, 6)), "b": r.normal(0, 0.1, 3)})],
              [TensorSpec("x", (None, 4))], ["y"], "square")
    lim, uncovered = input_limit(g, FixedPoint())
    assert uncovered == [] and lim < 1e4  # the old affine bound gave about 1e7 here
    x = r.uniform(-1, 1, (32, 4)) * 0.99 * lim
    x[0, 0] = 0.99 * lim
    pred, _ = M.run(g, x.astype(np.float64))
    ref = run_plain(g, x, dtype=np.float64)["y"]
    assert np.abs(pred - ref).max() <= 1e-4 * np.abs(ref).max()  # fixed point: relative 2^-16 per factor
    parties, errors = _parties(g, x * 1.02 / 0.99)
    with pytest.raises(InputRangeError, match="fixed-point range"):
        run_local(parties, timeout=10)
    assert isinstance(errors["server0"], ProtocolError) and "rejected" in str(errors["server0"])


def test_a_model_the_range_analysis_cannot_prove_is_flagged_to_the_user():
    """Integer inputs only, but a product of two embeddings whose worst case exceeds the ring: the
    owner cannot publish a safe limit, so the user is warned and its report says so."""
    table = np.full((4, 2), 3e4)
    g = Graph([Node("e", "embedding", ("ids",), "h", {"table": table}), Node("sq", "mul", ("h", "h"), "y")],
              [TensorSpec("ids", (1, 3), "int64")], ["y"], "big")
    with pytest.warns(UserWarning, match="worst-case bounds"):
        _, rep = M.run(g, np.array([[0, 1, 3]], np.int64), compare=False)
    assert rep.warnings
