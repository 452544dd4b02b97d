#!/usr/bin/env python3
"""Benchmark offload training: per-step cost (plaintext torch, enclave-only, offload), bytes between
the enclave and the accelerators, the enclave's share of the time, the fixed-point error of the
products, and two side-by-side trainings (veil offload vs plaintext torch, same initial weights, data
order and optimizer): network C on MNIST and a DeepCrossing-style model on the synthetic click data.

Parts (``--parts``):

* ``step``: per training step, best of ``--reps`` steps after a warm-up, one BLAS thread per party:
  plaintext torch float32 (forward, backward, optimizer) on the CPU; enclave-only (veil's training
  layers with every product in float64 inside the enclave process); offload (the enclave in this
  process, the three accelerators as separate processes over mutual TLS on loopback, set up as
  ``veil offload train`` does: a deployment with free loopback ports, its keys, ``serve_train_accelerator``
  in each process; ``--transport threads`` runs them as threads of this process over in-memory
  channels instead, where they share one interpreter lock with the enclave). ``--backend`` is what
  the accelerator processes compute with (``torch-cuda``: every accelerator process on the GPU).
  Enclave share = enclave work (layers, loss, optimizer, masking, Freivalds, reconstruction) /
  offload step time. Enclave work ms = that work per step; enclave-only (layers) = the enclave-only
  step and, in brackets, its part outside the products. Ceiling x = enclave-only / enclave work: the
  speed-up over enclave-only that offload reaches at best, with accelerators and a network that take no
  time (the enclave's own work remains); enclave-only / layers is the same bound with a free protocol too.
  Enclave work (layers): in brackets its part outside the engine (layers, loss, optimizer: no im2col or
  col2im, which the accelerators do). Mask floor = the time of the two AES-CTR mask streams over the
  operand elements sent (bytes to acc / 8), at the rate measured in the same run: any masking protocol
  pays at least that; floor x = enclave-only / (offload's layers + mask floor), the ceiling if the
  protocol did nothing else.
  Accel compute = the three accelerators' time inside their product requests during the timed steps,
  summed (in brackets per step: the triple helper accelerator2 / the slower share holder). Bytes = payload enclave <-> accelerators per step (without TLS
  framing). Product error = max |offload product - float64 product| / max |float64 product| over
  the products of one more step (forward, dX, dW), every product offloaded. ``--nets`` picks the
  networks (C, DeepCrossing); ``--step-precision`` the secure products per product (single: one,
  double: three, rows for each). The host (cores,
  CPU, GPU, torch) is printed above the table and stored in the JSON (``host``).
* side-by-side parts also train torch in float64 (same everything): how far precision alone moves
  the held-out figures, the scale against which veil's difference is read;
* ``mnist``: network C trained on images 0..N-1 (``--mnist-train``, default 8000) of the shared MNIST
  file (``VEIL_MNIST`` or ``../shared/data/mnist_test.npz``), held-out accuracy on images 8000..9999;
* ``clicks``: DeepCrossing-style model on the synthetic click data (``--click-n`` training samples,
  2000 held-out samples of the same generator), held-out log-loss, accuracy and AUC.

Both training parts write one PNG (``--png``) with the loss curves of veil offload and torch.

Usage: ``python bench/bench_offload_train.py [--parts step,mnist,clicks] [--batch 128] [--backend numpy]
[--transport processes|threads] [--nets C,DeepCrossing] [--step-precision single,double] [--mnist-train 8000]
[--epochs 1] [--train-batch 64] [--click-n 8000] [--click-epochs 3] [--reps 3] [--png docs/offload_train_curves.png] [--json out.json]``. ``--backend torch-cuda`` runs the
accelerators on a GPU when one is present.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from veil.net.local import run_local  # noqa: E402
from veil.offload import SimulatedEnclaveRuntime  # noqa: E402
from veil.offload.examples import mnist_module  # noqa: E402
from veil.offload.training import (  # noqa: E402
    TRAIN_ACCELERATORS,
    PlainMatmul,
    SecureMatmul,
    TrainAccelerator,
    TrainConfig,
    Trainer,
    epoch_order,
    load_mnist,
    serve_train_accelerator,
    synthetic_clicks,
    train_offload_local,
)
from veil.offload.training.models import click_inputs, deep_crossing, torch_to_graph  # noqa: E402
from veil.offload.training.precision import FieldArithmeticMatmul, PrecisionMatmul  # noqa: E402
from veil.offload.training.protocol import masks_u32  # noqa: E402

console = Console(width=220)
torch.set_num_threads(1)


def runtime() -> SimulatedEnclaveRuntime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SimulatedEnclaveRuntime(hazmat_allow_simulation=True)


# --- models ------------------------------------------------------------------------------------------
def model_c(seed: int):
    torch.manual_seed(seed)
    mod = mnist_module("C")
    return mod, torch_to_graph(mod, torch.zeros(1, 1, 28, 28))


def model_dc(vocab, dense: int, seed: int):
    mod = deep_crossing(vocab, dense, d=16, hidden=32, units=2, seed=seed)
    ex = tuple(torch.zeros(1, v) for v in vocab) + (torch.zeros(1, dense),)
    return mod, torch_to_graph(mod, ex, click_inputs(vocab), "p")


def torch_opt(mod, spec: dict):
    if spec["name"] == "sgd":
        return torch.optim.SGD(mod.parameters(), lr=spec["lr"], momentum=spec.get("momentum", 0.0))
    return torch.optim.Adam(mod.parameters(), lr=spec["lr"])


def torch_loss(out, y, loss: str):
    if loss == "bce":
        return torch.nn.functional.binary_cross_entropy(out.reshape(-1), torch.as_tensor(y, dtype=out.dtype))
    return torch.nn.functional.cross_entropy(out, torch.as_tensor(y))


def torch_forward(mod, feeds: dict, names: list[str]):
    return mod(*[torch.as_tensor(feeds[n]) for n in names])


# --- part 1: per-step cost ---------------------------------------------------------------------------
class RecordingAccelerator(TrainAccelerator):
    """Logs (wall-clock start, seconds) of every request it computes, so the benchmark can add up the
    accelerator work of exactly the timed steps (also across processes: same host clock)."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.log: list[tuple[float, float]] = []

    def handle(self, msg):
        t0, c0 = time.time(), self.compute_s
        out = super().handle(msg)
        if self.compute_s != c0:
            self.log.append((t0, self.compute_s - c0))
        return out


