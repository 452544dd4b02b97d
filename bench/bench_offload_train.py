#!/usr/bin/env python3
"""Benchmark offload training: per-step cost (plaintext torch, enclave-only, offload), bytes between
the enclave and the accelerators, the enclave's share of the time, the fixed-point error of the
products, and two side-by-side trainings (veil offload vs plaintext torch, same initial weights, data
order and optimizer): network C on MNIST and a DeepCrossing-style model on the synthetic click data.

Parts (``--parts``):

* ``step``: per training step, best of ``--reps`` steps after a warm-up, one BLAS thread per party:
  plaintext torch float32 (forward, backward, optimizer) on the CPU; enclave-only (veil's training
  layers with every product in float64 inside the enclave process); offload (enclave + three
  accelerator threads over in-memory channels, wire encoding included; on this CPU-only machine all
  four share the same two cores). Enclave share = enclave work (layers, loss, optimizer, masking,
  Freivalds, reconstruction) / offload step time. Bytes = payload enclave <-> accelerators per step.
  Product error = max |offload product - float64 product| / max |float64 product| over the products
  of one step (forward, dX, dW).
* side-by-side parts also train torch in float64 (same everything): how far precision alone moves
  the held-out figures, the scale against which veil's difference is read;
* ``mnist``: network C trained on images 0..N-1 (``--mnist-train``, default 8000) of the shared MNIST
  file (``VEIL_MNIST`` or ``../shared/data/mnist_test.npz``), held-out accuracy on images 8000..9999;
* ``clicks``: DeepCrossing-style model on the synthetic click data (``--click-n`` training samples,
  2000 held-out samples of the same generator), held-out log-loss, accuracy and AUC.

Both training parts write one PNG (``--png``) with the loss curves of veil offload and torch.

Usage: ``python bench/bench_offload_train.py [--parts step,mnist,clicks] [--batch 128] [--backend numpy]
[--mnist-train 8000] [--epochs 1] [--train-batch 64] [--click-n 8000] [--click-epochs 3] [--reps 3]
[--png docs/offload_train_curves.png] [--json out.json]``. ``--backend torch-cuda`` runs the
accelerators on a GPU when one is present.
"""

from __future__ import annotations

import argparse
import copy
import json
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

from veil.offload import SimulatedEnclaveRuntime  # noqa: E402
from veil.offload.examples import mnist_module  # noqa: E402
from veil.offload.training import (  # noqa: E402
    PlainMatmul,
    SecureMatmul,
    TrainAccelerator,
    TrainConfig,
    Trainer,
    epoch_order,
    load_mnist,
    synthetic_clicks,
    train_offload_local,
)
from veil.offload.training.models import click_inputs, deep_crossing, torch_to_graph  # noqa: E402

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
class ErrorProbe(SecureMatmul):
    """Also computes each product in float64 to record the fixed-point error (bench only)."""

    errors: list[tuple[str, float]] = []

    def matmuls(self, pairs):
        outs = super().matmuls(pairs)
        for (u, v), o in zip(pairs, outs, strict=True):
            ref = u @ v
            ErrorProbe.errors.append((f"{u.shape[0]}x{u.shape[1]}x{v.shape[1]}",
                                      float(np.abs(o - ref).max() / max(np.abs(ref).max(), 1e-30))))
        return outs


