"""mpc benchmarks (targets, not tests); prints rich tables, writes plots and a markdown table.

1. Ring arithmetic: matrix products and convolutions over Z_2^64 (veil.mpc.ring, float64 limbs on
   BLAS) against float64 BLAS and NumPy's int64 matmul on the same shapes (the shapes of networks
   A-D at batch 64). Target: at least 1/8 of float64 throughput.
2. Networks A-D at batch 1 and 64, veil and its peers measured in the same run on the same inputs:
   for each (network, batch), CrypTen 0.4.1 runs right before veil and SPU right after (each in its
   own venv, bench/peers/; "not measured: reason" where a peer cannot run). veil: five real processes
   over loopback mutual TLS. First what a user waits for: online + offline time per query, setup once,
   traffic per query and for one query including setup; then online only, then agreement and error.
   Writes bench/results/mpc_peers.{md,json}, mpc_latency.png and mpc_traffic.png (--results DIR).

    python bench/bench_mpc.py                          # everything
    python bench/bench_mpc.py --ring                   # ring arithmetic only
    python bench/bench_mpc.py --nets C --batches 64 --no-inproc
    python bench/bench_mpc.py --peers none             # veil alone (no peer columns)
    python bench/bench_mpc.py --parts inproc           # the in-process table only

A last table runs the same networks in one process (threads, in-memory channels).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the parties run one BLAS thread each

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import driver  # noqa: E402
from timing import best_time  # noqa: E402

console = Console(width=240)
RESULTS = Path(__file__).resolve().parent / "results"
RING_SHAPES = [  # (label, m, k, n)
    ("A fc1, batch 64", 64, 784, 128),
    ("C fc1, batch 64", 64, 800, 500),
    ("C fc1, batch 256", 256, 800, 500),
    ("C conv2 as a matmul, batch 64", 4096, 500, 50),
    ("large", 4096, 800, 500),
]
PEER_NAMES = {"crypten": "CrypTen", "spu": "SPU"}


def best(fn, reps: int = 5) -> float:
    return best_time(fn, reps)


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


# ---------------------------------------------------------------------------------------------- networks

def _peer(peer: str, net: str, b: int, x: np.ndarray, plain: np.ndarray, queries: int) -> dict[str, Any]:
    """One peer on (net, batch b), its record with error vs veil's plain executor on the same x[:b]."""
    res = driver.run_networks(peer, [net], [b], x, queries=queries)
    if isinstance(res, driver.NotMeasured):
        return {"name": PEER_NAMES[peer], "measured": False, "reason": res.reason}
    rec = dict(res["records"][0])
    logits = np.asarray(rec.pop("logits"), np.float64)
    rep = compare_with_plain(Report(), logits, plain[:b])
    rec.update(name=res["peer"], measured=True, setting=res.get("provider") or res.get("protocol"),
               agreement=rep.agreement, max_abs_error=rep.max_abs_error)
    return rec


def _veil(net: str, b: int, x_all: np.ndarray, graph) -> dict[str, Any]:
    n = min(len(x_all), max(b * 4, 16)) if b == 1 else len(x_all)
    x = x_all[:n]
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        res = run_local_deployment(model_path(net), x, tmp, batch_size=b, timeout=900)
    r = res["report"]
    q = r["queries"]
    plain = run_plain(graph, x)["logits"]
    tp = best(lambda g=graph, xx=x[:b]: run_plain(g, xx), reps=5)
    rep = compare_with_plain(Report(), res["outputs"]["logits"], plain)
    on, off = r["online_s"] / q, r["offline_s"] / q
    # the deployment's report may leave setup time at 0: then it is the wall time less the queries' time
    # (so it includes process start, TLS handshakes and weight sharing: what a user waits once)
    setup_s, setup_from_wall = (r["setup_s"], False) if r.get("setup_s") else (res["wall_s"] - q * (on + off), True)
    return {"name": "veil", "measured": True, "images": n, "queries": q, "online_s": on, "offline_s": off,
            "total_s": on + off, "setup_s": setup_s, "setup_from_wall": setup_from_wall, "online_bytes": r["online_bytes"] / q,
            "offline_bytes": r["offline_bytes"] / q, "total_bytes": (r["online_bytes"] + r["offline_bytes"]) / q,
            "setup_bytes": r["setup_bytes"], "rounds": r["rounds"] // q, "agreement": rep.agreement,
            "max_abs_error": rep.max_abs_error, "kl": rep.kl_divergence, "plain_s": tp, "wall_s": res["wall_s"]}