def _accelerator_process(dep_path: str, name: str, backend: str, timeout: float, q) -> None:
    """Entry point of one accelerator process (``--transport processes``): mutual TLS to the enclave, as
    ``veil party`` runs it; sends its request log back through ``q``."""
    from veil.net import connect_tls, load_deployment

    try:
        acc = RecordingAccelerator(backend)
        dep = load_deployment(dep_path)
        ch = connect_tls(dep, name, ["enclave"])
        s = serve_train_accelerator(ch, "enclave", accelerator=acc, idle_timeout=timeout)
        q.put({"name": name, "backend": s["backend"], "log": acc.log})
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        q.put({"name": name, "error": f"{type(e).__name__}: {e}"})


def run_with_accelerators(session, backend: str, transport: str, timeout: float = 600.0):
    """``session(channel)`` as the enclave, with the three accelerators as threads of this process over
    in-memory channels (``threads``) or as three processes over mutual TLS on loopback (``processes``).
    Returns (session's result, {accelerator: (backend name, request log)})."""
    if transport == "threads":
        accs = {a: RecordingAccelerator(backend) for a in TRAIN_ACCELERATORS}

        def acc_body(name):
            return lambda ch: serve_train_accelerator(ch, "enclave", accelerator=accs[name], idle_timeout=timeout)

        res, _ = run_local({"enclave": session, **{a: acc_body(a) for a in TRAIN_ACCELERATORS}}, timeout=timeout)
        return res["enclave"], {a: (accs[a].backend.name, accs[a].log) for a in TRAIN_ACCELERATORS}
    if transport != "processes":
        raise SystemExit(f"--transport must be threads or processes, not {transport!r}")
    import multiprocessing as mp
    import queue
    import tempfile

    from veil.net import connect_tls, create_keys, write_deployment
    from veil.net.ports import free_ports
    from veil.offload.backend import select_backend

    select_backend(backend)  # an unknown backend, or torch-cuda without a GPU, fails here at once (same host)
    with tempfile.TemporaryDirectory(prefix="veil-bench-train-") as wd:
        names = ("enclave", *TRAIN_ACCELERATORS)
        dep = write_deployment(os.path.join(wd, "deployment.toml"), "bench-offload-train", "offload",
                               {p: f"127.0.0.1:{port}" for p, port in zip(names, free_ports(len(names)), strict=True)},
                               timeout=timeout)
        create_keys(dep)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_accelerator_process, args=(str(dep.path), a, backend, timeout, q), daemon=True)
                 for a in TRAIN_ACCELERATORS]
        for pr in procs:
            pr.start()
        try:
            ch = connect_tls(dep, "enclave", TRAIN_ACCELERATORS, connect_timeout=180)
            try:
                with ch.aborting():
                    result = session(ch)
            finally:
                ch.close()
            reports = {}
            for _ in procs:
                try:
                    r = q.get(timeout=60)
                except queue.Empty:
                    raise SystemExit("an accelerator process sent no report within 60 s") from None
                if "error" in r:
                    raise SystemExit(f"accelerator process {r['name']} failed: {r['error']}")
                reports[r["name"]] = (r["backend"], r["log"])
        finally:
            for pr in procs:  # the processes this function started, and only those
                pr.join(15)
                if pr.is_alive():
                    pr.kill()
                    pr.join(5)
    return result, reports


