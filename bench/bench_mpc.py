"""mpc benchmarks (targets, not tests); prints rich tables.

1. Ring arithmetic: matrix products and convolutions over Z_2^64 (veil.mpc.ring, float64 limbs on
   BLAS) against float64 BLAS and NumPy's int64 matmul on the same shapes (the shapes of networks
   A-D at batch 64). Target: at least 1/8 of float64 throughput.
2. Networks A-D at batch 1 and 64 with five real processes over loopback mutual TLS: online and
   offline time per query, bytes, rounds, agreement with plaintext on the shipped held-out slice,
   max logit error, KL divergence, plaintext time and the ratio. CrypTen 0.4.1 (two processes, same
   machine) for scale: A 110 ms / 2.0 MB, B 570 ms / 20.5 MB, C 703 ms / 35.8 MB at batch 1,
   C 11.8 s / 1.86 GB at batch 64.

    python bench/bench_mpc.py                 # everything
    python bench/bench_mpc.py --ring          # ring arithmetic only
    python bench/bench_mpc.py --nets C --batches 64

A last table runs the same networks in one process (threads, in-memory channels).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the parties run one BLAS thread each

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from veil.assets import load_slice, model_path  # noqa: E402
from veil.graph import load_model  # noqa: E402
from veil.mpc import ring  # noqa: E402
from veil.mpc.demo import run_local_deployment  # noqa: E402
from veil.mpc.report import Report, compare_with_plain  # noqa: E402
from veil.plain import kernels as PK  # noqa: E402
from veil.plain import run_plain  # noqa: E402

console = Console(width=240)
CRYPTEN = {("A", 1): (0.110, 2.0e6), ("B", 1): (0.570, 20.5e6), ("C", 1): (0.703, 35.8e6), ("C", 64): (11.8, 1.86e9)}
RING_SHAPES = [  # (label, m, k, n)
    ("A fc1, batch 64", 64, 784, 128),
    ("C fc1, batch 64", 64, 800, 500),
    ("C fc1, batch 256", 256, 800, 500),
    ("C conv2 as a matmul, batch 64", 4096, 500, 50),
    ("large", 4096, 800, 500),
]


def best(fn, reps: int = 5) -> float:
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def bench_ring() -> None:
    rng = np.random.default_rng(0)
    tab = Table(title="matrix products over Z_2^64 vs float64 BLAS (same shapes, 1 BLAS thread, best of 5)")
    for c in ("shape", "m x k x n", "float64 BLAS", "ring (fixed operand)", "ring (both fresh)", "int64 matmul",
              "ring / float64", "int64 / float64"):
        tab.add_column(c)
    for label, m, k, n in RING_SHAPES:
        a, b = rng.integers(0, 2**64, (m, k), dtype=np.uint64), rng.integers(0, 2**64, (k, n), dtype=np.uint64)
        fa, fb = rng.random((m, k)), rng.random((k, n))
        lb = ring.Limbs(b)
        assert np.array_equal(ring.matmul(a, lb), a @ b)
        tf, tr, tr2 = best(lambda fa=fa, fb=fb: fa @ fb), best(lambda a=a, lb=lb: ring.matmul(a, lb)), best(lambda a=a, b=b: ring.matmul(a, b))
        ti = best(lambda a=a, b=b: a.view(np.int64) @ b.view(np.int64), reps=2 if m * k * n > 1e8 else 5)
        tab.add_row(label, f"{m}x{k}x{n}", f"{tf * 1e3:.2f} ms", f"{tr * 1e3:.2f} ms", f"{tr2 * 1e3:.2f} ms",
                    f"{ti * 1e3:.2f} ms", f"1/{tr / tf:.1f}", f"1/{ti / tf:.1f}")
    console.print(tab)
    tab = Table(title="convolutions over Z_2^64 vs float64 (im2col + matmul for both, batch 64)")
    for c in ("layer", "float64", "ring (fixed kernel)", "ring / float64"):
        tab.add_column(c)
    for label, xs, ws in (("C conv1", (64, 1, 28, 28), (20, 1, 5, 5)), ("C conv2", (64, 20, 12, 12), (50, 20, 5, 5)),
                          ("B conv1", (64, 1, 28, 28), (16, 1, 5, 5))):
        x, w = rng.integers(0, 2**64, xs, dtype=np.uint64), rng.integers(0, 2**64, ws, dtype=np.uint64)
        fx, fw = rng.random(xs), rng.random(ws)
        lw = ring.Limbs(np.ascontiguousarray(w.reshape(ws[0], -1).T))
        tf = best(lambda fx=fx, fw=fw: PK.conv2d(fx, fw, None, (1, 1), (0, 0, 0, 0)))
        tr = best(lambda x=x, lw=lw, ws=ws: ring.conv2d(x, lw, (1, 1), (0, 0, 0, 0), ws[2:], ws[0]))
        tab.add_row(label, f"{tf * 1e3:.2f} ms", f"{tr * 1e3:.2f} ms", f"1/{tr / tf:.1f}")
    console.print(tab)


def bench_networks(nets: list[str], batches: list[int], images: int) -> None:
    x_all, y_all = load_slice(images)
    tab = Table(title=f"networks over 5 processes + loopback mutual TLS (agreement on {len(y_all)} images of the "
                      "held-out 2k slice; times per query)")
    for c in ("net", "batch", "online", "offline", "bytes online", "bytes offline", "rounds", "agreement",
              "max |err|", "KL", "plaintext", "online / plain", "CrypTen", "speed-up", "traffic / CrypTen"):
        tab.add_column(c)
    for net in nets:
        graph = load_model(model_path(net))
        for b in batches:
            n = min(len(y_all), max(b * 4, 16)) if b == 1 else len(y_all)
            x = x_all[:n]
            with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
                res = run_local_deployment(model_path(net), x, tmp, batch_size=b, timeout=600)
            r = res["report"]
            q = r["queries"]
            plain = run_plain(graph, x)["logits"]
            tp = best(lambda g=graph, xx=x[:b]: run_plain(g, xx), reps=5)
            rep = compare_with_plain(Report(), res["outputs"]["logits"], plain)
            on, off = r["online_s"] / q, r["offline_s"] / q
            traffic = (r["online_bytes"] + r["offline_bytes"]) / q
            ref = CRYPTEN.get((net, b))
            tab.add_row(net, str(b), f"{on * 1e3:.1f} ms", f"{off * 1e3:.1f} ms", f"{r['online_bytes'] / q / 1e6:.2f} MB",
                        f"{r['offline_bytes'] / q / 1e6:.2f} MB", str(r["rounds"] // q), f"{rep.agreement:.2%} ({n})",
                        f"{rep.max_abs_error:.1e}", f"{rep.kl_divergence:.1e}", f"{tp * 1e3:.2f} ms", f"{on / tp:.0f}x",
                        f"{ref[0] * 1e3:.0f} ms" if ref else "-", f"{ref[0] / on:.1f}x" if ref else "-",
                        f"1/{ref[1] / traffic:.1f}" if ref else "-")
            console.print(f"  {net} batch {b}: done ({res['wall_s']:.1f} s wall)")
    console.print(tab)


def bench_in_process(nets: list[str], batches: list[int]) -> None:
    """The same protocol with the parties as threads over in-memory channels: its cost without TLS,
    sockets and process scheduling (CrypTen's figures are for two processes)."""
    import veil.mpc as M

    x_all, _ = load_slice(64)
    tab = Table(title="in one process (parties as threads, in-memory channels); times per query")
    for c in ("net", "batch", "online", "offline", "rounds", "agreement", "CrypTen (2 processes)"):
        tab.add_column(c)
    for net in nets:
        for b in batches:
            n = 16 if b == 1 else 64
            _, rep = M.run(str(model_path(net)), x_all[:n], batch_size=b)
            q = rep.queries
            ref = CRYPTEN.get((net, b))
            tab.add_row(net, str(b), f"{rep.online_s / q * 1e3:.1f} ms", f"{rep.offline_s / q * 1e3:.1f} ms",
                        str(rep.rounds // q), f"{rep.agreement:.2%}", f"{ref[0] * 1e3:.0f} ms" if ref else "-")
    console.print(tab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ring", action="store_true", help="ring arithmetic only")
    ap.add_argument("--nets", default="A,B,C,D")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--images", type=int, default=256, help="images of the shipped slice for agreement")
    ap.add_argument("--no-inproc", action="store_true", help="skip the in-process table")
    a = ap.parse_args()
    nets, batches = a.nets.split(","), [int(b) for b in a.batches.split(",")]
    bench_ring()
    if not a.ring:
        bench_networks(nets, batches, a.images)
        if not a.no_inproc:
            bench_in_process(nets, batches)


if __name__ == "__main__":
    main()
