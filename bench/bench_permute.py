"""Benchmark of the permute mode (STIP). Prints rich tables.

1. Cloud side: transformed model vs original (same HF class, permuted weights), per forward.
   Target: within 2%. Runs are interleaved (original, transformed, original, ...) and the fastest
   run of each is reported, so drift on a shared machine hits both sides alike.
2. User side: the work the user adds (permute the input, un-permute the output) vs one plaintext
   forward of the whole model. Target: under 2%. In embed mode the user also does the embedding
   lookup and the head; that share is reported separately (it is model work moved, not added).
3. End to end: ms per generated token through the HTTP server (uvicorn on 127.0.0.1, KV cache on
   the cloud, one round trip per token), over plain HTTP and over HTTPS with client certificates
   (mutual TLS, certificates from ``veil keys``), next to plain HF generation in-process.

4. Families (``--only families``): for a tiny random model of every tested family (hidden 32, 2 layers,
   every norm gain and bias random) the largest absolute and relative difference between the user's
   un-permuted outputs and the untransformed model, and whether 32 greedy tokens are identical, in
   both key modes. This is the table in docs/permute.md.

Sections 1 and 2 also write a PNG plot of the overhead (``--png``, default
docs/permute_overhead.png) next to their tables.

Usage: python bench/bench_permute.py [--quick] [--threads N] [--only compute,http,families] [--png PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from veil.assets import stories260k_path
from veil.net.keys import create_ca, issue_party_cert
from veil.permute import load_source
from veil.permute.bundle import write_cloud_package, write_user_bundle
from veil.permute.client import HttpTransport, LocalTransport, PermuteClient
from veil.permute.cloud import CloudRuntime
from veil.permute.developer import make_key, make_packages
from veil.permute.testing import (
    MINILM_DIR,
    TINY_CONFIGS,
    ServerTLS,
    cloud_servers,
    random_llama,
    random_model,
)

console = Console()


def interleaved(fns, reps: int) -> list[float]:
    """Fastest of ``reps`` runs of each function, runs interleaved. On a shared machine the minimum
    estimates the cost of the work itself; medians mostly measure the neighbours."""
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:  # warm-up
        f()
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


def workloads(quick: bool):
    out = []
    if MINILM_DIR is not None:
        out.append(("all-MiniLM-L6-v2", load_source(MINILM_DIR), (8, 128)))
    out.append(("stories260K", load_source(stories260k_path()), (4, 256)))
    d = 256 if quick else 512
    out.append((f"random Llama d={d} L=4", random_llama(seed=0, layers=4, d=d, heads=8, kv_heads=4, ffn=4 * d,
                                                       vocab=4096, positions=512), (2, 256)))
    return out


def bench_compute(items, reps: int) -> list[dict]:
    cloud_t = Table(title="1. cloud side: transformed vs original forward (fastest of N, interleaved)")
    user_t = Table(title="2. user side: added work vs a plaintext forward")
    for col in ("model", "mode", "batch x seq", "original ms", "transformed ms", "ratio"):
        cloud_t.add_column(col)
    for col in ("model", "mode", "plaintext forward ms", "permute+unpermute ms", "added %",
                "embedding+head ms (moved)", "user total %"):
        user_t.add_column(col)
    rows: list[dict] = []
    for name, src, (b, t) in items:
        ids = np.random.default_rng(0).integers(3, src.adapter.vocab_size(src.config), size=(b, t))
        ids_t = torch.from_numpy(ids)
        base = src.adapter.base(src.model)
        for mode in ("embed", "vocab"):
            key, meta = make_key(src, mode, seed=1)
            cloud, user = make_packages(src, key, meta)
            rt = CloudRuntime(cloud)
            client = PermuteClient(user, LocalTransport(rt))
            x_perm = client.permute_input(ids)
            kw = {"use_cache": False} if src.adapter.is_decoder else {}
            if mode == "embed":
                emb = src.model.get_input_embeddings()(ids_t).detach()
                x_t = torch.from_numpy(x_perm)

                def orig(emb=emb, base=base, kw=kw):
                    with torch.inference_mode():
                        base(inputs_embeds=emb, **kw)

                def trans(rt=rt, x_t=x_t, kw=kw):
                    with torch.inference_mode():
                        rt.module(inputs_embeds=x_t, **kw)
            else:
                x_t = torch.from_numpy(x_perm)

                def orig(src=src, ids_t=ids_t, kw=kw):
                    with torch.inference_mode():
                        src.model(input_ids=ids_t, **kw)

                def trans(rt=rt, x_t=x_t, kw=kw):
                    with torch.inference_mode():
                        rt.module(input_ids=x_t, **kw)
            o, tr = interleaved([orig, trans], reps)
            cloud_t.add_row(name, mode, f"{b}x{t}", f"{1e3 * o:.2f}", f"{1e3 * tr:.2f}", f"{tr / o:.3f}")

            # user side: plaintext forward of the whole model vs the user's own work
            def plain(src=src, ids_t=ids_t, kw=kw):
                with torch.inference_mode():
                    src.model(input_ids=ids_t, **kw)

            y = rt.forward(x_perm)
            x_plain = client._embedding[ids] if mode == "embed" else None

            def perm_only(client=client, ids=ids, y=y, x_plain=x_plain):
                # the user's added work: permute the input, un-permute the output (embedding
                # lookup and head excluded here: the plaintext forward does them too)
                if client._sigma_inv is not None:
                    client.permute_input(ids)
                    client.unpermute_output(y)
                else:
                    np.take(x_plain, client._pi, axis=-1)
                    np.take(y, client._pi_inv, axis=-1)

            if mode == "embed":
                head_t = client._head_t

                def moved(client=client, ids=ids, y=y, head_t=head_t, dec=src.adapter.is_decoder):
                    client._embedding[ids]
                    if dec:
                        y @ head_t

                p_all, added, mv = interleaved([plain, perm_only, moved], reps)
            else:
                p_all, added = interleaved([plain, perm_only], reps)
                mv = 0.0
            user_total = mv + added
            user_t.add_row(name, mode, f"{1e3 * p_all:.2f}", f"{1e3 * added:.3f}", f"{100 * added / p_all:.2f}%",
                           f"{1e3 * mv:.2f}" if mode == "embed" else "-", f"{100 * user_total / p_all:.2f}%")
            rows.append({"model": name, "mode": mode, "cloud_ratio": tr / o, "user_added": added / p_all,
                         "user_total": user_total / p_all})
    console.print(cloud_t)
    console.print(user_t)
    return rows


def plot_overhead(rows: list[dict], path: str) -> None:
    """Two panels: the cloud's transformed/original time ratio, and the user's added share of a
    plaintext forward, per model and mode (the same run as the tables)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'].replace('random Llama ', 'Llama ').replace('all-MiniLM-L6-v2', 'MiniLM')}\n{r['mode']}"
              for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.bar(x, [r["cloud_ratio"] for r in rows], color=["#4c72b0" if r["mode"] == "embed" else "#dd8452" for r in rows])
    a.axhline(1.0, color="k", lw=0.8)
    a.axhline(1.02, color="r", ls="--", lw=0.8, label="target 1.02")
    a.set_ylabel("transformed / original forward time")
    a.set_title("cloud side")
    a.set_ylim(0.8, max(1.1, max(r["cloud_ratio"] for r in rows) + 0.02))
    a.legend()
    b.bar(x - 0.2, [100 * r["user_added"] for r in rows], 0.4, label="permute + un-permute")
    b.bar(x + 0.2, [100 * r["user_total"] for r in rows], 0.4, label="+ embedding and head (embed mode)")
    b.axhline(2.0, color="r", ls="--", lw=0.8, label="target 2%")
    b.set_ylabel("% of a plaintext forward")
    b.set_yscale("log")
    b.set_title("user side")
    b.legend()
    for ax in (a, b):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    fig.suptitle(f"permute mode overhead (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_families(tokens: int = 32) -> None:
    """Exactness of every tested family (tiny random models, all 1-D parameters random), both modes."""
    table = Table(title="4. families: user's un-permuted output vs the untransformed model (float32)")
    for col in ("family", "kind", "mode", "max |diff|", "max |diff| / max |ref|", f"greedy {tokens} ids"):
        table.add_column(col)
    for family in TINY_CONFIGS:
        src = random_model(family, seed=len(family))
        dec = src.adapter.is_decoder
        ids = np.random.default_rng(0).integers(3, src.adapter.vocab_size(src.config), size=(2, 24))
        with torch.no_grad():
            out = src.model(input_ids=torch.from_numpy(ids), **({"use_cache": False} if dec else {}))
        ref = (out.logits if dec else out.last_hidden_state).numpy()
        for mode in ("embed", "vocab"):
            key, meta = make_key(src, mode, seed=3)
            cloud, user = make_packages(src, key, meta)
            client = PermuteClient(user, LocalTransport(CloudRuntime(cloud)))
            diff = float(np.abs(client.forward(ids) - ref).max())
            same = "-"
            if dec:
                with torch.no_grad():
                    hf = src.model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=tokens, min_new_tokens=tokens,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)[0, 3:].tolist()
                same = "identical" if client.generate([1, 5, 9], tokens) == hf else "DIFFERENT"
            table.add_row(family, "decoder" if dec else "encoder", mode, f"{diff:.1e}",
                          f"{diff / float(np.abs(ref).max()):.1e}", same)
    console.print(table)


