"""Start and stop a real attested server process on loopback (for tests, benchmarks and examples).

:class:`ServerProcess` runs ``python -m veil.attested serve --hazmat-allow-simulation`` with a
ready file, waits (with a timeout) until the server has written it and answers TLS, and stops
the process on exit (SIGTERM, then SIGKILL after a grace period). It binds 127.0.0.1 only. The
server's secrets (upload token, simulation key) go to a state directory of its own, outside the
store (``state_dir``; default: a temporary directory kept for the object's life, so restarts keep them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from veil.errors import DeploymentError, PeerTimeoutError

__all__ = ["ServerProcess"]


class ServerProcess:
    """A server subprocess. ``extra_args`` are passed to ``veil attested serve`` (e.g. limits)."""

    def __init__(self, store: str | os.PathLike[str], *, port: int = 0, extra_args: tuple[str, ...] = (),
                 start_timeout: float = 60.0, env: dict[str, str] | None = None,
                 state_dir: str | os.PathLike[str] | None = None, cwd: str | os.PathLike[str] | None = None):
        self.store = Path(store)
        self.cwd = cwd
        self.port = port
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="veil-attested-srv-")
        self._log = Path(self._tmp.name) / "server.log"
        self.state_dir = Path(state_dir) if state_dir is not None else Path(self._tmp.name) / "state"
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def upload_token(self) -> str:
        return (self.state_dir / "upload.token").read_text().strip()

    def log_text(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def start(self) -> ServerProcess:
        ready = Path(self._tmp.name) / "ready.json"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "veil.attested", "serve", "--store", str(self.store), "--host", "127.0.0.1",
               "--port", str(self.port), "--hazmat-allow-simulation", "--ready-file", str(ready),
               "--state-dir", str(self.state_dir), *self.extra_args]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DeploymentError(f"the attested server exited with code {self.proc.returncode}:\n"
                                      f"{self.log_text()[-2000:]}")
            if ready.exists():
                self.info = json.loads(ready.read_text())
                self.port = int(self.info["port"])
                if self._answers():
                    return self
            time.sleep(0.05)
        self.stop()
        raise PeerTimeoutError(f"the attested server did not become ready within {self.start_timeout:.0f} s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace)
        self.returncode = self.proc.returncode
        self.proc = None

    def restart(self) -> ServerProcess:
        """Stop, then start again on the same port with the same store."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
