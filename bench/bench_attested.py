"""Load test of the attested mode with all-MiniLM-L6-v2 (loopback only, bounded in count and time).

Measures, for one tokenized sentence (batch 1):

* ``onnxruntime in-process``: the same ONNX, the same session options (intra-op threads), no server;
* ``server, no attestation``: the same server, a plain HTTPS client (no evidence, no key pinning);
* ``server, attested``: ``veil.attested`` connection (verified evidence, pinned TLS key per call);
* ``attested, concurrent``: C clients in threads, each with its own attested connection.

The three sequential modes run interleaved in rounds so that load from other processes on the
machine hits them alike. Target: p50 of ``attested`` within 10% of ``no attestation``.

Run: ``python bench/bench_attested.py [--requests 200] [--clients 8] [--max-seconds 180]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from veil.attested import Policy, connect, file_sha256
from veil.attested.client import NODELAY
from veil.attested.tensors import encode_tensor
from veil.attested.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("attested_minilm_example", ROOT / "examples" / "attested_minilm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per mode")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--per-client", type=int, default=25, help="requests per concurrent client")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (server and in-process)")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="stop starting new rounds after this")
    ap.add_argument("--onnx", type=Path, default=None, help="MiniLM ONNX file (exported if absent)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    console = Console(width=150)
    warnings.simplefilter("ignore")
    ex = _example()
    t_start = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="veil-bench-attested-") as tmp:
        onnx_path = args.onnx
        if onnx_path is None or not onnx_path.exists():
            onnx_path = ex.export_minilm_onnx(args.onnx or Path(tmp) / "minilm.onnx")
        feeds = ex.tokenize(["Confidential computing protects data in use."])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        local = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        reference = local.run(None, feeds)[0]

        srv = ServerProcess(Path(tmp) / "store", extra_args=("--rate", "100000", "--burst", "100000",
                                                             "--threads", str(args.threads)))
        with srv:
            policy = Policy(code_measurement=srv.info["measurement"], simulation_signers=[srv.info["simulation_signer"]],
                            models={"minilm": file_sha256(onnx_path)})
            with connect(srv.url, policy=policy, credential=srv.upload_token, hazmat_allow_simulation=True) as owner:
                up = owner.upload_model(onnx_path, "minilm")
                token = owner.create_run_credential("minilm", credential=up.owner_credential)

            t0 = time.perf_counter()
            attested = connect(srv.url, policy=policy, credential=token, hazmat_allow_simulation=True)
            connect_s = time.perf_counter() - t0
            plain = httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {token}"},
                                 transport=httpx.HTTPTransport(verify=False, socket_options=NODELAY))
            body = {"inputs": {k: encode_tensor(v) for k, v in feeds.items()}}

            def run_local() -> None:
                local.run(None, feeds)

            def run_plain() -> None:
                r = plain.post("/models/minilm/run", json=body)
                r.raise_for_status()
                r.json()

            def run_attested() -> None:
                attested.run_model("minilm", feeds)

            modes = {"onnxruntime in-process": run_local, "server, no attestation": run_plain,
                     "server, attested": run_attested}
            for fn in modes.values():  # warm-up
                for _ in range(5):
                    fn()
            lat: dict[str, list[float]] = {k: [] for k in modes}
            per_round = max(1, args.requests // args.rounds)
            for _ in range(args.rounds):
                if time.monotonic() - t_start > args.max_seconds:
                    break
                for name, fn in modes.items():
                    for _ in range(per_round):
                        t = time.perf_counter()
                        fn()
                        lat[name].append(time.perf_counter() - t)
            out = attested.run_model("minilm", feeds)["last_hidden_state"]
            max_diff = float(np.abs(out - reference).max())

            # concurrent attested clients
            conc: list[float] = []
            failures: list[str] = []
            lock = threading.Lock()

            def client() -> None:
                try:
                    with connect(srv.url, policy=policy, credential=token, hazmat_allow_simulation=True) as c:
                        for _ in range(args.per_client):
                            t = time.perf_counter()
                            c.run_model("minilm", feeds)
                            with lock:
                                conc.append(time.perf_counter() - t)
                except Exception as e:  # counted and reported, never hidden
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=max(10.0, args.max_seconds))
            wall = time.perf_counter() - t0
            attested.close()
            plain.close()

    stats = {k: pct(v) for k, v in lat.items()}
    stats["attested, concurrent"] = pct(conc) if conc else {"n": 0, "p50": float("nan"), "p90": float("nan"),
                                                              "p99": float("nan"), "mean": float("nan")}
    base_local, base_plain = stats["onnxruntime in-process"]["p50"], stats["server, no attestation"]["p50"]
    table = Table(title=f"attested mode, all-MiniLM-L6-v2, 1 sentence ({feeds['input_ids'].shape[1]} tokens), "
                        f"{args.threads} ORT thread(s), loopback")
    for col in ("mode", "requests", "failed", "p50 ms", "p90 ms", "p99 ms", "mean ms", "p50 / in-process",
                "p50 / no attestation"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for name, s in stats.items():
        failed = len(failures) if name == "attested, concurrent" else 0
        table.add_row(name, str(s["n"]), str(failed), f"{s['p50']:.2f}", f"{s['p90']:.2f}", f"{s['p99']:.2f}",
                      f"{s['mean']:.2f}", f"{s['p50'] / base_local:.2f}x", f"{s['p50'] / base_plain:.3f}x")
    console.print(table)
    overhead = stats["server, attested"]["p50"] / base_plain - 1
    console.print(f"attestation + key pinning at connect: {connect_s * 1e3:.1f} ms; "
                  f"concurrent: {args.clients} clients, {len(conc)} requests in {wall:.1f} s "
                  f"({len(conc) / wall:.1f} req/s), {len(failures)} failed")
    console.print(f"p50 overhead of attested vs same server without attestation: {overhead * 100:+.1f}% "
                  f"(target within 10%: {'met' if abs(overhead) <= 0.10 else 'NOT met'}); "
                  f"max |server - in-process| = {max_diff:.1e}")
    for f in failures[:5]:
        console.print(f"[red]failure:[/red] {f}")
    if args.json:
        args.json.write_text(json.dumps({"stats": stats, "connect_ms": connect_s * 1e3, "failures": failures,
                                         "concurrent_wall_s": wall, "overhead_p50": overhead}, indent=2))
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