class ErrorProbe(PrecisionMatmul):
    """Also computes each product (and each convolution's forward and backward) in float64 to record the
    fixed-point error (bench only)."""

    def __init__(self, inner, precision: str):
        super().__init__(inner, precision)
        self.errors: list[tuple[str, float]] = []
        self._ref = PlainMatmul()
        self._in_conv = False  # products inside a convolution are measured as the convolution's result

    def _record(self, label: str, got: np.ndarray, ref: np.ndarray) -> None:
        self.errors.append((label, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))))

    def matmuls(self, pairs):
        outs = super().matmuls(pairs)
        if not self._in_conv:
            for (u, v), o in zip(pairs, outs, strict=True):
                self._record(f"{u.shape[0]}x{u.shape[1]}x{v.shape[1]}", o, u @ v)
        return outs

    def conv_forward(self, x, w, strides, pads):
        self._in_conv = True
        try:
            y, ctx = super().conv_forward(x, w, strides, pads)
        finally:
            self._in_conv = False
        self._record(f"conv {x.shape} * {w.shape}", y, self._ref.conv_forward(x, w, strides, pads)[0])
        return y, ctx

    def conv_backward(self, x, w, g, strides, pads, ctx, need_dx):
        self._in_conv = True
        try:
            dx, dw = super().conv_backward(x, w, g, strides, pads, ctx, need_dx)
        finally:
            self._in_conv = False
        rdx, rdw = self._ref.conv_backward(x, w, g, strides, pads, self._ref.conv_forward(x, w, strides, pads)[1], need_dx)
        self._record(f"conv dW {w.shape}", dw, rdw)
        if dx is not None:
            self._record(f"conv dX {x.shape}", dx, rdx)
        return dx, dw


