#!/usr/bin/env python3
"""Error of offload training's secure products against float64, per product precision.

Every product goes through the real protocol (:class:`~veil.offload.training.protocol.SecureMatmul`
with its three accelerators called in this process: masks, field products, Freivalds checks), wrapped
by :class:`~veil.offload.training.precision.PrecisionMatmul` at ``single`` (one secure field product)
and ``double`` (two, same round). Operands: random, adversarial (12 decades between rows/columns,
8 decades between entries), ReLU-like, a long inner dimension as in network C's ``dW``, constants,
and the products of one real training step of network C (batch 64, MNIST images). Columns:

* normwise: ``max_ij |C_ij - (U V)_ij| / (||U row i|| ||V col j||)`` (the scale of a floating-point
  dot product's error bound; float32 summation gives ~1e-7 here);
* vs max: ``max |C - U V| / max |U V|`` (the figure of docs/offload.md's step table);
* Frobenius: ``||C - U V||_F / ||U V||_F``.

Usage: ``python bench/bench_offload_precision.py [--seed 0]``
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from veil.offload import SimulatedEnclaveRuntime  # noqa: E402
from veil.offload.training import TRAIN_ACCELERATORS, PlainMatmul, TrainAccelerator, TrainConfig, Trainer  # noqa: E402
from veil.offload.training.precision import PRECISIONS, PrecisionMatmul  # noqa: E402
from veil.offload.training.protocol import SecureMatmul  # noqa: E402


class _InProcess(SecureMatmul):
    """SecureMatmul whose accelerators are called directly (no channel): same messages, same checks."""

    def __init__(self, rt, accs):
        super().__init__(None, rt)  # type: ignore[arg-type]
        self.accs_obj, self.box = accs, {}

    def _send(self, acc, msg):
        self.box[acc] = self.accs_obj[acc].handle(msg)

    def _recv(self, acc):
        return self.box.pop(acc)


def errors(out: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    ref = u @ v
    den = np.sqrt((u * u).sum(1))[:, None] * np.sqrt((v * v).sum(0))[None, :]
    d = np.abs(out - ref)
    return (float((d / np.maximum(den, 1e-300)).max()), float(d.max() / max(np.abs(ref).max(), 1e-300)),
            float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300)))


class _Collect(PlainMatmul):
    def __init__(self):
        super().__init__()
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def matmul(self, u, v):
        self.pairs.append((u.copy(), v.copy()))
        return super().matmul(u, v)


def network_c_products(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    import torch

    from veil.offload.examples import mnist_module
    from veil.offload.training.data import load_mnist
    from veil.offload.training.models import torch_to_graph

    torch.manual_seed(seed)
    graph = torch_to_graph(mnist_module("C"), torch.zeros(1, 1, 28, 28))
    x, y = load_mnist("train")
    tr = Trainer(graph, {"x": x[:64]}, y[:64], TrainConfig(optimizer={"name": "sgd", "lr": 0.05}, batch_size=64))
    col = _Collect()
    tr.step(col)
    return col.pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    g = np.random.default_rng(a.seed)
    n, k, m = 24, 800, 20
    cases = {
        "gaussian 24x800x20": (g.normal(size=(n, k)), g.normal(size=(k, m))),
        "rows/columns over 1e-6..1e6": (g.normal(size=(n, k)) * 10.0 ** g.uniform(-6, 6, (n, 1)),
                                        g.normal(size=(k, m)) * 10.0 ** g.uniform(-6, 6, (1, m))),
        "entries over 1e-4..1e4": (g.normal(size=(n, k)) * 10.0 ** g.uniform(-4, 4, (n, k)),
                                   g.normal(size=(k, m)) * 10.0 ** g.uniform(-4, 4, (k, m))),
        "relu x 1e-3 gaussian": (np.maximum(g.normal(size=(n, k)), 0), g.normal(size=(k, m)) * 1e-3),
        "inner dim 50000 (gauss x relu)": (g.normal(size=(6, 50000)), np.maximum(g.normal(size=(50000, 5)), 0)),
        "constant 0.3 x -7": (np.full((n, k), 0.3), np.full((k, m), -7.0)),
    }
    try:
        for i, (u, v) in enumerate(network_c_products(a.seed)):
            cases[f"network C step, product {i + 1}: {u.shape[0]}x{u.shape[1]}x{v.shape[1]}"] = (u, v)
    except Exception as e:  # noqa: BLE001 - the MNIST file is optional for this table
        Console(stderr=True).print(f"network C products skipped: {type(e).__name__}: {e}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt = SimulatedEnclaveRuntime(hazmat_allow_simulation=True)
    accs = {acc: TrainAccelerator("numpy") for acc in TRAIN_ACCELERATORS}
    t = Table(title="secure product error against float64 (protocol with in-process accelerators)")
    t.add_column("operands")
    for p in PRECISIONS:
        for c in ("normwise", "vs max", "Frobenius"):
            t.add_column(f"{p}: {c}")
    worst = {p: [0.0, 0.0, 0.0] for p in PRECISIONS}
    for name, (u, v) in cases.items():
        row = [name]
        for p in PRECISIONS:
            e = errors(PrecisionMatmul(_InProcess(rt, accs), p).matmul(u, v), u, v)
            worst[p] = [max(x, y) for x, y in zip(worst[p], e, strict=True)]
            row += [f"{x:.1e}" for x in e]
        t.add_row(*row)
    t.add_row("worst", *[f"{x:.1e}" for p in PRECISIONS for x in worst[p]])
    Console(width=200).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