def best_per_token(fn, tokens: int, runs: int) -> float:
    """Seconds per token of the fastest of ``runs`` generations of ``tokens`` tokens."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / tokens


def bench_http(items, tokens: int, runs: int) -> None:
    table = Table(title=f"3. end to end: greedy generation of {tokens} tokens (fastest of {runs} runs)")
    for col in ("model", "mode", "HTTP ms/token", "HTTPS (mutual TLS) ms/token", "in-process permuted ms/token",
                "plain HF ms/token"):
        table.add_column(col)
    for name, src, _ in items:
        if not src.adapter.is_decoder:
            continue

        def hf(src=src):
            with torch.no_grad():
                src.model.generate(torch.tensor([[1]]), max_new_tokens=tokens, min_new_tokens=tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)

        hf()
        hf_t = best_per_token(hf, tokens, runs)
        for mode in ("embed", "vocab"):
            key, meta = make_key(src, mode, seed=2)
            cloud, user = make_packages(src, key, meta)
            local = PermuteClient(user, LocalTransport(CloudRuntime(cloud)))
            local.generate([1], 4)
            loc = best_per_token(lambda local=local: local.generate([1], tokens), tokens, runs)
            with tempfile.TemporaryDirectory() as tmp:
                keys = Path(tmp) / "keys"
                ca_key, ca_cert = create_ca(keys, "bench")
                for party in ("cloud", "user"):
                    issue_party_cert(keys, party, ca_key, ca_cert)
                write_cloud_package(Path(tmp) / "cloud", cloud)
                write_user_bundle(Path(tmp) / "user", user)
                tls = ServerTLS(keys / "cloud.pem", keys / "cloud.key", client_ca=keys / "ca.pem")
                with cloud_servers([Path(tmp) / "cloud"] * 2, threads=torch.get_num_threads(),
                                   tls=[None, tls]) as (url, tls_url):
                    clients = [PermuteClient(user, HttpTransport(url)),
                               PermuteClient(user, HttpTransport(tls_url, ca=keys / "ca.pem", server_name="cloud",
                                                                 client_cert=(keys / "user.pem", keys / "user.key")))]
                    for c in clients:
                        c.generate([1], 4)
                    http, https = (t / tokens for t in interleaved(
                        [lambda c=c: c.generate([1], tokens) for c in clients], runs))
                    for c in clients:
                        c.close()
            table.add_row(name, mode, f"{1e3 * http:.1f}", f"{1e3 * https:.1f}", f"{1e3 * loc:.1f}", f"{1e3 * hf_t:.1f}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--only", default="compute,http,families", help="sections: compute, http, families")
    ap.add_argument("--png", default="docs/permute_overhead.png", help="plot of sections 1-2 ('' for none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        # the user's NumPy work gets the same threads (OpenBLAS threads spin on a busy machine:
        # a 4x256x64 @ 64x512 product took 70-90 ms with 2 threads next to a compiler, about 1 ms with 1)
        threadpool_limits(args.threads)
    only = {x.strip() for x in args.only.split(",")}
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    items = workloads(args.quick) if only & {"compute", "http"} else []
    if "compute" in only:
        rows = bench_compute(items, reps=args.reps or (5 if args.quick else 25))
        if args.png:
            plot_overhead(rows, args.png)
            console.print(f"overhead plot written to {args.png}")
    if "http" in only:
        bench_http(items, tokens=16 if args.quick else 64, runs=2 if args.quick else 5)
    if "families" in only:
        bench_families()


if __name__ == "__main__":
    main()