def step_costs(name: str, mod, graph, feeds: dict, y: np.ndarray, loss: str, reps: int, backend: str,
               min_intensity: float, transport: str, precision: str) -> dict:
    n = len(y)
    cfg = TrainConfig(optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}, batch_size=n, seed=0, loss=loss, epochs=100,
                      precision=precision)
    names = [s.name for s in graph.inputs]
    # plaintext torch
    tm = copy.deepcopy(mod).float()
    opt = torch_opt(tm, cfg.optimizer)

    def torch_step():
        opt.zero_grad()
        torch_loss(torch_forward(tm, feeds, names), y, loss).backward()
        opt.step()

    ts = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        torch_step()
        if i:
            ts.append(time.perf_counter() - t0)
    t_torch = min(ts)
    # enclave-only
    tr = Trainer(graph, feeds, y, cfg)
    eng = PlainMatmul()
    ts, prods = [], []
    for i in range(reps + 1):
        p0 = eng.counters["enclave_s"]
        t0 = time.perf_counter()
        tr.step(eng)
        if i:
            ts.append(time.perf_counter() - t0)
            prods.append(eng.counters["enclave_s"] - p0)
    best = int(np.argmin(ts))
    t_enc, t_enc_layers = ts[best], ts[best] - prods[best]  # the same step: its layers = all but the products
    # offload: one session of the enclave with the accelerators: a warm-up step, reps timed steps, then one
    # step with every product offloaded and compared with float64 (the fixed-point error)
    tr = Trainer(graph, feeds, y, cfg)
    rt = runtime()

    def session(ch):
        eng = SecureMatmul(ch, rt, timeout=600, min_intensity=min_intensity)
        tr.step(eng)  # warm-up (first use of the device, allocations)
        c0, e0, s0 = dict(eng.counters), dict(tr.timing), (ch.stats.bytes_sent, ch.stats.bytes_recv)
        t_start, times = time.time(), []
        for _ in range(reps):
            t0 = time.perf_counter()
            tr.step(eng)
            times.append(time.perf_counter() - t0)
        t_end = time.time()
        c = {k: v - c0.get(k, 0) for k, v in eng.counters.items()}
        layers = tr.timing["enclave_s"] - e0["enclave_s"]  # the step outside the engine: layers, loss, optimizer
        enclave_work = layers + c["enclave_s"]
        sent, recv = ch.stats.bytes_sent - s0[0], ch.stats.bytes_recv - s0[1]
        probe = ErrorProbe(SecureMatmul(ch, rt, timeout=600), precision)  # every product offloaded
        try:
            tr.step(probe)
        finally:
            probe.close()
        return {"times": times, "window": (t_start, t_end), "counters": c, "enclave_work": enclave_work, "layers": layers,
                "bytes": (sent, recv), "errors": probe.errors}

    r, accs = run_with_accelerators(session, backend, transport)
    aes_ns = mask_ns_per_element()
    lo, hi = r["window"]
    per_acc = {a: sum(dt for t, dt in log if lo <= t <= hi) / reps for a, (_, log) in accs.items()}
    accel = sum(per_acc.values()) * reps
    c, wall = r["counters"], sum(r["times"])
    errs = [e for _, e in r["errors"]]
    return {"net": name, "min_intensity": min_intensity, "local_products": c.get("local_products", 0) / reps,
            "batch": n, "transport": transport, "precision": precision,
            "torch_ms": t_torch * 1e3, "enclave_only_ms": t_enc * 1e3,
            "offload_ms": min(r["times"]) * 1e3, "offload_mean_ms": wall / reps * 1e3,
            "enclave_share": r["enclave_work"] / wall, "accel_compute_ms": accel / reps * 1e3,
            # the enclave's own work per step (layers, loss, optimizer, masking, checks, reconstruction), and
            # the enclave-only step's layers (everything but its products): the ceiling of offload's speed-up
            # over enclave-only with accelerators and network that take no time is enclave-only / enclave work;
            # with a free protocol too it is enclave-only / layers
            "enclave_work_ms": r["enclave_work"] / reps * 1e3, "enclave_only_layers_ms": t_enc_layers * 1e3,
            "ceiling_x": t_enc / max(r["enclave_work"] / reps, 1e-12),
            # a floor under any masking protocol: the two AES-CTR mask streams over every operand element sent
            # (E and F go to both share holders, 4 bytes each: bytes to acc / 8 elements); "floor x" is
            # enclave-only / (offload's layers + that floor): the ceiling if the protocol did nothing but expand
            # masks (offload's layers: the step outside the engine, without enclave-only's im2col/col2im)
            "mask_ns_per_element": aes_ns,
            "mask_floor_ms": 2 * r["bytes"][0] / reps / 8 * aes_ns * 1e-6,
            "offload_layers_ms": r["layers"] / reps * 1e3, "protocol_ms": c["enclave_s"] / reps * 1e3,
            "floor_x": t_enc / max(r["layers"] / reps + 2 * r["bytes"][0] / reps / 8 * aes_ns * 1e-9, 1e-12),
            # per accelerator: the triple helper (accelerator2) vs the two share holders
            "accel_ms": {a: v * 1e3 for a, v in per_acc.items()},
            "bytes_to_acc": r["bytes"][0] / reps, "bytes_from_acc": r["bytes"][1] / reps,
            "products": c["products"] / reps, "rounds": c["rounds"] / reps, "macs": c["macs"] / reps,
            "max_rel_product_error": max(errs), "median_rel_product_error": float(np.median(errs)),
            "backend": next(iter(accs.values()))[0]}


