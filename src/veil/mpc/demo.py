"""``veil demo``: a shipped network on the shipped held-out images, with five local processes.

:func:`run_local_deployment` writes a deployment (free loopback ports) and its keys into a temporary
directory, starts ``veil party`` for owner, user, server0, server1 and dealer as separate
processes talking over mutual TLS, and makes sure every process ends: if one fails or the
deadline passes, the rest are killed. :func:`run_demo` adds the plaintext reference and a table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import VeilError
from veil.mpc.party import report_path
from veil.mpc.roles import PARTIES
from veil.net.ports import free_ports
from veil.options import check_batch_size

__all__ = ["run_demo", "run_local_deployment"]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        txt = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(txt[-lines:])


def run_local_deployment(model: str | Path, x: Any, workdir: str | Path, batch_size: int | None = None,
                         frac_bits: int = 16, timeout: float = 300.0, recv_timeout: float = 60.0,
                         tamper: Any = None, kill_after: tuple[str, float] | None = None,
                         on_progress: Any = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the five parties as processes over loopback TLS; return the user's outputs and report.

    ``tamper(keys_dir)`` (tests) may alter the keys before the processes start; ``kill_after =
    (party, seconds)`` (tests) kills that party's process ``seconds`` after it has connected to its
    peers (its log says so), i.e. mid-run however slowly the processes start; ``on_progress(text, done, total)``
    is called as keys are made and parties finish (for progress bars); ``options`` are merged into the
    deployment's options after the defaults (e.g. ``{"llama2c": path, "steps": 20, "prompt": [1]}`` for
    generation, whose ``outputs.npz`` then holds ``ids``). Raises
    :class:`VeilError` naming the failing parties and their last error lines."""
    from veil.mpc.api import check_options
    from veil.net import create_keys, write_deployment

    frac_bits, batch_size, timeout = check_options(frac_bits, batch_size, timeout)
    wd = Path(workdir)
    if isinstance(x, dict):  # named inputs (.npz), e.g. from load_inputs on an .npz file
        inputs_file = "inputs.npz"
        np.savez(wd / inputs_file, **{k: np.asarray(v) for k, v in x.items()})  # type: ignore[arg-type]  # numpy stubs check **kwds against allow_pickle
    else:
        inputs_file = "inputs.npy"
        np.save(wd / inputs_file, np.asarray(x))
    ports = free_ports(len(PARTIES))
    opts: dict[str, Any] = {"model": str(Path(model).resolve()), "inputs": inputs_file, "outputs": "outputs.npz",
                            "frac_bits": frac_bits}
    if batch_size is not None:
        opts["batch_size"] = batch_size
    opts.update(options or {})
    dep = write_deployment(wd / "deployment.toml", "veil-mpc-demo", "mpc",
                           {p: f"127.0.0.1:{port}" for p, port in zip(PARTIES, ports, strict=True)},
                           timeout=recv_timeout, options=opts)
    total = len(PARTIES) + 1
    report_progress = on_progress or (lambda text, done, total: None)
    report_progress("creating deployment keys", 0, total)
    create_keys(dep)
    report_progress("parties running: TLS handshakes, weight sharing, offline and online phases", 1, total)
    if tamper is not None:
        tamper(dep.keys_dir)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {p: wd / f"{p}.log" for p in PARTIES}
    t0 = time.perf_counter()
    try:
        for p in PARTIES:
            with open(logs[p], "wb") as log:
                procs[p] = subprocess.Popen([sys.executable, "-m", "veil.cli.main", "party", "-d", str(dep.path), "--as", p],
                                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = t0 + timeout
        first_fail: float | None = None
        victim_connected: float | None = None
        while any(pr.poll() is None for pr in procs.values()):
            now = time.perf_counter()
            running = [p for p, pr in procs.items() if pr.poll() is None]
            report_progress(f"parties running: {', '.join(running)}", total - len(running), total)
            if kill_after is not None and victim_connected is None and "connected to" in _tail(logs[kill_after[0]], 50):
                victim_connected = now
            if kill_after is not None and victim_connected is not None and now - victim_connected > kill_after[1] \
                    and procs[kill_after[0]].poll() is None:
                os.killpg(procs[kill_after[0]].pid, signal.SIGKILL)
                kill_after = None
            if any(pr.returncode not in (None, 0) for pr in procs.values()) and first_fail is None:
                first_fail = now
            if now > deadline or (first_fail is not None and now - first_fail > 15):
                break
            time.sleep(0.05)
    finally:
        for pr in procs.values():  # nothing is left running, whatever happened
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait(10)
    wall = time.perf_counter() - t0
    codes = {p: pr.returncode for p, pr in procs.items()}
    if any(c != 0 for c in codes.values()):
        bad = {p: c for p, c in codes.items() if c != 0}
        detail = "; ".join(f"{p} (exit {c}): {_tail(logs[p])}" for p, c in bad.items())
        raise VeilError(f"mpc deployment failed after {wall:.1f} s: {detail}")
    with np.load(wd / "outputs.npz") as f:
        outputs = {k: f[k] for k in f.files}
    report = json.loads(report_path(wd / "outputs.npz").read_text())
    return {"outputs": outputs, "report": report, "wall_s": wall, "logs": {p: _tail(v, 5) for p, v in logs.items()}}


def run_demo(model: str = "C", n: int = 64, console: Any = None, batch_size: int | None = None,
             timeout: float = 600.0) -> dict[str, Any]:
    """Network ``model`` on the first ``n`` of the 2000 shipped held-out images (MNIST test images
    8000..9999; the networks were trained on 0..7999): secure (5 processes, TLS) next to
    plaintext; prints a table and returns the figures. ``batch_size`` defaults to min(n, 256)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from veil.assets import HELDOUT, load_slice, model_path
    from veil.graph import load_model
    from veil.plain import run_plain

    console = console or Console()
    x, y = load_slice(n)
    batch_size = check_batch_size(batch_size) or min(n, 256)
    which = f"{n} held-out images (MNIST test 8000..{8000 + n - 1}" + (")" if n == HELDOUT else f", of the {HELDOUT})")
    path = model_path(model)
    graph = load_model(path)
    run_plain(graph, x[:1])  # warm-up
    t = time.perf_counter()
    plain = next(iter(run_plain(graph, x).values()))
    plain_s = time.perf_counter() - t
    ort_s = _onnxruntime_seconds(path, x)
    console.print(f"[bold]veil mpc demo[/]: network {model.upper()}, {which}, "
                  "5 processes (owner, user, server0, server1, dealer) over mutual TLS on loopback")
    with tempfile.TemporaryDirectory(prefix="veil-mpc-demo-") as tmp, Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True) as bar:
        task = bar.add_task("starting", total=len(PARTIES) + 1)

        def show(text: str, done: int, total: int) -> None:
            bar.update(task, description=text, completed=done, total=total)

        res = run_local_deployment(path, x, tmp, batch_size=batch_size, timeout=timeout, on_progress=show)
    sec = res["outputs"]["logits"]
    rep = res["report"]
    acc_s, acc_p = float((sec.argmax(1) == y).mean()), float((plain.argmax(1) == y).mean())
    agree = float((sec.argmax(1) == plain.argmax(1)).mean())
    err = float(np.abs(sec - plain).max())
    tab = Table(title=f"network {model.upper()}: secure (mpc) vs plaintext, {which}")
    for c in ("", "mpc (secure)", "plaintext"):
        tab.add_column(c)
    rows = [("accuracy", f"{acc_s:.2%}", f"{acc_p:.2%}"), ("agreement with plaintext", f"{agree:.2%}", "-"),
            ("max |logit error|", f"{err:.1e}", "-"),
            ("time online", f"{rep['online_s'] * 1e3:.0f} ms",
             f"{ort_s * 1e3:.1f} ms onnxruntime, {plain_s * 1e3:.1f} ms veil's NumPy executor"),
            ("time offline (dealer)", f"{rep['offline_s'] * 1e3:.0f} ms", "-"),
            ("bytes online", f"{rep['online_bytes'] / 1e6:.2f} MB", "-"),
            ("bytes offline", f"{rep['offline_bytes'] / 1e6:.2f} MB", "-"),
            ("rounds (server0, online)", str(rep["rounds"]), "-")]
    for r in rows:
        tab.add_row(*r)
    console.print(tab)
    queries = f"{rep['queries']} {'query' if rep['queries'] == 1 else 'queries'}"
    console.print(f"{queries} of batch {rep['batch']}; setup (weights shared once) "
                  f"{rep['setup_bytes'] / 1e6:.2f} MB; whole run incl. process start and TLS {res['wall_s']:.1f} s; "
                  f"online slowdown vs onnxruntime {rep['online_s'] / max(ort_s, 1e-9):.0f}x")
    return {"accuracy": acc_s, "plain_accuracy": acc_p, "agreement": agree, "max_abs_error": err, "report": rep,
            "plain_s": plain_s, "onnxruntime_s": ort_s, "wall_s": res["wall_s"]}


def _onnxruntime_seconds(path: Path, x: np.ndarray) -> float:
    """Plaintext time of the same batch with onnxruntime (what a user compares with), after a warm-up."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = np.ascontiguousarray(x, np.float32)
    sess.run(None, {name: feed[:1]})
    t = time.perf_counter()
    sess.run(None, {name: feed})
    return time.perf_counter() - t