def bench_networks(nets: list[str], batches: list[int], images: int, peers: list[str],
                   queries: int) -> list[dict[str, Any]]:
    x_all, _ = load_slice(images)
    rows = []
    for net in nets:
        graph = load_model(model_path(net))
        plain_peer = run_plain(graph, x_all[:max(batches)])["logits"]
        for b in batches:
            row: dict[str, Any] = {"net": net, "batch": b, "load_before": os.getloadavg()[0]}
            order = [p for p in ("crypten",) if p in peers] + ["veil"] + [p for p in peers if p != "crypten"]
            for who in order:  # CrypTen right before veil, the others right after
                t0 = time.perf_counter()
                row[who] = (_veil(net, b, x_all, graph) if who == "veil"
                            else _peer(who, net, b, x_all, plain_peer, queries if b < 16 else 1))
                console.print(f"  {net} batch {b}: {PEER_NAMES.get(who, who)} done ({time.perf_counter() - t0:.1f} s wall)"
                              + ("" if row[who]["measured"] else f", not measured: {row[who]['reason']}"))
            row["load_after"] = os.getloadavg()[0]
            rows.append(row)
    return rows


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _b(n: float | None) -> str:
    if n is None or n != n:
        return "-"
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _ratio(peer: float | None, veil: float | None, speed: bool = True) -> str:
    if not peer or not veil:
        return "-"
    r = peer / veil
    return f"{r:.1f}x" if speed else (f"1/{r:.1f}" if r >= 1 else f"{1 / r:.1f}x")


def _cell(p: dict[str, Any], key: str, fmt) -> str:
    return fmt(p.get(key)) if p["measured"] else "not measured"


def tables(rows: list[dict[str, Any]], peers: list[str]) -> dict[str, list[list[str]]]:
    """The three tables as rows of strings (printed with rich and written as markdown)."""
    out: dict[str, list[list[str]]] = {}
    head = ["net", "batch", "veil online+offline", "veil setup (once)"]
    for p in peers:
        head += [f"{PEER_NAMES[p]} per query", f"{PEER_NAMES[p]} setup", f"{PEER_NAMES[p]} / veil"]
    head += ["veil traffic per query", "veil traffic, 1 query + setup"]
    for p in peers:
        head += [f"{PEER_NAMES[p]} traffic per query (+ setup)", f"veil traffic / {PEER_NAMES[p]}'s (1 query + setup)"]
    body = []
    for r in rows:
        v = r["veil"]
        line = [r["net"], str(r["batch"]), _t(v["total_s"]),
                f"{_t(v['setup_s'])}{'†' if v.get('setup_from_wall') else ''}, {_b(v['setup_bytes'])}"]
        for p in peers:
            q = r[p]
            line += [_cell(q, "total_s", _t), _cell(q, "setup_s", _t),
                     _ratio(q.get("total_s"), v["total_s"]) if q["measured"] else q["reason"][:60]]
        line += [_b(v["total_bytes"]), _b(v["total_bytes"] + v["setup_bytes"])]
        for p in peers:
            q = r[p]
            if q["measured"]:
                sb = q.get("setup_bytes")
                line += [_b(q["total_bytes"]) + (f" (+{_b(sb)})" if sb else ""),
                         _ratio(q["total_bytes"] + (sb or 0), v["total_bytes"] + v["setup_bytes"], speed=False)]
            else:
                line += ["not measured", "-"]
        body.append(line)
    out["total"] = [head, *body]
    head = ["net", "batch", "veil online", "veil offline", "veil rounds"]
    for p in peers:
        head += [f"{PEER_NAMES[p]} online", f"{PEER_NAMES[p]} offline", f"{PEER_NAMES[p]} online / veil online",
                 f"{PEER_NAMES[p]} rounds" if p == "crypten" else f"{PEER_NAMES[p]} sends"]
    body = []
    for r in rows:
        v = r["veil"]
        line = [r["net"], str(r["batch"]), _t(v["online_s"]), _t(v["offline_s"]), str(v["rounds"])]
        for p in peers:
            q = r[p]
            if q["measured"] and "online_s" in q:
                line += [_t(q["online_s"]), _t(q["offline_s"]), _ratio(q["online_s"], v["online_s"]),
                         str(q.get("online_rounds", q["rounds"]))]
            elif q["measured"]:
                line += ["not separable", "-", "-", str(q["rounds"])]
            else:
                line += ["not measured", "-", "-", "-"]
        body.append(line)
    out["online"] = [head, *body]
    head = ["net", "batch", "veil agreement", "veil max |err|", "veil KL", "plaintext", "veil online / plain"]
    for p in peers:
        head += [f"{PEER_NAMES[p]} agreement", f"{PEER_NAMES[p]} max |err|"]
    body = []
    for r in rows:
        v = r["veil"]
        line = [r["net"], str(r["batch"]), f"{v['agreement']:.2%} ({v['images']})", f"{v['max_abs_error']:.1e}",
                f"{v['kl']:.1e}", _t(v["plain_s"]), f"{v['online_s'] / v['plain_s']:.0f}x"]
        for p in peers:
            q = r[p]
            line += ([f"{q['agreement']:.2%} ({r['batch']})", f"{q['max_abs_error']:.1e}"] if q["measured"]
                     else ["-", "-"])
        body.append(line)
    out["accuracy"] = [head, *body]
    return out