def mask_ns_per_element(count: int = 1 << 21, reps: int = 3) -> float:
    """Nanoseconds per field element of the enclave's mask expansion (:func:`masks_u32`, AES-256-CTR), best of
    ``reps`` on ``count`` elements."""
    best = math.inf
    for _ in range(reps + 1):
        seed = os.urandom(32)
        t0 = time.perf_counter()
        masks_u32(seed, count)
        best = min(best, time.perf_counter() - t0)
    return best / count * 1e9


def host_info() -> dict:
    """What the figures were measured on (printed above the table and stored in the JSON)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:  # Linux: the CPU model name
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


# --- parts 2/3: side-by-side training ----------------------------------------------------------------
def side_by_side(mod, graph, feeds, y, cfg: TrainConfig, backend: str, evaluate, label: str,
                 min_intensity: float, engine: str = "protocol") -> dict:
    names = [s.name for s in graph.inputs]
    # plaintext torch: same initial weights (the module the graph came from), same order, same optimizer;
    # in float32 (the reference) and float64 (how far precision alone moves the result)
    n = len(y)
    runs = {}
    # held-out figures after every epoch (the last one is the final result): one run gives 1, 2, ... epochs
    per_epoch: list[dict] = [{"epoch": e + 1} for e in range(cfg.epochs)]
    for dt in (torch.float32, torch.float64):
        tm = copy.deepcopy(mod).to(dt)
        opt = torch_opt(tm, cfg.optimizer)
        losses = []
        t0 = time.perf_counter()
        t_eval = 0.0
        for ep in range(cfg.epochs):
            if ep:
                te = time.perf_counter()
                with torch.no_grad():
                    per_epoch[ep - 1]["torch" if dt == torch.float32 else "torch64"] = evaluate(
                        lambda f, tm=tm, dt=dt: torch_forward(tm, {k: v.astype(np.float32 if dt == torch.float32 else np.float64)
                                                                   for k, v in f.items()}, names).numpy().astype(np.float64))
                t_eval += time.perf_counter() - te
            order = epoch_order(cfg.seed, ep, n)
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                opt.zero_grad()
                batch = {k: v[idx].astype(np.float32 if dt == torch.float32 else np.float64) for k, v in feeds.items()}
                loss = torch_loss(torch_forward(tm, batch, names), y[idx], cfg.loss)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        runs[dt] = (tm.eval(), losses, time.perf_counter() - t0 - t_eval)
    tm, t_losses, t_torch = runs[torch.float32]
    tm64 = runs[torch.float64][0]
    # veil offload
    from veil.graph import load_model
    from veil.plain import run_plain

    tr = Trainer(graph, feeds, y, cfg)
    done = [0]
    t0 = time.perf_counter()
    t_eval = [0.0]

    def progress(t, loss):
        done[0] += 1
        if done[0] % 10 == 0 or t.done:
            console.print(f"  [{label}] offload step {t.step_count}/{t.total_steps} loss {loss:.4f} "
                          f"({(time.perf_counter() - t0 - t_eval[0]) / done[0]:.2f} s/step)")
        if t.pos == 0 and not t.done:  # an epoch ended: the owner's model of this moment, plain executor
            te = time.perf_counter()
            g_ep = load_model(t.onnx_bytes())
            row = per_epoch[t.epoch - 1]
            row["veil"] = evaluate(lambda f: next(iter(run_plain(g_ep, f).values())).astype(np.float64))
            console.print(f"  [{label}] after epoch {t.epoch}: " + ", ".join(
                f"{k} torch f32 {row['torch'][k]:.4f} torch f64 {row['torch64'][k]:.4f} veil {row['veil'][k]:.4f}"
                for k in row["veil"]))
            t_eval[0] += time.perf_counter() - te

    if engine == "field":  # the protocol's arithmetic without masks or accelerators: bit-identical parameters
        eng = FieldArithmeticMatmul(min_intensity)
        tr.train(eng, on_step=progress)
        counters, nbytes = eng.counters, None
    else:
        run = train_offload_local(tr, runtime(), backend=backend, timeout=600, on_step=progress,
                                  min_intensity=min_intensity)
        counters, nbytes = run.counters, run.stats["enclave"].bytes_sent + run.stats["enclave"].bytes_recv
    t_off = time.perf_counter() - t0 - t_eval[0]
    with torch.no_grad():
        ev_t = evaluate(lambda f: torch_forward(tm, f, names).numpy().astype(np.float64))
        ev_t64 = evaluate(lambda f: torch_forward(tm64, {k: v.astype(np.float64) for k, v in f.items()}, names).numpy())
    g2 = load_model(tr.onnx_bytes())  # what the owner receives, run by the plain executor
    ev_v = evaluate(lambda f: next(iter(run_plain(g2, f).values())).astype(np.float64))
    per_epoch[-1].update({"torch": ev_t, "torch64": ev_t64, "veil": ev_v})
    return {"torch_losses": t_losses, "veil_losses": list(tr.history), "torch": ev_t, "veil": ev_v, "torch64": ev_t64,
            "per_epoch": per_epoch, "precision": cfg.precision, "engine": engine,
            "torch_s": t_torch, "offload_s": t_off, "steps": tr.step_count,
            "bytes_per_step": None if nbytes is None else nbytes / max(tr.step_count, 1),
            "enclave_share": None if engine == "field" else (tr.timing["enclave_s"] + counters["enclave_s"]) / t_off}


def auc(score: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (title, r) in zip(axes[0], curves.items(), strict=True):
        ax.plot(r["torch_losses"], label="plaintext torch (float32)", lw=1.0, alpha=0.8)
        how = "enclave + 3 accelerators" if r.get("engine", "protocol") == "protocol" else "its field arithmetic"
        ax.plot(r["veil_losses"], label=f"veil offload, precision {r.get('precision', 'single')} ({how})", lw=1.0,
                alpha=0.8, ls="--")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (batch)")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="step,mnist,clicks")
    ap.add_argument("--batch", type=int, default=128, help="batch of the per-step part")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="numpy", help="accelerators: numpy, torch-cpu, torch-cuda, auto")
    ap.add_argument("--transport", default="processes", choices=["processes", "threads"],
                    help="step part: accelerators as 3 processes over mutual TLS on loopback, or as threads of this process")
    ap.add_argument("--nets", default="C,DeepCrossing", help="step part: networks to measure (C, DeepCrossing)")
    ap.add_argument("--step-precision", default="single,double",
                    help="step part: product precisions to measure, comma-separated (single, double)")
    ap.add_argument("--mnist-train", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--click-n", type=int, default=8000)
    ap.add_argument("--click-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-intensity", type=float, default=16.0,
                    help="products below this arithmetic intensity stay in the enclave (the step part also runs 0)")
    ap.add_argument("--train-min-intensity", type=float, default=0.0,
                    help="the same for the side-by-side trainings (default 0: every product through the accelerators)")
    ap.add_argument("--precision", default="double", choices=["single", "double"],
                    help="secure products per product in the side-by-side trainings (see veil.offload.training.precision)")
    ap.add_argument("--train-engine", default="protocol", choices=["protocol", "field"],
                    help="side-by-side trainings: protocol (enclave + 3 accelerators, masks, checks) or field (the "
                         "protocol's exact field arithmetic alone, bit-identical parameters, no security: accuracy only)")
    ap.add_argument("--png", default="docs/offload_train_curves.png")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    parts = a.parts.split(",")
    host = host_info()
    results: dict = {"config": vars(a), "host": host}
    host_line = (f"host: {host['usable_cores']}/{host['cores']} cores ({host['cpu']}), "
                 f"GPU: {host['gpu'] or 'none'}, torch {host['torch']}")
    console.print(f"{host_line}; accelerator backend {a.backend}, transport {a.transport}; "
                  f"torch threads {torch.get_num_threads()}")

    if "step" in parts:
        rows = []
        nets = a.nets.split(",")
        unknown = set(nets) - {"C", "DeepCrossing"}
        if unknown:
            raise SystemExit(f"--nets: unknown network(s) {sorted(unknown)}; choose C, DeepCrossing")
        precs = a.step_precision.split(",")
        if set(precs) - {"single", "double"}:
            raise SystemExit(f"--step-precision: choose single and/or double, not {a.step_precision!r}")
        if "C" in nets:
            xs, ys = load_mnist("train")
            mod, graph = model_c(a.seed)
            for prec in precs:
                for mi in sorted({0.0, a.min_intensity}):
                    rows.append(step_costs("C", mod, graph, {"x": xs[: a.batch]}, ys[: a.batch], "cross_entropy", a.reps,
                                           a.backend, mi, a.transport, prec))
        if "DeepCrossing" in nets:
            cd = synthetic_clicks(a.batch, seed=1)
            mod, graph = model_dc(cd.vocab, cd.dense.shape[1], a.seed)
            for prec in precs:
                for mi in sorted({0.0, a.min_intensity}):
                    rows.append(step_costs("DeepCrossing", mod, graph, cd.feeds(slice(0, a.batch)), cd.y[:a.batch], "bce", a.reps,
                                           a.backend, mi, a.transport, prec))
        t = Table(title=f"offload training, per step (best of reps; offload mean in brackets); {host_line}; "
                        f"accelerators: {rows[0]['backend'] if rows else a.backend}, {a.transport}")
        for c in ("net", "batch", "precision", "min intensity (local products)", "torch f32 ms",
                  "enclave-only ms (layers)", "offload ms", "x enclave-only", "enclave share", "enclave work ms (layers)",
                  "ceiling x", "mask floor ms (floor x)", "accel compute ms (helper / holders)", "bytes to acc", "bytes from acc", "products",
                  "rounds", "max rel. product err"):
            t.add_column(c)
        for r in rows:
            acc = r["accel_ms"]
            holders = max(acc.get(a, 0.0) for a in TRAIN_ACCELERATORS[:2])
            t.add_row(r["net"], str(r["batch"]), r["precision"], f"{r['min_intensity']:g} ({r['local_products']:.0f})", f"{r['torch_ms']:.1f}",
                      f"{r['enclave_only_ms']:.1f} ({r['enclave_only_layers_ms']:.0f})",
                      f"{r['offload_ms']:.0f} ({r['offload_mean_ms']:.0f})", f"{r['offload_ms'] / r['enclave_only_ms']:.1f}",
                      f"{r['enclave_share']:.0%}", f"{r['enclave_work_ms']:.0f} ({r['offload_layers_ms']:.0f})", f"{r['ceiling_x']:.2f}",
                      f"{r['mask_floor_ms']:.0f} ({r['floor_x']:.2f})",
                      f"{r['accel_compute_ms']:.0f} ({acc.get(TRAIN_ACCELERATORS[2], 0.0):.0f} / {holders:.0f})",
                      f"{r['bytes_to_acc']:,.0f}",
                      f"{r['bytes_from_acc']:,.0f}", f"{r['products']:.0f}", f"{r['rounds']:.0f}",
                      f"{r['max_rel_product_error']:.1e}")
        console.print(t)
        results["step"] = rows

    curves: dict = {}
    if "mnist" in parts:
        x, y = load_mnist("train")
        x, y = x[: a.mnist_train], y[: a.mnist_train]
        xh, yh = load_mnist("heldout")
        mod, graph = model_c(a.seed)
        opt = {"name": a.optimizer, "lr": a.lr, **({"momentum": 0.9} if a.optimizer == "sgd" else {})}
        cfg = TrainConfig(optimizer=opt, epochs=a.epochs, batch_size=a.train_batch, seed=a.seed, precision=a.precision)

        def ev_mnist(fwd):
            logits = np.concatenate([fwd({"x": xh[i:i + 500]}) for i in range(0, len(yh), 500)])
            return {"accuracy": float((logits.argmax(-1) == yh).mean())}

        r = side_by_side(mod, graph, {"x": x}, y, cfg, a.backend, ev_mnist, "C", a.train_min_intensity, a.train_engine)
        r["config"] = cfg.as_dict() | {"train_images": len(y)}
        curves[f"C / MNIST 0..{len(y) - 1}"] = r
        results["mnist"] = r
    if "clicks" in parts:
        data = synthetic_clicks(a.click_n + 2000, seed=7)
        tr_idx, ho_idx = slice(0, a.click_n), slice(a.click_n, a.click_n + 2000)
        mod, graph = model_dc(data.vocab, data.dense.shape[1], a.seed)
        cfg = TrainConfig(optimizer={"name": "adam", "lr": 3e-3}, epochs=a.click_epochs, batch_size=128, seed=a.seed,
                          loss="bce", precision=a.precision)
        yh = data.y[ho_idx]
        fh = data.feeds(ho_idx)

        def ev_clicks(fwd):
            p = np.clip(fwd(fh).reshape(-1), 1e-7, 1 - 1e-7)
            return {"logloss": float(-(yh * np.log(p) + (1 - yh) * np.log(1 - p)).mean()),
                    "accuracy": float(((p > 0.5) == yh).mean()), "auc": auc(p, yh)}

        r = side_by_side(mod, graph, data.feeds(tr_idx), data.y[tr_idx], cfg, a.backend, ev_clicks, "clicks",
                         a.train_min_intensity, a.train_engine)
        r["config"] = cfg.as_dict() | {"train_samples": a.click_n}
        curves[f"DeepCrossing / clicks ({a.click_n})"] = r
        results["clicks"] = r
    if curves:
        t = Table(title="side by side: veil offload vs plaintext torch (same init, order, optimizer)")
        for c in ("model", "precision (engine)", "epochs (steps)", "metric (held-out)", "torch", "torch f64", "veil offload",
                  "veil - torch", "veil - torch f64", "torch s", "offload s", "bytes/step", "enclave share"):
            t.add_column(c)
        for title, r in curves.items():
            for row in r["per_epoch"]:
                last = row["epoch"] == len(r["per_epoch"])
                steps = f"{row['epoch']} ({r['steps'] * row['epoch'] // len(r['per_epoch'])})"
                for k in row["veil"]:
                    t.add_row(title, f"{r['precision']} ({r['engine']})", steps, k, f"{row['torch'][k]:.4f}", f"{row['torch64'][k]:.4f}",
                              f"{row['veil'][k]:.4f}", f"{row['veil'][k] - row['torch'][k]:+.4f}",
                              f"{row['veil'][k] - row['torch64'][k]:+.4f}",
                              *((f"{r['torch_s']:.0f}", f"{r['offload_s']:.0f}",
                                 "-" if r["bytes_per_step"] is None else f"{r['bytes_per_step']:,.0f}",
                                 "-" if r["enclave_share"] is None else f"{r['enclave_share']:.0%}")
                                if last else ("", "", "", "")))
        console.print(t)
        plot(curves, a.png)
        console.print(f"loss curves written to {a.png}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
