"""Multi-step mpc sessions (a decoder with its key/value cache kept as shares on the servers) and a
party dying during attention."""

import time

import numpy as np
import pytest

import veil.mpc as M
from veil.errors import ProtocolError, VeilError
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.kernels import nonlinear as NL
from veil.mpc.roles import dealer_role, owner_role, server_role, user_role
from veil.net.local import run_local


@pytest.fixture(scope="module")
def stories():
    from veil.assets import stories260k_path
    from veil.models.llama import load_llama2c

    return load_llama2c(stories260k_path())


def test_generation_matches_the_plain_decoder_and_keeps_the_cache_on_the_servers(stories):
    from veil.models.llama import generate_plain

    steps = 4
    res, chans = M.generate_session(stories, steps)
    assert res["user"]["ids"] == generate_plain(stories, steps)
    rep = res["user"]["report"]
    assert rep.queries == steps and rep.rounds == rep.declared_rounds
    assert rep.warnings == []  # the range analysis proves every step overflow-free
    # per step, each server sends the user its logits share and a log: no cache (5 layers x 2 x 4 x p x 8)
    vocab = stories.step_graph(0).nodes[0].params["table"].shape[0]
    per_step = chans["server0"].stats.sent_to["user"] / steps
    assert per_step < vocab * 8 + 4096
    assert res["server0"]["queries"][-1]["q"] == f"q{steps - 1}"


def test_a_step_that_reads_missing_state_is_refused(stories):
    """Starting at position 1 (whose graph reads past_k/past_v) without a step 0: the servers have no
    such state and stop with a ProtocolError, every party exits."""
    g = [stories.step_graph(p) for p in range(2)]
    fp = FixedPoint()

    def user(ch):
        from veil.mpc.report import Report
        from veil.mpc.roles.user import UserSession, _receive_model

        info, graphs, fpu = _receive_model(ch)
        sess = UserSession(ch, info, graphs, fpu, Report())
        sess.start()
        return sess.query(1, {"token": fpu.encode(np.array([[1]]))}, 1)

    parties = {"owner": lambda ch: owner_role(ch, g[0], fp, g[1:]), "user": user,
               "server0": lambda ch: server_role(ch, 0), "server1": lambda ch: server_role(ch, 1),
               "dealer": dealer_role}
    with pytest.raises(VeilError):
        run_local(parties, timeout=20)


def _attention_graph():
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("nl_tests", pathlib.Path(__file__).with_name("test_mpc_nonlinear.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._block_graph()


def test_party_killed_during_attention_stops_every_party(monkeypatch):
    orig = NL.softmax_a

    def dying(run, *a, **k):
        if run.party == 1:
            raise RuntimeError("server1 killed during attention")
        return orig(run, *a, **k)

    monkeypatch.setattr(NL, "softmax_a", dying)
    g = _attention_graph()
    ids = np.array([[3, 17, 0, 9, 19]], np.int64)
    errors: dict[str, BaseException] = {}

    def wrap(name, fn):
        def body(ch):
            try:
                return fn(ch)
            except BaseException as e:
                errors[name] = e
                raise
        return body

    fp = FixedPoint()
    parties = {"owner": wrap("owner", lambda ch: owner_role(ch, g, fp)), "user": wrap("user", lambda ch: user_role(ch, ids)),
               "server0": wrap("server0", lambda ch: server_role(ch, 0)),
               "server1": wrap("server1", lambda ch: server_role(ch, 1)), "dealer": wrap("dealer", dealer_role)}
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="attention"):
        run_local(parties, timeout=20)
    assert time.perf_counter() - t0 < 15
    assert set(errors) == {"owner", "user", "server0", "server1", "dealer"}
    for name in ("owner", "user", "server0", "dealer"):
        assert isinstance(errors[name], VeilError), (name, errors[name])
    assert "server1" in str(errors["server0"]) or isinstance(errors["server0"], ProtocolError)
