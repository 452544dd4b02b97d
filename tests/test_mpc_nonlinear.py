"""Transformer kernels under mpc against float64 over their whole stated input range, with their
declared cost checked against the channel counters (two in-process servers, veil.mpc.simulate).

Bounds (f = 16): piecewise functions: ``Piecewise.bound`` over the real line (x <= 0 for exp);
reciprocal on [2^-8, 2^24): relative 1e-6 plus 2^-14 absolute at scale f; rsqrt on [2^-12, 2^30):
relative 1e-5 plus 2^-13 (5e-3 down to 2^-16); softmax 1e-3; LayerNorm (2 + |gamma| + 2 |y|) 2^-f / sigma + 1e-4; RMSNorm 1e-4.
Outputs are compared with the function of the *encoded* input (the input's own rounding is not the
kernel's error).
"""

import numpy as np
import pytest
from scipy.special import erf

from veil.graph.ir import Graph, Node, TensorSpec
from veil.mpc import sharing as S
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import nonlinear as NL
from veil.mpc.kernels.steps import Runner, plan, steps_cost, steps_material
from veil.mpc.simulate import simulate
from veil.plain import run_plain

FP = FixedPoint(16)
RNG = np.random.default_rng(23)


def q(v):
    return FP.decode(FP.encode(v))


def run_kernel(fn, *xs, low=2048):
    """Run ``fn(runner, *shares)`` on two servers; return (decoded output, cost matched counters)."""
    enc = [FP.encode(x) for x in xs]
    steps = plan(fn, FP, *[e.shape for e in enc])
    sh = [S.share(e, RNG.integers(0, 2**64, e.shape, dtype=np.uint64)) for e in enc]

    def body(ctx, mats, *s):
        r = Runner(ctx, mats, steps)
        out = fn(r, *s)
        r.finish()
        return out

    out, ch, _ = simulate(body, lambda side: steps_material(side, "k", steps, low), [[a for a, _ in sh], [b for _, b in sh]])
    cost = steps_cost(steps, low)
    for name in ("server0", "server1"):
        st = ch[name].stats
        assert (st.rounds, st.msgs_sent, st.bytes_sent) == (cost.rounds, cost.msgs, cost.bytes), name
    return FP.decode(S.reconstruct(*out)), cost


REFS = {
    "gelu": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "tanh": np.tanh,
    "sigmoid": lambda x: 0.5 * (1 + np.tanh(x / 2)),
    "silu": lambda x: x * 0.5 * (1 + np.tanh(x / 2)),
    "erf": erf,
    "exp": np.exp,
}


@pytest.mark.parametrize("name", sorted(REFS))
def test_piecewise_functions_over_the_whole_line(name):
    """Dense grid over [-24, 24] (the segments and their edges) plus values up to +-2^14: the
    telescoping selection is exact even where the unused polynomials overflow."""
    spec = NL.FUNCTIONS[name]
    hi = 0.0 if name == "exp" else 24.0
    x = np.concatenate([np.linspace(-24.0, hi, 12001), RNG.uniform(-2.0**14, 0.0 if name == "exp" else 2.0**14, 500),
                        np.array(spec.thresholds) + 2.0**-16, np.array(spec.thresholds) - 2.0**-16])
    if name == "exp":
        x = x[x <= 0]
    y, cost = run_kernel(lambda r, v: NL.piecewise_a(r, v, spec), x)
    assert np.abs(y - REFS[name](q(x))).max() <= spec.bound
    assert cost.rounds == (10 if spec.degree > 4 else 8)  # the comparison opening rides with the first product


def test_reciprocal_over_its_range():
    x = np.exp(RNG.uniform(np.log(2.0**-8), np.log(2.0**24), 4000))
    y, cost = run_kernel(lambda r, v: NL.reciprocal_a(r, v), x)
    ref = 1 / q(x)
    assert np.all(np.abs(y - ref) <= 1e-6 * ref + 2.0**-14)
    assert cost.rounds == 11


def test_rsqrt_over_its_range():
    """Relative 1e-5 from 2^-12 up; below, the quarter-octave thresholds are coarse at scale f (one
    unit is 2^-16) and the error grows to 5e-3 at x = 2^-16."""
    x = np.concatenate([np.exp(RNG.uniform(np.log(2.0**-16), np.log(2.0**30), 4000)), 2.0 ** np.arange(-16, 30)])
    y, cost = run_kernel(lambda r, v: NL.rsqrt_a(r, v), x)
    ref = 1 / np.sqrt(q(x))
    err = np.abs(y - ref) - 2.0**-13
    assert np.all(err[q(x) >= 2.0**-12] <= 1e-5 * ref[q(x) >= 2.0**-12])
    assert np.all(err <= 5e-3 * ref)
    assert cost.rounds == 11


