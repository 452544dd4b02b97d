"""Segmented material (``Program.segments``): the dealer makes, and the servers expand, one segment of
a query's material at a time, right before its instructions run, so memory holds one segment.

The material of a segmented query must be the material of the whole query made at once, bit for bit
(same seeds, same labels), and a segmented run must compute exactly what an unsegmented run computes,
with the same online messages (rounds and bytes).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

import veil.mpc as M
from veil.errors import OptionError
from veil.graph import load_model
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.material import DealerSide, ServerSide
from veil.mpc.prg import Prg
from veil.mpc.program import compile_program
from veil.mpc.roles import dealer as dealer_mod
from veil.mpc.roles import owner as owner_mod
from veil.mpc.roles import user as user_mod
from veil.mpc.roles.dealer import weight_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import encoder_layer  # noqa: E402

SEQ = 4
BUDGET = 200_000  # bytes: cuts the layer's program into many segments


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    path = encoder_layer.build_onnx(tmp_path_factory.mktemp("layer") / "layer.onnx", seq=SEQ)
    return load_model(str(path)), encoder_layer.inputs(SEQ)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and np.array_equal(a, b)


def test_segments_cover_the_program_within_the_budget(layer):
    prog = compile_program(layer[0], 1, FixedPoint())
    sizes = prog.material_sizes()
    segs = prog.segments(BUDGET)
    assert len(segs) > 5 and prog.segments(0) == [(0, len(prog.instrs))] == prog.segments(None)
    assert [lo for lo, _ in segs] == [0] + [hi for _, hi in segs[:-1]] and segs[-1][1] == len(prog.instrs)
    for lo, hi in segs:  # within the budget, or a single instruction larger than it
        assert sum(sizes[lo:hi]) <= BUDGET or sum(1 for s in sizes[lo:hi] if s) == 1
    assert sum(sizes) > 10 * BUDGET


def test_segmented_material_equals_the_whole_query_material_bit_for_bit(layer):
    graph = layer[0]
    prog = compile_program(graph, 1, FixedPoint())
    s0, s1 = bytes(range(32)), bytes(range(32, 64))

    def dealer_view(segs):
        g0, g1 = Prg(s0), Prg(s1)
        masks = weight_masks(DealerSide(g0, g1), graph)
        full, corr = {}, {}
        for lo, hi in segs:
            side = DealerSide(g0, g1)
            for j in range(lo, hi):  # instruction by instruction, as the dealer role makes them
                full.update(prog.materials(side, "q0", masks, j, j + 1))
            corr.update(side.corrections)
        return full, corr

    def server_view(i, segs, corr):
        g = Prg(s0 if i == 0 else s1)
        weight_masks(ServerSide(i, g), graph)
        side, out = ServerSide(i, g), {}
        for lo, hi in segs:
            keys = {k for ins in prog.instrs[lo:hi] for k, _ in ins.materials}
            mine = {k: v for k, v in corr.items() if any(k.startswith(f"q0/{kk}/") for kk in keys)}
            side.corrections = mine if i == 1 else {}
            out.update(prog.materials(side, "q0", {}, lo, hi))
            assert not side.corrections  # every correction of the segment was used by it
        return out

    whole, segs = [(0, len(prog.instrs))], prog.segments(BUDGET)
    full_a, corr_a = dealer_view(whole)
    full_b, corr_b = dealer_view(segs)
    assert len(segs) > 5 and corr_a.keys() == corr_b.keys() and _equal(corr_a, corr_b)
    assert _equal(full_a, full_b)
    for i in (0, 1):
        assert _equal(server_view(i, whole, corr_a), server_view(i, segs, corr_b))


def _fixed_seeds(monkeypatch):
    """Deterministic seeds for a bit-exact comparison: one counter per role module (the roles run as
    threads, so a shared counter would hand out seeds in a racy order)."""
    for tag, mod in enumerate((dealer_mod, owner_mod, user_mod)):
        counter = itertools.count()
        monkeypatch.setattr(mod, "new_seed", lambda c=counter, t=tag: bytes([t, next(c)]) * 16)


def test_a_segmented_run_computes_exactly_the_unsegmented_run(layer, monkeypatch):
    graph, x = layer
    _fixed_seeds(monkeypatch)
    out_a, rep_a = M.run(graph, x, segment_bytes=0)
    _fixed_seeds(monkeypatch)
    out_b, rep_b = M.run(graph, x, segment_bytes=BUDGET)
    assert rep_a.per_query[0]["segments"] == 1 and rep_b.per_query[0]["segments"] > 5
    assert out_a.dtype == out_b.dtype and np.array_equal(out_a, out_b)  # same seeds: the same result bit for bit
    assert rep_b.max_abs_error < 1e-2
    # the online phase sends the same messages: the segment barriers are outside the online counters
    assert rep_a.rounds == rep_b.rounds == rep_b.declared_rounds
    assert rep_a.online_bytes == rep_b.online_bytes
    assert rep_b.offline_bytes >= rep_a.offline_bytes  # the same corrections, framed in more messages


def test_a_bad_segment_budget_is_an_option_error():
    with pytest.raises(OptionError, match="segment_bytes"):
        M.run_session("checked before the model is read", np.zeros(1), segment_bytes=-1)


def test_segments_over_five_tls_processes(tmp_path):
    from veil.assets import load_slice, model_path
    from veil.mpc.demo import run_local_deployment
    from veil.plain import run_plain

    x, _ = load_slice(4)
    res = run_local_deployment(model_path("C"), x, tmp_path, timeout=180, recv_timeout=60,
                               options={"segment_bytes": 300_000})
    ref = run_plain(load_model(str(model_path("C"))), x)["logits"]
    got = res["outputs"]["logits"]
    assert np.array_equal(got.argmax(1), ref.argmax(1)) and np.abs(got - ref).max() < 5e-3
    rep = res["report"]
    assert rep["per_query"][0]["segments"] > 3
    assert rep["rounds"] == rep["declared_rounds"] and rep["server_bytes"] == rep["declared_server_bytes"]
