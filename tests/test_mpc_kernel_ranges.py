"""reciprocal / rsqrt / sqrt and their input ranges (veil.mpc.bounds.kernel_low_bits).

These kernels are right only inside their normalisation range ``[2^lo, 2^hi)``; a model whose input to
one of them is not proven inside it (from the public graph: squares, relus, sums, a positive constant
such as an eps) is refused when the program is compiled, before anything is sent, with an error naming
the op and the bound. Proven inputs get a range starting at their lower bound (never below 2^-f, the
smallest positive fixed-point value) and stay within the kernels' stated error bounds there."""

from __future__ import annotations

import numpy as np
import pytest

import veil.mpc as M
from test_mpc_nonlinear import q, run_kernel
from veil.errors import UnsupportedOpError
from veil.graph.ir import Graph, Node, TensorSpec
from veil.mpc.bounds import kernel_low_bits, lower_bounds
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import nonlinear as NL
from veil.mpc.program import compile_program
from veil.plain import run_plain

RNG = np.random.default_rng(5)


def _graph(op: str, pre: list[Node]) -> Graph:
    src = pre[-1].output if pre else "x"
    return Graph([*pre, Node("k", op, (src,), "y")], [TensorSpec("x", (None, 8))], ["y"], op)


def _sumsq(eps: float | None) -> list[Node]:
    nodes = [Node("sq", "mul", ("x", "x"), "s2"), Node("rs", "reduce_sum", ("s2",), "s", attrs={"axes": (1,), "keepdims": True})]
    if eps is not None:
        nodes.append(Node("eps", "add_const", ("s",), "se", {"c": np.array(eps)}))
    return nodes


@pytest.mark.parametrize("op,pre,proven,floor", [
    ("reciprocal", [], "no lower bound is proven", "2^-12"),
    ("rsqrt", [], "no lower bound is proven", "2^-16"),
    ("rsqrt", _sumsq(None), "only proven >= 0", "2^-16"),  # a sum of squares can be 0: 1/sqrt(0) is not finite
    ("rsqrt", _sumsq(1e-6), "only proven >= 1e-06", "2^-16"),  # an eps below the kernel's range
    ("reciprocal", _sumsq(2.0**-14), "only proven >= 6.1e-05", "2^-12"),
    ("reciprocal", [Node("rl", "relu", ("x",), "r"), Node("c", "add_const", ("r",), "rc", {"c": np.array(-0.5)})],
     "no lower bound is proven", "2^-12"),
])
def test_out_of_range_inputs_are_refused_at_compile_naming_op_and_bound(op, pre, proven, floor):
    with pytest.raises(UnsupportedOpError) as e:
        compile_program(_graph(op, pre), 1, FixedPoint(16))
    msg = str(e.value)
    assert op in msg and floor in msg and proven in msg, msg


def test_sqrt_needs_a_non_negative_input():
    with pytest.raises(UnsupportedOpError, match="sqrt needs an input proven non-negative"):
        compile_program(_graph("sqrt", []), 1, FixedPoint(16))
    compile_program(_graph("sqrt", _sumsq(None)), 1, FixedPoint(16))  # sqrt(0) = 0 is in range


def test_refused_before_any_party_sends():
    """The owner compiles before sharing anything; every other party stops with its error named."""
    with pytest.raises(UnsupportedOpError, match="rsqrt"):
        M.run(_graph("rsqrt", _sumsq(None)), RNG.normal(0, 1, (2, 8)))


def test_lower_bounds_follow_the_public_structure():
    g = Graph([*_sumsq(2.0**-10), Node("m", "mul_const", ("se",), "t", {"c": np.array([0.5])}),
               Node("g", "gelu", ("t",), "u")], [TensorSpec("x", (None, 8))], ["u"], "lb")
    lo = lower_bounds(g)
    assert lo["s2"] == 0.0 and lo["s"] == 0.0 and lo["se"] == 2.0**-10 and lo["t"] == 2.0**-11
    assert "x" not in lo and "u" not in lo  # no proof for an input or a GELU
    assert kernel_low_bits(_graph("rsqrt", _sumsq(2.0**-10)), _graph("rsqrt", _sumsq(2.0**-10)).nodes[-1], 16) == -10
    big = _graph("rsqrt", _sumsq(3.0))
    assert kernel_low_bits(big, big.nodes[-1], 16) == 1  # fewer thresholds when the input is proven large


def test_reciprocal_extended_down_to_its_lowest_start():
    """The range of reciprocal starts at 2^-12 when the input is proven that small (was 2^-8 always)."""
    x = np.concatenate([np.exp(RNG.uniform(np.log(2.0**-12), np.log(2.0**-8), 1000)), 2.0 ** np.arange(-12, -7)])
    y, _ = run_kernel(lambda r, v: NL.reciprocal_a(r, v, lo=-12), x)
    ref = 1 / q(x)
    assert np.all(np.abs(y - ref) <= 1e-6 * ref + 2.0**-14)


@pytest.mark.parametrize("op,eps,rel", [("rsqrt", 2.0**-16, 5e-3), ("reciprocal", 2.0**-12, 1e-6), ("sqrt", None, 5e-3)])
def test_in_range_models_run_within_the_stated_bounds(op, eps, rel):
    """Sums of squares from 0 and 2^-16 up to 2^10 through each kernel under mpc. The inputs are multiples
    of 2^-8, so the squares are exact in fixed point and the kernel's input is the float64 one."""
    g = _graph(op, _sumsq(eps))
    k = np.round(2.0 ** RNG.uniform(0, 13, (24, 1))) * np.sign(RNG.normal(size=(24, 1)))
    x = (k * 2.0**-8 * (np.arange(8) == 0)).astype(np.float32)
    x[0, 0], x[1, 0] = 0.0, 2.0**-8  # sums 0 (in range for sqrt; the eps keeps it for the others) and 2^-16
    pred, rep = M.run(g, x)
    ref = run_plain(g, x, dtype=np.float64)["y"]
    assert np.all(np.abs(pred - ref) <= rel * np.abs(ref) + 2.0**-13)
    assert rep.rounds == rep.declared_rounds
