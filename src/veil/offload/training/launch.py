"""``veil offload train`` on one machine: the enclave and the three accelerators as separate processes
(``veil party``) over mutual TLS on loopback, the data owner in the calling process.

:func:`run_train_deployment` writes a deployment (free loopback ports) and its keys into ``workdir``,
starts the four processes, plays the owner, and makes sure every process ends: when one fails or the
deadline passes, the rest are killed and the error names the failing parties and their last log lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veil.errors import VeilError
from veil.net.ports import free_ports
from veil.offload.training.party import TRAIN_PARTIES, owner_request, run_owner

__all__ = ["run_train_deployment"]

_PROCS = tuple(p for p in TRAIN_PARTIES if p != "owner")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        txt = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(txt[-lines:])


def run_train_deployment(workdir: str | Path, options: dict[str, Any], timeout: float = 3600.0,
                         recv_timeout: float = 60.0, on_progress: Callable[[dict[str, Any]], None] | None = None,
                         kill_after_steps: tuple[str, int] | None = None,
                         request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train over four local processes + this one (owner); returns the enclave's report with ``onnx``.

    ``options``: the deployment's ``[options]`` (see :mod:`veil.offload.training.party`); ``task`` and
    ``hazmat_allow_simulation`` must be set by the caller. ``kill_after_steps = (party, k)`` (tests) kills that
    party's process after the k-th progress message. ``request``: the owner's request if the caller built it
    already (:func:`~veil.offload.training.party.owner_request` of the same options)."""
    from veil.net import connect_tls, create_keys, write_deployment

    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    ports = free_ports(len(TRAIN_PARTIES))
    dep = write_deployment(wd / "deployment.toml", "veil-offload-train", "offload",
                           {p: f"127.0.0.1:{port}" for p, port in zip(TRAIN_PARTIES, ports, strict=True)},
                           timeout=recv_timeout, options={"task": "train", **options})
    if not (wd / "keys" / "ca" / "ca.pem").exists():
        create_keys(dep)
    if request is None:
        request = owner_request(dep.options, base=wd)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {p: wd / f"{p}.log" for p in _PROCS}
    failed = threading.Event()
    stop = threading.Event()
    t0 = time.perf_counter()

    def watch() -> None:  # a dead process ends the run fast (the owner's channel is closed below)
        while not stop.is_set():
            if any(pr.poll() not in (None, 0) for pr in procs.values()):
                failed.set()
                return
            if time.perf_counter() - t0 > timeout:
                failed.set()
                return
            time.sleep(0.1)

    ch = None
    steps = [0]

    def progress(m: dict[str, Any]) -> None:
        steps[0] += 1
        if kill_after_steps is not None and steps[0] == kill_after_steps[1]:
            os.killpg(procs[kill_after_steps[0]].pid, signal.SIGKILL)
        if on_progress:
            on_progress(m)

    try:
        for p in _PROCS:
            with open(logs[p], "wb") as log:
                procs[p] = subprocess.Popen([sys.executable, "-m", "veil.cli.main", "party", "-d", str(dep.path), "--as", p],
                                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        threading.Thread(target=watch, daemon=True).start()
        ch = connect_tls(dep, "owner", ["enclave"])
        result = run_owner(ch, request, timeout=recv_timeout * 20, on_progress=progress)
        for pr in procs.values():
            pr.wait(30)
    except VeilError as e:
        time.sleep(0.5)
        bad = {p: pr.poll() for p, pr in procs.items() if pr.poll() not in (None, 0)}
        detail = "; ".join(f"{p} (exit {c}): {_tail(logs[p])}" for p, c in bad.items())
        raise VeilError(f"{e}" + (f" [processes: {detail}]" if detail else "")) from None
    finally:
        stop.set()
        if ch is not None:
            ch.close()
        for pr in procs.values():  # nothing is left running, whatever happened
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait(10)
    out = wd / str(options.get("output", "trained.onnx"))
    out.write_bytes(result["onnx"])
    result["output"] = str(out)
    result["wall_total_s"] = time.perf_counter() - t0
    return result
