"""Channels: in-memory and mutual-TLS backends, one set of counters, timeouts, refusal of strangers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from veil.errors import (
    ChannelError,
    PeerAbortedError,
    PeerAuthError,
    PeerDisconnectedError,
    PeerTimeoutError,
    ProtocolError,
)
from veil.net import MemoryNetwork, connect_tls, create_keys, run_local, write_deployment
from veil.net.ports import free_ports
from veil.net.wire import decode, encode


def test_wire_round_trip_without_pickle():
    msg = {"a": np.arange(12, dtype=np.uint64).reshape(3, 4), "b": [b"raw", 3, 2.5, None, "s", True],
           "c": np.zeros((0, 5), np.float32), "d": np.array(7, np.int64)}
    out = decode(encode(msg))
    assert out["b"] == [b"raw", 3, 2.5, None, "s", True]
    for k in ("a", "c", "d"):
        assert out[k].dtype == msg[k].dtype and out[k].shape == msg[k].shape
        np.testing.assert_array_equal(out[k], msg[k])
    with pytest.raises(ProtocolError, match="cannot send"):
        encode(object())
    with pytest.raises(ProtocolError, match="malformed"):
        decode(b"Zgarbage")
    with pytest.raises(ProtocolError):
        encode(np.array(["strings"], dtype=object))


def _ping_pong(big: np.ndarray):
    """Two parties: a sends a big array then b answers with its sum; one round each."""

    def a(ch):
        ch.send("b", big)
        ch.send("b", {"tag": "extra"})
        return ch.recv("b")

    def b(ch):
        x = ch.recv("b" if False else "a")
        extra = ch.recv("a")
        ch.send("a", np.array([x.sum(dtype=np.uint64)], np.uint64))
        return x, extra

    return a, b


def _check_counters(stats_a, stats_b, big):
    payload = big.nbytes
    assert stats_a.bytes_sent == stats_b.bytes_recv and stats_b.bytes_sent == stats_a.bytes_recv
    assert payload < stats_a.bytes_sent < payload + 200  # header overhead is small and counted once
    assert stats_a.msgs_sent == 2 and stats_b.msgs_recv == 2 and stats_b.msgs_sent == 1
    assert stats_a.rounds == 1 and stats_b.rounds == 1  # back-to-back sends are one round
    assert stats_a.sent_to["b"] == stats_a.bytes_sent


def test_memory_round_trip_and_counters():
    big = np.random.default_rng(0).integers(0, 2**63, size=3_000_000, dtype=np.uint64)
    fa, fb = _ping_pong(big)
    res, chans = run_local({"a": fa, "b": fb}, timeout=10)
    np.testing.assert_array_equal(res["b"][0], big)
    assert res["a"][0] == big.sum(dtype=np.uint64)
    _check_counters(chans["a"].stats, chans["b"].stats, big)


def test_memory_timeout_and_failure_propagation():
    net = MemoryNetwork(["a", "b"], timeout=0.2)
    ch = net.channel("a")
    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="no message from 'b' within 0.2"):
        ch.recv("b")
    assert time.monotonic() - t0 < 2
    with pytest.raises(ChannelError, match="no channel to 'zed'"):
        ch.send("zed", 1)

    def dies(ch):
        raise RuntimeError("boom in party a")

    def waits(ch):
        return ch.recv("a")  # would wait 60 s; must fail at once when a dies

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        run_local({"a": dies, "b": waits}, timeout=60)
    assert time.monotonic() - t0 < 5


@pytest.fixture
def deployment(tmp_path):
    ports = free_ports(3)
    dep = write_deployment(tmp_path / "dep.toml", "t", "test",
                           {n: f"127.0.0.1:{p}" for n, p in zip(["a", "b", "c"], ports, strict=True)}, timeout=20)
    create_keys(dep)
    return dep


def _threads(dep, fns, peers=None):
    out, errs = {}, {}

    def body(name, fn):
        try:
            ch = connect_tls(dep, name, peers, connect_timeout=20)
            try:
                out[name] = (fn(ch), ch.stats.copy())
            finally:
                time.sleep(0.1)
                ch.close()
        except Exception as e:  # noqa: BLE001
            errs[name] = e

    ts = [threading.Thread(target=body, args=(n, f)) for n, f in fns.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out, errs


def test_tls_round_trip_counts_like_memory(deployment):
    big = np.random.default_rng(1).integers(0, 2**63, size=2_000_000, dtype=np.uint64)
    fa, fb = _ping_pong(big)
    out, errs = _threads(deployment, {"a": fa, "b": fb}, peers=["a", "b"])
    assert not errs, errs
    np.testing.assert_array_equal(out["b"][0][0], big)
    _check_counters(out["a"][1], out["b"][1], big)


def test_tls_refuses_a_stranger(deployment, tmp_path):
    # 'b' uses a key from another CA: 'a' must refuse it and 'b' must be told.
    from veil.net.deployment import load_deployment

    stranger_dir = tmp_path / "other"
    other = load_deployment(deployment.path)
    other.keys_dir = stranger_dir
    create_keys(other)  # same names, different CA
    errs = {}

    def run_a():
        try:
            connect_tls(deployment, "a", ["a", "b"], connect_timeout=10)
        except Exception as e:  # noqa: BLE001
            errs["a"] = e

    def run_b():
        try:
            ch = connect_tls(other, "b", ["a", "b"], connect_timeout=8)
            ch.send("a", 1)
            ch.recv("a", timeout=3)
        except Exception as e:  # noqa: BLE001
            errs["b"] = e

    ts = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert isinstance(errs["a"], PeerAuthError) and "mutual-TLS handshake" in str(errs["a"])  # at once, not after 10 s
    assert isinstance(errs["b"], PeerAuthError | PeerDisconnectedError)


def test_tls_stranger_stops_honest_parties_within_seconds(deployment, tmp_path):
    """'b' holds a certificate from another CA. 'a' (listening for b) and 'c' (connecting to b) are
    honest; both stop within a few seconds, not after their 20 s connect timeout, and say why."""
    from veil.net.deployment import load_deployment

    other = load_deployment(deployment.path)
    other.keys_dir = tmp_path / "other"
    create_keys(other)
    errs, took = {}, {}

    def run(name, dep):
        t0 = time.monotonic()
        try:
            connect_tls(dep, name, connect_timeout=20)
        except Exception as e:  # noqa: BLE001
            errs[name] = e
        took[name] = time.monotonic() - t0

    ts = [threading.Thread(target=run, args=(n, other if n == "b" else deployment)) for n in "abc"]
    for t in ts:
        t.start()
    for t in ts:
        t.join(40)
    assert set(errs) == {"a", "b", "c"}, errs
    for n in "ac":
        assert isinstance(errs[n], PeerAuthError | PeerAbortedError), errs[n]
        assert took[n] < 8, took  # the refused handshake (or an honest peer's abort notice) ends the wait


def test_abort_notice_names_the_party_at_fault():
    """x dies; y notices and stops; z, which only talks to y, must blame x, not y."""

    seen = {}

    def y2(ch):
        try:
            ch.recv("x")
        except ChannelError as e:
            seen["y"] = e
            raise

    def z2(ch):
        try:
            ch.recv("y")
        except ChannelError as e:
            seen["z"] = e
            raise

    def x2(ch):
        raise RuntimeError("boom")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        run_local({"x": x2, "y": y2, "z": z2}, timeout=20)
    assert time.monotonic() - t0 < 5
    assert isinstance(seen["y"], PeerAbortedError) and seen["y"].peer == "x"
    assert "internal error (RuntimeError)" in str(seen["y"]) and "boom" not in str(seen["y"])  # no raw messages
    assert isinstance(seen["z"], PeerAbortedError) and seen["z"].peer == "x" and seen["z"].sender == "y"
    assert "'x' failed or went away (reported by 'y'" in str(seen["z"])


def test_abort_frames_are_not_messages():
    from veil.net.wire import decode_abort, encode_abort, is_abort

    f = encode_abort("why" * 1000, "server1")
    assert is_abort(f) and not is_abort(encode({"op": "abort"}))
    reason, culprit = decode_abort(f)
    assert culprit == "server1" and len(reason) <= 600
    assert decode_abort(b"X{not json") == ("a malformed abort notice", None)


def test_tls_dead_peer_is_an_error_not_a_hang(deployment):
    """A peer process that dies mid-protocol: the survivor's recv fails at once, not after the timeout."""
    code = textwrap.dedent(f"""
        import os
        from veil.net import load_deployment, connect_tls
        dep = load_deployment({str(deployment.path)!r})
        ch = connect_tls(dep, "b", ["a", "b"])
        import time
        ch.send("a", b"hello")
        time.sleep(0.5)  # let the event loop write it (sends are asynchronous)
        os._exit(1)  # die without closing anything
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        ch = connect_tls(deployment, "a", ["a", "b"], connect_timeout=20, timeout=30)
        try:
            assert ch.recv("b") == b"hello"
            t0 = time.monotonic()
            with pytest.raises(PeerDisconnectedError, match="'b'"):
                ch.recv("b")
            assert time.monotonic() - t0 < 10
        finally:
            ch.close()
    finally:
        proc.kill()
        proc.wait(10)


def test_tls_silent_peer_times_out(deployment):
    out, errs = _threads(deployment, {"a": lambda ch: ch.recv("b", timeout=0.5), "b": lambda ch: time.sleep(1.5)},
                         peers=["a", "b"])
    assert isinstance(errs.get("a"), PeerTimeoutError), (out, errs)


def test_tls_missing_peer_fails_within_connect_timeout(deployment):
    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="did not connect|could not reach"):
        connect_tls(deployment, "a", ["a", "c"], connect_timeout=1)
    assert time.monotonic() - t0 < 8
