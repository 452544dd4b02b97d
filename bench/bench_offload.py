#!/usr/bin/env python3
"""Benchmark offload mode: end-to-end time vs plaintext and vs running everything in the enclave process,
and the bytes between enclave and accelerator(s), per network, at batch 1 and 64.

Columns (per query of ``batch`` samples, best of ``--reps`` queries (3x for batch 1) after one warm-up;
the minimum is the robust statistic on a machine shared with other jobs; one BLAS thread per party):
* plain f32: ``run_plain`` in float32 (the reference executor);
* enclave-only: the whole model inside the enclave process (``run_plain`` in float64, the enclave's
  precision). With a simulated enclave this is ordinary CPU code; a real SGX enclave adds its own
  overheads (EPC paging above ~90 MB, enclave transitions) that this machine cannot measure;
* offload online: enclave + accelerator(s) as threads over in-memory channels (wire encoding included),
  with the accelerator's own compute time separately; offline: precompute time per query;
* bytes: enclave -> accelerators and back, per query (setup, i.e. weights or weight shares, separately);
  rounds per query; sealed offline material per sample.

Usage: ``python bench/bench_offload.py [--nets A,B,C,D,enc] [--batches 1,64] [--privacy none,shares]
[--backend auto|numpy|torch-cpu|torch-cuda] [--reps 3] [--json out.json] [--plot docs/offload_times.png]``

The plot shows, per network, batch and weight privacy, the four times of the table on a log scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one BLAS thread per party:
    os.environ.setdefault(_var, "1")  # stable timings on a shared machine; enclave and accelerator = 2 threads

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from veil.offload import Accelerator, OffloadEnclave, SimulatedEnclaveRuntime, run_offload_local  # noqa: E402
from veil.offload.examples import encoder_graph, mnist_graph  # noqa: E402
from veil.plain import run_plain  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402


def best_time(fn, reps: int) -> float:
    return timing.best_time(fn, reps, warmup=True)


def bench_one(graph, x: np.ndarray, privacy: str, backend: str, reps: int, runtime) -> dict:
    batch = x.shape[0]
    plain = best_time(lambda: run_plain(graph, x), reps)
    enclave_only = best_time(lambda: run_plain(graph, x, dtype=np.float64), reps)
    enc = OffloadEnclave(graph, runtime, weight_privacy=privacy)
    offline = enc.precompute(batch * (reps + 1)) / (reps + 1)
    accs: list[Accelerator] = []

    def factory(name: str) -> Accelerator:
        accs.append(Accelerator(backend))
        return accs[-1]

    per_query: list[float] = []
    orig_infer = enc.infer

    def timed_infer(ch, inputs, keep=False):
        t0 = time.perf_counter()
        out = orig_infer(ch, inputs, keep)
        per_query.append(time.perf_counter() - t0)
        return out

    enc.infer = timed_infer  # type: ignore[method-assign]
    after_setup = {}
    orig_connect = enc.connect

    def snap_connect(ch):
        out = orig_connect(ch)
        after_setup["stats"] = ch.stats.copy()
        return out

    enc.connect = snap_connect  # type: ignore[method-assign]
    sealed_per_sample = enc.material.stored_bytes / max(enc.material.supplied, 1)
    run = run_offload_local(enc, [x] * (reps + 1), accelerator_factory=factory, timeout=300)
    online = min(per_query[1:])
    ref = next(iter(run_plain(graph, x, dtype=np.float64).values()))
    err = float(np.abs(next(iter(run.outputs[-1].values())) - ref).max())
    setup = after_setup["stats"]
    st = run.stats["enclave"] - setup
    q = reps + 1
    return {
        "batch": batch, "privacy": privacy, "backend": ",".join(sorted(set(run.backends.values()))),
        "plain_s": plain, "enclave_only_s": enclave_only, "offload_s": online,
        "accel_compute_s": sum(a.compute_s for a in accs) / q, "offline_s": offline,
        "bytes_to_acc": st.bytes_sent / q, "bytes_from_acc": st.bytes_recv / q,
        "rounds": run.counters["rounds"] / q, "max_err": err, "setup_bytes": setup.bytes_sent,
        "sealed_bytes_per_sample": sealed_per_sample,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="A,B,C,D,enc")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--privacy", default="none,shares")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="docs/offload_times.png", help="PNG of the times ('' for none)")
    args = ap.parse_args()
    console = Console(width=240)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runtime = SimulatedEnclaveRuntime(hazmat_allow_simulation=True)
    console.print(f"[yellow]{runtime.describe()}[/]")
    rows = []
    for net in args.nets.split(","):
        if net == "enc":
            graph, _ = encoder_graph(hidden=128, heads=4, ff=512, seq=32)
            src = "random-weights, hidden 128, 4 heads, ff 512, seq 32"

            def make(b: int) -> np.ndarray:
                return np.random.default_rng(0).standard_normal((b, 32, 128)).astype(np.float32)
        else:
            graph, src = mnist_graph(net)

            def make(b: int) -> np.ndarray:
                return np.random.default_rng(0).random((b, 1, 28, 28)).astype(np.float32)
        for b in (int(v) for v in args.batches.split(",")):
            for privacy in args.privacy.split(","):
                reps = args.reps * 3 if b == 1 else args.reps  # small queries are noisier
                r = bench_one(graph, make(b), privacy, args.backend, reps, runtime)
                r.update(net=net, source=src)
                rows.append(r)
                console.print(f"  done {net} batch {b} {privacy}", style="dim")
    t = Table(title="offload mode, per query (best of reps); times in ms; bytes per query")
    for c in ("net", "batch", "weights", "accel", "plain f32", "enclave-only", "offload online", "x plain",
              "x enclave", "accel compute (sum)", "offline", "bytes to acc", "bytes from acc", "rounds", "setup bytes",
              "sealed B/sample", "max err"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["net"], str(r["batch"]), "visible" if r["privacy"] == "none" else "2 shares", r["backend"],
                  f"{r['plain_s'] * 1e3:.2f}", f"{r['enclave_only_s'] * 1e3:.2f}", f"{r['offload_s'] * 1e3:.2f}",
                  f"{r['offload_s'] / r['plain_s']:.1f}", f"{r['offload_s'] / r['enclave_only_s']:.1f}",
                  f"{r['accel_compute_s'] * 1e3:.2f}", f"{r['offline_s'] * 1e3:.2f}", f"{r['bytes_to_acc']:,.0f}",
                  f"{r['bytes_from_acc']:,.0f}", f"{r['rounds']:.0f}", f"{r['setup_bytes']:,}",
                  f"{r['sealed_bytes_per_sample']:,.0f}", f"{r['max_err']:.1e}")
    console.print(t)
    console.print(f"command: {' '.join(sys.argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot_times(rows, args.plot)
        console.print(f"plot: {args.plot}")


def plot_times(rows: list[dict], path: str) -> None:
    """Grouped bars per (network, batch, weights): plain, enclave-only, offload online, accelerator compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("plain f32", "plain_s"), ("enclave-only", "enclave_only_s"), ("offload online", "offload_s"),
              ("accelerator compute", "accel_compute_s")]
    labels = [f"{r['net']} b{r['batch']}\n{'visible' if r['privacy'] == 'none' else 'shares'}" for r in rows]
    x = np.arange(len(rows))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(rows)), 4.5))
    for i, (name, key) in enumerate(series):
        ax.bar(x + (i - 1.5) * width, [max(r[key], 1e-6) * 1e3 for r in rows], width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("ms per query (log)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_title("offload mode per query: CPU-only host (the accelerator is the same CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