@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_softmax_with_causal_and_padding_masks(scale):
    x = RNG.normal(0, scale, (2, 3, 8, 8))
    keep = np.tril(np.ones((8, 8), bool))[None, None] & (np.arange(8) < 6)[None, None, None, :]
    keep = np.broadcast_to(keep, x.shape).copy()
    keep[0, 0, 0, :] = False  # a fully masked row gives zeros
    y, _ = run_kernel(lambda r, v: NL.softmax_a(r, v, 3, keep), x)
    xm = np.where(keep, q(x), -np.inf)
    with np.errstate(invalid="ignore"):
        ref = np.exp(xm - xm.max(-1, keepdims=True))
        ref = np.nan_to_num(ref / ref.sum(-1, keepdims=True))
    assert np.abs(y - ref).max() < 1e-3
    assert np.all(y[~keep] == 0)
    y1, _ = run_kernel(lambda r, v: NL.softmax_a(r, v, 1), x[:, :, 0, :])  # another axis, no mask
    e = np.exp(q(x[:, :, 0, :]) - q(x[:, :, 0, :]).max(1, keepdims=True))
    assert np.abs(y1 - e / e.sum(1, keepdims=True)).max() < 1e-3


@pytest.mark.parametrize("sigma", [0.05, 1.0, 50.0])
def test_layernorm_and_rmsnorm(sigma):
    x = RNG.normal(0.3, sigma, (6, 96))
    g, b = RNG.normal(1, 0.3, 96), RNG.normal(0, 0.3, 96)
    y, cost = run_kernel(lambda r, v, gg, bb: NL.layernorm_a(r, v, gg, bb, 1e-12), x, g, b)
    xq = q(x)
    ref = (xq - xq.mean(-1, keepdims=True)) / np.sqrt(xq.var(-1, keepdims=True) + 1e-12) * q(g) + q(b)
    # d rounded at f, its squares at f - 2 (relative error of the variance 2^-14 / sigma)
    assert np.abs(y - ref).max() <= (2 + np.abs(g).max() + 2 * np.abs(ref).max()) * 2.0**-16 / sigma + 1e-4
    assert cost.rounds == 13  # 14 when the layer is too large for 3-round comparisons
    y, _ = run_kernel(lambda r, v, gg: NL.rmsnorm_a(r, v, gg, 1e-6), x, g)
    ref = xq / np.sqrt((xq**2).mean(-1, keepdims=True) + 1e-6) * q(g)
    assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_batched_matmul_and_onehot_steps():
    a, b = RNG.normal(0, 2, (2, 3, 5, 4)), RNG.normal(0, 2, (2, 3, 4, 6))
    y, cost = run_kernel(lambda r, u, v: r.trunc(r.matmul(u, v), 16), a, b)
    assert np.abs(y - q(a) @ q(b)).max() < 1e-3 and cost.rounds == 2
    ids = np.array([0.0, 5.0, 511.0, 77.0])
    oh, cost = run_kernel(lambda r, v: r.onehot(v, 512, 16), ids)
    assert np.array_equal(oh * 2.0**16, np.eye(512)[ids.astype(int)]) and cost.rounds == 1  # scale 0 ints