TITLES = {
    "total": "What a user waits for, per query: online + offline time (peers: one query as they run it), setup once; "
             "traffic per query and for one query including setup († veil's setup time is the deployment's wall time "
             "less its queries: process start, TLS handshakes, weight sharing)",
    "online": "Online only (veil: after the dealer's material is in place; CrypTen: with tuples pre-generated by its "
              "tracing; SPU does not split)",
    "accuracy": "Agreement (arg-max) and max |logit error| vs veil's plain executor on the same images",
}


def print_tables(tabs: dict[str, list[list[str]]]) -> None:
    for key, (head, *body) in tabs.items():
        tab = Table(title=TITLES[key])
        for c in head:
            tab.add_column(c)
        for line in body:
            tab.add_row(*line)
        console.print(tab)


def _md(head: list[str], body: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in line] for line in [head, *body]]
    return "\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(line) + " |" for line in esc[1:]])


def write_results(rows: list[dict[str, Any]], tabs: dict[str, list[list[str]]], peers: list[str], outdir: Path,
                  command: str, plots: bool) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    (outdir / "mpc_peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    loads = ", ".join(f"{r['load_before']:.1f}" for r in rows)
    md = [f"Recorded by `{command}` on {meta['date_utc']} UTC ({meta['cpus']} CPUs, {meta['machine']}, Python "
          f"{meta['python']}); 1-minute load average before each (network, batch): {loads}.", ""]
    dagger = any(r["veil"].get("setup_from_wall") for r in rows)
    for key, (head, *body) in tabs.items():
        title = TITLES[key] if dagger or "†" not in TITLES[key] else TITLES[key][:TITLES[key].index(" (†")]
        md += [f"**{title}**", "", _md(head, body), ""]
    if plots:
        md += ["![latency](mpc_latency.png)", "", "![traffic](mpc_traffic.png)", ""]
    (outdir / "mpc_peers.md").write_text("\n".join(md))
    if plots:
        plot(rows, peers, outdir)
    console.print(f"wrote {outdir / 'mpc_peers.md'}" + (", mpc_latency.png, mpc_traffic.png" if plots else ""))


def plot(rows: list[dict[str, Any]], peers: list[str], outdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['net']}\nbatch {r['batch']}" for r in rows]
    series_t = [("veil online+offline", "#1f6f3f", lambda r: r["veil"]["total_s"]),
                ("veil online", "#7fc97f", lambda r: r["veil"]["online_s"])]
    series_b = [("veil per query", "#1f6f3f", lambda r: r["veil"]["total_bytes"]),
                ("veil 1 query + setup", "#7fc97f", lambda r: r["veil"]["total_bytes"] + r["veil"]["setup_bytes"])]
    colours = {"crypten": ("#d95f02", "#fdb863"), "spu": ("#3b5ba5", "#9ecae1")}
    for p in peers:
        c = colours.get(p, ("#666666", "#bbbbbb"))
        n = PEER_NAMES[p]
        series_t.append((f"{n} per query", c[0], lambda r, p=p: r[p].get("total_s") if r[p]["measured"] else None))
        if p == "crypten":
            series_t.append((f"{n} online (pre-generated tuples)", c[1],
                             lambda r, p=p: r[p].get("online_s") if r[p]["measured"] else None))
        series_b.append((f"{n} per query + setup", c[0], lambda r, p=p: (r[p]["total_bytes"] + (r[p].get("setup_bytes") or 0))
                         if r[p]["measured"] else None))
    for fname, series, ylabel, title in (
            ("mpc_latency.png", series_t, "seconds per query (log)", "mpc latency per query: veil vs peers, same run"),
            ("mpc_traffic.png", series_b, "bytes (log)", "mpc traffic: veil vs peers, same run")):
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows) + 3), 4.8))
        w = 0.8 / len(series)
        for i, (name, colour, get) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(rows))]
            vals = [get(r) for r in rows]
            ax.bar([x for x, v in zip(xs, vals, strict=True) if v], [v for v in vals if v], w, label=name, color=colour)
            for x, v in zip(xs, vals, strict=True):
                if not v:
                    ax.text(x, ax.get_ylim()[0] if ax.get_yscale() == "log" else 0, "n/m", rotation=90, fontsize=7,
                            ha="center", va="bottom")
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        fig.tight_layout()
        fig.savefig(outdir / fname, dpi=110)
        plt.close(fig)


