#!/usr/bin/env python3
"""Enclave work per offload-training step of network C (issue 11's speed target), one table.

Per ``--min-intensity`` value: enclave-only step (every product float64 in the enclave process), offload
step (enclave + three accelerator threads over in-memory channels, ``train_offload_local``), the
enclave's own work per step (layers, loss, optimizer + protocol: quantisation, masking, reconstruction,
Freivalds), of which protocol, the enclave's wait for the accelerators, the enclave share and the bytes.
Best of ``--reps`` steps after a warm-up step; one BLAS thread per party. Products through
:class:`~veil.offload.training.protocol.SecureMatmul` directly (``single`` precision: one secure product
per product). Runs against whichever ``veil`` is importable, so an older checkout can be measured with
the same script (``PYTHONPATH=<old>/src``); options an older version lacks are skipped.

Usage: ``python bench/bench_offload_train_enclave.py [--backend numpy|torch-cuda] [--batch 128]
[--min-intensity 16,32] [--reps 3] [--json out.json]`` (MNIST from ``VEIL_MNIST`` or
``../shared/data/mnist_test.npz``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import warnings

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from veil.offload import SimulatedEnclaveRuntime  # noqa: E402
from veil.offload.examples import mnist_module  # noqa: E402
from veil.offload.training import PlainMatmul, TrainConfig, Trainer, load_mnist, train_offload_local  # noqa: E402
from veil.offload.training.models import torch_to_graph  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--min-intensity", default="16,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    xs, ys = load_mnist("train")
    torch.manual_seed(0)
    graph = torch_to_graph(mnist_module("C"), torch.zeros(1, 1, 28, 28))
    kw = {"precision": "single"} if "precision" in inspect.signature(TrainConfig).parameters else {}
    cfg = TrainConfig(optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}, batch_size=a.batch, seed=0,
                      epochs=100, **kw)
    feeds, y = {"x": xs[:a.batch]}, ys[:a.batch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = SimulatedEnclaveRuntime(hazmat_allow_simulation=True)

    def trainer() -> Trainer:
        tr = Trainer(graph, feeds, y, cfg)
        if hasattr(tr, "engine"):  # the secure engine itself, not a precision wrapper around it
            tr.engine = lambda e: e  # type: ignore[method-assign]
        return tr

    tr, eng, ts = trainer(), PlainMatmul(), []
    for i in range(a.reps + 1):
        t0 = time.perf_counter()
        tr.step(eng)
        if i:
            ts.append(time.perf_counter() - t0)
    enclave_only = min(ts) * 1e3
    rows = []
    for mi in [float(v) for v in a.min_intensity.split(",")]:
        tr = trainer()
        train_offload_local(tr, rt, steps=1, backend=a.backend, timeout=600, min_intensity=mi)
        e0, steps, mark = tr.timing["enclave_s"], [], [time.perf_counter()]

        def on_step(_t, _loss, steps=steps, mark=mark):
            now = time.perf_counter()
            steps.append(now - mark[0])
            mark[0] = now

        t0 = time.perf_counter()
        run = train_offload_local(tr, rt, steps=a.reps, backend=a.backend, timeout=600, min_intensity=mi,
                                  on_step=on_step)
        wall = time.perf_counter() - t0
        c, st = run.counters, run.stats["enclave"]
        enc = (tr.timing["enclave_s"] - e0) + c["enclave_s"]
        rows.append({"min_intensity": mi, "enclave_only_ms": enclave_only, "offload_best_ms": min(steps) * 1e3,
                     "offload_mean_ms": wall / a.reps * 1e3, "enclave_ms": enc / a.reps * 1e3,
                     "protocol_ms": c["enclave_s"] / a.reps * 1e3, "wait_ms": c.get("wait_s", 0.0) / a.reps * 1e3,
                     "enclave_share": enc / wall, "bytes": (st.bytes_sent + st.bytes_recv) / a.reps,
                     "offloaded": c["products"] / a.reps, "kept": c.get("local_products", 0) / a.reps})
    print(f"network C, batch {a.batch}, accelerators {a.backend}, {os.cpu_count()} cores, "
          f"cuda {torch.cuda.is_available()}, veil from {os.path.dirname(sys.modules['veil'].__file__ or '')}")
    print("| min intensity (offloaded/kept) | enclave-only ms | offload ms best (mean) | x enclave-only | "
          "enclave work ms/step (protocol) | enclave wait ms | enclave share | bytes/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['min_intensity']:g} ({r['offloaded']:.0f}/{r['kept']:.0f}) | {r['enclave_only_ms']:.0f} | "
              f"{r['offload_best_ms']:.0f} ({r['offload_mean_ms']:.0f}) | {r['offload_best_ms'] / r['enclave_only_ms']:.2f} | "
              f"{r['enclave_ms']:.0f} ({r['protocol_ms']:.0f}) | {r['wait_ms']:.0f} | {r['enclave_share']:.0%} | "
              f"{r['bytes']:,.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
