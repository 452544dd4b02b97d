"""A party process stopped by SIGTERM tells its peers it was stopped (not "internal error (SystemExit)").

The stopped party runs as `veil party` does: `veil`'s SIGTERM handler (veil.cli.main), a mutual-TLS
channel on loopback, and its work inside `channel.aborting()`. The test plays the peer.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from veil.errors import PeerAbortedError
from veil.net import connect_tls, create_keys, write_deployment
from veil.net.channel import abort_reason
from veil.net.ports import free_ports

pytestmark = pytest.mark.timeout(120)


def test_abort_reason_of_a_signal_and_of_an_exit():
    assert abort_reason(SystemExit(128 + signal.SIGTERM)) == ("it was stopped (SIGTERM)", None)
    assert abort_reason(SystemExit(128 + signal.SIGINT)) == ("it was stopped (SIGINT)", None)
    assert abort_reason(SystemExit(3)) == ("it exited (status 3)", None)
    assert abort_reason(SystemExit()) == ("it exited (status 0)", None)
    assert abort_reason(RuntimeError("secret")) == ("internal error (RuntimeError)", None)  # still no message


def test_sigterm_party_tells_its_peer_it_was_stopped(tmp_path):
    ports = free_ports(2)
    dep = write_deployment(tmp_path / "dep.toml", "t", "test",
                           {n: f"127.0.0.1:{p}" for n, p in zip(["a", "b"], ports, strict=True)}, timeout=30)
    create_keys(dep)
    code = textwrap.dedent(f"""
        from veil.cli.main import _exit_cleanly_on_sigterm
        from veil.net import connect_tls, load_deployment
        _exit_cleanly_on_sigterm()  # what `veil` installs before running any command
        dep = load_deployment({str(dep.path)!r})
        channel = connect_tls(dep, "b", ["a", "b"], connect_timeout=30)
        try:
            with channel.aborting():  # as `veil party` runs a mode's role
                channel.send("a", "ready")
                channel.recv("a", timeout=60)  # waits here until the test sends SIGTERM
        finally:
            channel.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ch = connect_tls(dep, "a", ["a", "b"], connect_timeout=60, timeout=60)
        try:
            assert ch.recv("b") == "ready"
            time.sleep(0.2)  # b is now blocked in its receive
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            with pytest.raises(PeerAbortedError) as info:
                ch.recv("b")
            assert time.monotonic() - t0 < 10
        finally:
            ch.close()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, err  # it stopped itself, cleanly
        assert b"Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    msg = str(info.value)
    assert info.value.peer == "b" and info.value.reason == "it was stopped (SIGTERM)", msg
    assert msg == "party 'a': 'b' stopped the session: it was stopped (SIGTERM)"
    assert "internal error" not in msg and "SystemExit" not in msg