def bench_in_process(nets: list[str], batches: list[int]) -> None:
    """The same protocol with the parties as threads over in-memory channels: its cost without TLS,
    sockets and process scheduling."""
    import veil.mpc as M

    x_all, _ = load_slice(64)
    tab = Table(title="in one process (parties as threads, in-memory channels); times per query")
    for c in ("net", "batch", "online", "offline", "rounds", "agreement"):
        tab.add_column(c)
    for net in nets:
        for b in batches:
            n = 16 if b == 1 else 64
            _, rep = M.run(str(model_path(net)), x_all[:n], batch_size=b)
            q = rep.queries
            tab.add_row(net, str(b), f"{rep.online_s / q * 1e3:.1f} ms", f"{rep.offline_s / q * 1e3:.1f} ms",
                        str(rep.rounds // q), f"{rep.agreement:.2%}")
    console.print(tab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ring", action="store_true", help="ring arithmetic only")
    ap.add_argument("--no-ring", action="store_true", help="skip the ring arithmetic tables")
    ap.add_argument("--nets", default="A,B,C,D")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--images", type=int, default=256, help="images of the shipped held-out set for agreement")
    ap.add_argument("--peers", default="crypten,spu", help="comma list of crypten, spu; 'none' for veil alone")
    ap.add_argument("--peer-queries", type=int, default=5,
                    help="timed queries per peer measurement below batch 16 (median; 1 from batch 16 on)")
    ap.add_argument("--results", default=str(RESULTS), help="folder for mpc_peers.md/.json and the PNG plots")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-inproc", action="store_true", help="skip the in-process table")
    ap.add_argument("--parts", default="ring,networks,inproc",
                    help="comma list of ring, networks, inproc (the tables to run; default all)")
    a = ap.parse_args()
    nets, batches = a.nets.split(","), [int(b) for b in a.batches.split(",")]
    peers = [] if a.peers == "none" else [p for p in a.peers.split(",") if p]
    unknown = [p for p in peers if p not in PEER_NAMES]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}: expected some of {list(PEER_NAMES)} or 'none'")
    parts = {"ring"} if a.ring else set(a.parts.split(","))
    parts -= {"ring"} if a.no_ring else set()
    parts -= {"inproc"} if a.no_inproc else set()
    if "ring" in parts:
        bench_ring()
    if "networks" in parts:
        rows = bench_networks(nets, batches, a.images, peers, a.peer_queries)
        tabs = tables(rows, peers)
        print_tables(tabs)
        command = "python bench/bench_mpc.py " + " ".join(sys.argv[1:])
        write_results(rows, tabs, peers, Path(a.results), command.strip(), plots=not a.no_plots)
    if "inproc" in parts:
        bench_in_process(nets, batches)


if __name__ == "__main__":
    main()