def step_costs(name: str, mod, graph, feeds: dict, y: np.ndarray, loss: str, reps: int, backend: str,
               min_intensity: float) -> dict:
    n = len(y)
    cfg = TrainConfig(optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}, batch_size=n, seed=0, loss=loss, epochs=100)
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
    ts = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        tr.step(eng)
        if i:
            ts.append(time.perf_counter() - t0)
    t_enc = min(ts)
    # offload: warm-up step, then reps steps, each timed
    tr = Trainer(graph, feeds, y, cfg)
    rt = runtime()
    accs: list[TrainAccelerator] = []

    def factory(_: str) -> TrainAccelerator:
        a = TrainAccelerator(backend)
        accs.append(a)
        return a

    train_offload_local(tr, rt, steps=1, accelerator_factory=factory, backend=backend, timeout=600,
                        min_intensity=min_intensity)
    steps: list[dict] = []
    e0 = dict(tr.timing)

    def on_step(t, _loss, mark=[time.perf_counter()]):  # noqa: B006 - per-call timer
        now = time.perf_counter()
        steps.append({"t": now - mark[0]})
        mark[0] = now

    accs.clear()
    t0 = time.perf_counter()
    run = train_offload_local(tr, rt, steps=reps, accelerator_factory=factory, backend=backend, timeout=600,
                              on_step=on_step, min_intensity=min_intensity)
    wall = time.perf_counter() - t0
    c = run.counters
    enclave_work = (tr.timing["enclave_s"] - e0["enclave_s"]) + c["enclave_s"]
    st = run.stats["enclave"]
    # fixed-point error of one more step's products
    ErrorProbe.errors = []
    from veil.net.local import run_local
    from veil.offload.training import TRAIN_ACCELERATORS, serve_train_accelerator

    def enclave(ch):
        e = ErrorProbe(ch, rt, timeout=600)  # every product offloaded, to measure each one's error
        try:
            tr.step(e)
        finally:
            e.close()

    run_local({"enclave": enclave, **{a: (lambda ch: serve_train_accelerator(ch, backend=backend))
                                      for a in TRAIN_ACCELERATORS}}, timeout=600)
    return {"net": name, "min_intensity": min_intensity, "local_products": c.get("local_products", 0) / reps,
            "batch": n, "torch_ms": t_torch * 1e3, "enclave_only_ms": t_enc * 1e3,
            "offload_ms": min(s["t"] for s in steps) * 1e3, "offload_mean_ms": wall / reps * 1e3,
            "enclave_share": enclave_work / wall, "accel_compute_ms": sum(a.compute_s for a in accs) / reps * 1e3,
            "bytes_to_acc": st.bytes_sent / reps, "bytes_from_acc": st.bytes_recv / reps,
            "products": c["products"] / reps, "rounds": c["rounds"] / reps, "macs": c["macs"] / reps,
            "max_rel_product_error": max(e for _, e in ErrorProbe.errors),
            "median_rel_product_error": float(np.median([e for _, e in ErrorProbe.errors])),
            "backend": accs[0].backend.name if accs else backend}


