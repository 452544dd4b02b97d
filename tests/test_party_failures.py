"""Failures across real party processes (mpc over mutual TLS on loopback): the survivors of a killed
party blame that party, and a party with a certificate from another CA stops every honest party
within seconds rather than after the deployment timeout."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from veil.assets import load_slice, model_path
from veil.errors import VeilError
from veil.mpc.demo import run_local_deployment
from veil.net.keys import create_ca, issue_party_cert


def _lines(msg: str) -> dict[str, str]:
    """'mpc deployment failed ...: owner (exit 2): ...; user (exit 2): ...' -> {party: its line}."""
    parts = re.split(r"(?:: |; )(owner|user|server0|server1|dealer) \(exit (-?\d+)\): ", msg)
    return {parts[i]: f"exit {parts[i + 1]}: {parts[i + 2]}" for i in range(1, len(parts) - 2, 3)}


@pytest.mark.parametrize("victim", ["server1"])
def test_survivors_blame_the_killed_party(tmp_path, victim):
    x, _ = load_slice(256)
    with pytest.raises(VeilError) as exc:
        run_local_deployment(model_path("C"), x, tmp_path, batch_size=8, timeout=90, recv_timeout=30,
                             kill_after=(victim, 3.0))  # 32 queries of network C: still running at 3 s
    lines = _lines(str(exc.value))
    assert lines[victim].startswith("exit -9"), lines
    for p in ("owner", "user", "server0", "dealer"):
        line = lines[p]
        assert line.startswith("exit 2"), lines
        assert f"'{victim}'" in line, (p, line)  # names the party that died ...
        for other in ("owner", "user", "server0", "dealer"):  # ... and blames no survivor for dying
            assert f"'{other}' closed the connection or died" not in line, (p, line)
            assert f"'{other}' failed or went away" not in line, (p, line)


def test_foreign_certificate_stops_honest_parties_within_seconds(tmp_path):
    rogue = tmp_path / "rogue"
    rogue.mkdir()

    def tamper(keys_dir):
        key, cert = create_ca(rogue, "rogue")
        issue_party_cert(rogue, "server1", key, cert)
        for suffix in (".pem", ".key"):
            shutil.copy(rogue / f"server1{suffix}", keys_dir / "server1" / f"server1{suffix}")

    work = tmp_path / "run"
    work.mkdir()
    x, _ = load_slice(1)
    t0 = time.perf_counter()
    with pytest.raises(VeilError) as exc:  # receive and connect timeout 60 s: nobody may wait that long
        run_local_deployment(model_path("A"), x, work, timeout=120, recv_timeout=60, tamper=tamper)
    took = time.perf_counter() - t0
    lines = _lines(str(exc.value))
    assert set(lines) == {"owner", "user", "server0", "server1", "dealer"}, lines
    assert all(v.startswith("exit 2") for v in lines.values()), lines  # each stopped itself: none was killed
    assert took < 30, took  # process start (imports) + handshakes + 2 s linger; was 60+ s
    assert any("mutual-TLS handshake" in v or "is not 'server1'" in v for v in lines.values()), lines