def _block_graph():
    """A small pre-LN transformer block with every new op: embedding, layernorm, attention (batched
    matmuls, causal mask), gelu, rmsnorm, sigmoid/tanh/silu, concat/slice/gather/squeeze."""
    r = np.random.default_rng(7)
    v, d, h, s = 20, 8, 2, 5
    mask = np.where(np.tril(np.ones((s, s), bool)), 0.0, -np.inf)
    lin = lambda name, i, o, x, y: Node(name, "linear", (x,), y, {"W": r.normal(0, 0.4, (o, i)), "b": r.normal(0, 0.1, o)})  # noqa: E731
    nodes = [
        Node("emb", "embedding", ("ids",), "e", {"table": r.normal(0, 1, (v, d))}),
        Node("ln", "layernorm", ("e",), "n", {"gamma": r.normal(1, 0.2, d), "beta": r.normal(0, 0.2, d)}, {"eps": 1e-5}),
        lin("q", d, d, "n", "q"), lin("k", d, d, "n", "k"), lin("v", d, d, "n", "v"),
        Node("qr", "reshape", ("q",), "q4", attrs={"shape": (1, s, h, d // h)}),
        Node("kr", "reshape", ("k",), "k4", attrs={"shape": (1, s, h, d // h)}),
        Node("vr", "reshape", ("v",), "v4", attrs={"shape": (1, s, h, d // h)}),
        Node("qt", "transpose", ("q4",), "qh", attrs={"perm": (0, 2, 1, 3)}),
        Node("kt", "transpose", ("k4",), "kh", attrs={"perm": (0, 2, 3, 1)}),
        Node("vt", "transpose", ("v4",), "vh", attrs={"perm": (0, 2, 1, 3)}),
        Node("qk", "matmul", ("qh", "kh"), "sc"),
        Node("scl", "mul_const", ("sc",), "sc2", {"c": np.array(0.5)}),
        Node("sm", "softmax", ("sc2",), "p", {"mask": mask}, {"axis": 3}),
        Node("pv", "matmul", ("p", "vh"), "o"),
        Node("ot", "transpose", ("o",), "o2", attrs={"perm": (0, 2, 1, 3)}),
        Node("or", "reshape", ("o2",), "o3", attrs={"shape": (1, s, d)}),
        Node("res", "add", ("e", "o3"), "h1"),
        Node("rms", "rmsnorm", ("h1",), "h2", {"gamma": r.normal(1, 0.2, d)}, {"eps": 1e-6}),
        lin("f1", d, 2 * d, "h2", "u"),
        Node("g", "gelu", ("u",), "gu"),
        Node("sl", "slice", ("gu",), "ga", attrs={"starts": (0,), "ends": (d,), "axes": (2,), "steps": (1,)}),
        Node("sl2", "slice", ("u",), "ub", attrs={"starts": (d,), "ends": (2 * d,), "axes": (2,), "steps": (1,)}),
        Node("sg", "sigmoid", ("ub",), "sb"),
        Node("gl", "mul", ("ga", "sb"), "glu"),
        Node("th", "tanh", ("glu",), "t"),
        Node("si", "silu", ("t",), "st"),
        Node("cat", "concat", ("st", "h1"), "c", attrs={"axis": 2}),
        Node("ga2", "gather", ("c",), "last", attrs={"axis": 1, "indices": np.array([s - 1])}),
        Node("sq", "squeeze", ("last",), "l2", attrs={"axes": (1,)}),
        lin("head", 2 * d, v, "l2", "logits"),
    ]
    return Graph(nodes, [TensorSpec("ids", (1, s), "int64")], ["logits"], "block")


def test_transformer_block_end_to_end_against_plain():
    import veil.mpc as M

    g = _block_graph()
    ids = np.array([[3, 17, 0, 9, 19]], np.int64)
    pred, rep = M.run(g, ids)
    ref = run_plain(g, ids)["logits"]  # float32 reference
    assert np.abs(pred - ref).max() < 2e-3
    assert rep.rounds == rep.declared_rounds and rep.server_bytes == rep.declared_server_bytes


def test_remaining_ops_end_to_end_against_plain():
    """Grouped and depthwise convolution, reduce_sum/mean, unsqueeze, erf, gelu_tanh, reciprocal, rsqrt,
    sqrt and an unmasked softmax inside the graph, under mpc against the plain executor."""
    import veil.mpc as M

    r = np.random.default_rng(8)
    nodes = [
        Node("gc", "conv2d", ("x",), "c1", {"W": r.normal(0, 0.3, (4, 2, 3, 3)), "b": r.normal(0, 0.1, 4)},
             {"strides": (1, 1), "pads": (1, 1, 1, 1), "group": 2}),
        Node("dw", "conv2d", ("c1",), "c2", {"W": r.normal(0, 0.3, (4, 1, 3, 3))},
             {"strides": (2, 2), "pads": (1, 1, 1, 1), "group": 4}),
        Node("rs", "reduce_sum", ("c2",), "s", attrs={"axes": (3,), "keepdims": False}),
        Node("rm", "reduce_mean", ("c2",), "m", attrs={"axes": (2, 3), "keepdims": True}),
        Node("sq", "squeeze", ("m",), "m2", attrs={"axes": (2, 3)}),
        Node("us", "unsqueeze", ("m2",), "m3", attrs={"axes": (2,)}),
        Node("ad", "add", ("s", "m3"), "t"),
        Node("er", "erf", ("t",), "e1"),
        Node("gt", "gelu_tanh", ("t",), "e2"),
        Node("sm", "softmax", ("t",), "p", attrs={"axis": 2}),
        Node("a1", "add", ("e1", "e2"), "u"),
        Node("a2", "add", ("u", "p"), "v"),
        Node("sqr", "mul", ("v", "v"), "v2"),
        Node("pos", "add_const", ("v2",), "w", {"c": np.array(0.5)}),
        Node("rc", "reciprocal", ("w",), "y1"),
        Node("rq", "rsqrt", ("w",), "y2"),
        Node("sr", "sqrt", ("w",), "y3"),
        Node("o1", "add", ("y1", "y2"), "o"),
        Node("o2", "add", ("o", "y3"), "out"),
    ]
    g = Graph(nodes, [TensorSpec("x", (None, 4, 6, 6))], ["out"], "misc")
    x = r.normal(0, 1, (2, 4, 6, 6))
    pred, rep = M.run(g, x)
    ref = run_plain(g, x, dtype=np.float64)["out"]
    assert np.abs(pred - ref).max() < 2e-3
    assert rep.rounds == rep.declared_rounds and rep.server_bytes == rep.declared_server_bytes