# --- parts 2/3: side-by-side training ----------------------------------------------------------------
def side_by_side(mod, graph, feeds, y, cfg: TrainConfig, backend: str, evaluate, label: str,
                 min_intensity: float) -> dict:
    names = [s.name for s in graph.inputs]
    # plaintext torch: same initial weights (the module the graph came from), same order, same optimizer;
    # in float32 (the reference) and float64 (how far precision alone moves the result)
    n = len(y)
    runs = {}
    for dt in (torch.float32, torch.float64):
        tm = copy.deepcopy(mod).to(dt)
        opt = torch_opt(tm, cfg.optimizer)
        losses = []
        t0 = time.perf_counter()
        for ep in range(cfg.epochs):
            order = epoch_order(cfg.seed, ep, n)
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                opt.zero_grad()
                batch = {k: v[idx].astype(np.float32 if dt == torch.float32 else np.float64) for k, v in feeds.items()}
                loss = torch_loss(torch_forward(tm, batch, names), y[idx], cfg.loss)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        runs[dt] = (tm.eval(), losses, time.perf_counter() - t0)
    tm, t_losses, t_torch = runs[torch.float32]
    tm64 = runs[torch.float64][0]
    # veil offload
    tr = Trainer(graph, feeds, y, cfg)
    done = [0]
    t0 = time.perf_counter()

    def progress(t, loss):
        done[0] += 1
        if done[0] % 10 == 0 or t.done:
            console.print(f"  [{label}] offload step {t.step_count}/{t.total_steps} loss {loss:.4f} "
                          f"({(time.perf_counter() - t0) / done[0]:.2f} s/step)")

    run = train_offload_local(tr, runtime(), backend=backend, timeout=600, on_step=progress, min_intensity=min_intensity)
    t_off = time.perf_counter() - t0
    with torch.no_grad():
        ev_t = evaluate(lambda f: torch_forward(tm, f, names).numpy().astype(np.float64))
        ev_t64 = evaluate(lambda f: torch_forward(tm64, {k: v.astype(np.float64) for k, v in f.items()}, names).numpy())
    from veil.graph import load_model
    from veil.plain import run_plain

    g2 = load_model(tr.onnx_bytes())  # what the owner receives, run by the plain executor
    ev_v = evaluate(lambda f: next(iter(run_plain(g2, f).values())).astype(np.float64))
    st = run.stats["enclave"]
    return {"torch_losses": t_losses, "veil_losses": list(tr.history), "torch": ev_t, "veil": ev_v, "torch64": ev_t64,
            "torch_s": t_torch, "offload_s": t_off, "steps": tr.step_count,
            "bytes_per_step": (st.bytes_sent + st.bytes_recv) / max(tr.step_count, 1),
            "enclave_share": (tr.timing["enclave_s"] + run.counters["enclave_s"]) / t_off}


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
        ax.plot(r["veil_losses"], label="veil offload (enclave + 3 accelerators)", lw=1.0, alpha=0.8, ls="--")
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
    ap.add_argument("--png", default="docs/offload_train_curves.png")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    parts = a.parts.split(",")
    results: dict = {"config": vars(a)}
    console.print(f"accelerator backend {a.backend}; torch threads {torch.get_num_threads()}; "
                  f"cuda available: {torch.cuda.is_available()}")

    if "step" in parts:
        rows = []
        xs, ys = load_mnist("train")
        mod, graph = model_c(a.seed)
        for mi in sorted({0.0, a.min_intensity}):
            rows.append(step_costs("C", mod, graph, {"x": xs[: a.batch]}, ys[: a.batch], "cross_entropy", a.reps,
                                   a.backend, mi))
        cd = synthetic_clicks(max(a.batch, 256), seed=1)
        mod, graph = model_dc(cd.vocab, cd.dense.shape[1], a.seed)
        for mi in sorted({0.0, a.min_intensity}):
            rows.append(step_costs("DeepCrossing", mod, graph, cd.feeds(slice(0, 256)), cd.y[:256], "bce", a.reps,
                                   a.backend, mi))
        t = Table(title="offload training, per step (best of reps; offload mean in brackets)")
        for c in ("net", "batch", "min intensity (local products)", "torch f32 ms", "enclave-only ms", "offload ms", "x enclave-only", "enclave share",
                  "accel compute ms", "bytes to acc", "bytes from acc", "products", "rounds", "max rel. product err"):
            t.add_column(c)
        for r in rows:
            t.add_row(r["net"], str(r["batch"]), f"{r['min_intensity']:g} ({r['local_products']:.0f})", f"{r['torch_ms']:.1f}", f"{r['enclave_only_ms']:.1f}",
                      f"{r['offload_ms']:.0f} ({r['offload_mean_ms']:.0f})", f"{r['offload_ms'] / r['enclave_only_ms']:.1f}",
                      f"{r['enclave_share']:.0%}", f"{r['accel_compute_ms']:.0f}", f"{r['bytes_to_acc']:,.0f}",
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
        cfg = TrainConfig(optimizer=opt, epochs=a.epochs, batch_size=a.train_batch, seed=a.seed)

        def ev_mnist(fwd):
            logits = np.concatenate([fwd({"x": xh[i:i + 500]}) for i in range(0, len(yh), 500)])
            return {"accuracy": float((logits.argmax(-1) == yh).mean())}

        r = side_by_side(mod, graph, {"x": x}, y, cfg, a.backend, ev_mnist, "C", a.train_min_intensity)
        r["config"] = cfg.as_dict() | {"train_images": len(y)}
        curves[f"C / MNIST 0..{len(y) - 1}"] = r
        results["mnist"] = r
    if "clicks" in parts:
        data = synthetic_clicks(a.click_n + 2000, seed=7)
        tr_idx, ho_idx = slice(0, a.click_n), slice(a.click_n, a.click_n + 2000)
        mod, graph = model_dc(data.vocab, data.dense.shape[1], a.seed)
        cfg = TrainConfig(optimizer={"name": "adam", "lr": 3e-3}, epochs=a.click_epochs, batch_size=128, seed=a.seed,
                          loss="bce")
        yh = data.y[ho_idx]
        fh = data.feeds(ho_idx)

        def ev_clicks(fwd):
            p = np.clip(fwd(fh).reshape(-1), 1e-7, 1 - 1e-7)
            return {"logloss": float(-(yh * np.log(p) + (1 - yh) * np.log(1 - p)).mean()),
                    "accuracy": float(((p > 0.5) == yh).mean()), "auc": auc(p, yh)}

        r = side_by_side(mod, graph, data.feeds(tr_idx), data.y[tr_idx], cfg, a.backend, ev_clicks, "clicks",
                         a.train_min_intensity)
        r["config"] = cfg.as_dict() | {"train_samples": a.click_n}
        curves[f"DeepCrossing / clicks ({a.click_n})"] = r
        results["clicks"] = r
    if curves:
        t = Table(title="side by side: veil offload vs plaintext torch (same init, order, optimizer)")
        for c in ("model", "steps", "metric (held-out)", "torch", "torch f64", "veil offload", "difference", "torch s", "offload s",
                  "bytes/step", "enclave share"):
            t.add_column(c)
        for title, r in curves.items():
            for k in r["torch"]:
                t.add_row(title, str(r["steps"]), k, f"{r['torch'][k]:.4f}", f"{r['torch64'][k]:.4f}", f"{r['veil'][k]:.4f}",
                          f"{r['veil'][k] - r['torch'][k]:+.4f}", f"{r['torch_s']:.0f}", f"{r['offload_s']:.0f}",
                          f"{r['bytes_per_step']:,.0f}", f"{r['enclave_share']:.0%}")
        console.print(t)
        plot(curves, a.png)
        console.print(f"loss curves written to {a.png}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
