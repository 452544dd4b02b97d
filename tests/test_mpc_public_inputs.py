"""Public inputs under mpc (``graph.meta["public_inputs"]``): values the user sends in the clear to both
servers, e.g. a padding mask. One compiled graph serves any public value; results match the plain
executor; a value above its declared bound is refused before anything is sent."""

from __future__ import annotations

import numpy as np
import pytest

import veil.mpc as M
from veil.errors import InputRangeError, UnsupportedOpError
from veil.graph.ir import Graph, Node, TensorSpec
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.program import compile_program, user_inputs
from veil.plain import run_plain


def _graph() -> Graph:
    r = np.random.default_rng(3)
    nodes = [
        Node("l1", "linear", ("x",), "h", {"W": r.normal(0, 0.4, (6, 5)), "b": r.normal(0, 0.1, 6)}),
        Node("pb", "mul_const", ("bias",), "bias2", {"c": np.array(1.0)}),  # public only: in the clear
        Node("ab", "add", ("h", "bias2"), "hb"),
        Node("sm", "softmax", ("hb",), "p", attrs={"axis": 1}),
        Node("mw", "mul", ("weights", "h"), "hw"),  # public * secret
        Node("sb", "sub", ("weights", "p"), "d"),  # public - secret
        Node("o", "add", ("hw", "d"), "out"),
    ]
    ins = [TensorSpec("x", (None, 5)), TensorSpec("bias", (None, 6)), TensorSpec("weights", (None, 6))]
    return Graph(nodes, ins, ["out"], "public-inputs", meta={"public_inputs": {"bias": 1e4, "weights": 1.0}})


def _inputs(seed: int, n: int = 3) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    bias = np.where(r.random((n, 6)) < 0.4, -1e4, 0.0).astype(np.float32)
    bias[:, 0] = 0.0  # at least one position kept per row
    return {"x": r.normal(0, 1, (n, 5)).astype(np.float32), "bias": bias,
            "weights": r.random((n, 6)).astype(np.float32)}


@pytest.mark.parametrize("seed", [0, 1])
def test_public_inputs_match_plain_for_any_value(seed):
    g = _graph()
    x = _inputs(seed)
    out, rep = M.run(g, x)
    np.testing.assert_allclose(out, run_plain(g, x, dtype=np.float64)["out"], atol=2e-3)
    assert rep.rounds == rep.declared_rounds and rep.server_bytes == rep.declared_server_bytes
    assert [s.name for s in user_inputs(g)] == ["x"]  # only x is secret-shared


def test_public_input_above_its_declared_bound_is_refused_before_sending():
    x = _inputs(0)
    x["weights"][0, 0] = 3.0
    with pytest.raises(InputRangeError, match="public input 'weights'"):
        M.run(_graph(), x)


def test_other_ops_on_a_secret_and_a_public_tensor_are_refused_at_load():
    g = _graph()
    g.nodes[4] = Node("mw", "concat", ("weights", "h"), "hw0", attrs={"axis": 1})
    g.nodes.insert(5, Node("sl", "slice", ("hw0",), "hw", attrs={"starts": (0,), "ends": (6,), "axes": (1,), "steps": (1,)}))
    with pytest.raises(UnsupportedOpError, match="public input"):
        compile_program(g, 1, FixedPoint())
