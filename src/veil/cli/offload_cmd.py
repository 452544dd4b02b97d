"""``veil offload ...``: compile, run and deploy offload mode (enclave + untrusted accelerators).

* ``veil offload plan MODEL``: show the enclave/accelerator split the compiler derives.
* ``veil offload run MODEL --hazmat-simulate``: enclave and accelerator(s) as threads in this process,
  compared with the plain executor (agreement, max error, bytes, times).
* ``veil offload enclave|accelerator|user -d FILE``: one party of a deployment over mutual TLS
  (the same as ``veil party -d FILE --as NAME``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app"]

app = typer.Typer(help="Offload mode: a trusted enclave runs non-linear layers, untrusted accelerators the "
                       "linear ones on one-time-blinded data.", no_args_is_help=True)
console = Console()


@app.command()
def plan(model: str = typer.Argument(..., help="ONNX file or shipped network A-D"),
         weight_privacy: str = typer.Option("none", help="none (Slalom: accelerator sees weights) or shares")) -> None:
    """Print the split of MODEL into enclave segments and accelerator rounds."""
    from veil.offload.compile import compile_offload
    from veil.offload.party import load_offload_model

    p = compile_offload(load_offload_model(model), weight_privacy)
    console.print(p.describe())
    t = Table(title="accelerator layers")
    for c in ("layer", "op", "inner K", "outputs", "weight bits fw"):
        t.add_column(c)
    for lay in p.layers:
        t.add_row(lay.node.name, lay.kind, str(lay.inner), str(lay.out_features), str(lay.fw))
    console.print(t)


@app.command()
def run(
    model: str = typer.Argument(..., help="ONNX file or shipped network A-D"),
    inputs: Path = typer.Option(None, help=".npy input batch (default: the shipped MNIST slice)"),
    n: int = typer.Option(64, help="images from the shipped slice when --inputs is not given"),
    batch: int = typer.Option(64, help="samples per query"),
    weight_privacy: str = typer.Option("none", help="none or shares (two non-colluding accelerators)"),
    backend: str = typer.Option("auto", help="accelerator backend: auto, numpy, torch, torch-cpu, torch-cuda"),
    freivalds_reps: int = typer.Option(1, help="Freivalds repetitions (miss probability p^-reps per wrong row)"),
    hazmat_simulate: bool = typer.Option(False, "--hazmat-simulate",
                                         help="accept a SIMULATED enclave (no SGX here; no hardware protection)"),
) -> None:
    """Run MODEL in offload mode in this process and compare with the plain executor."""
    from veil.offload import OffloadEnclave, SimulatedEnclaveRuntime, run_offload_local
    from veil.offload.party import load_offload_model
    from veil.plain import run_plain

    graph = load_offload_model(model)
    labels = None
    if inputs is not None:
        x = np.load(inputs, allow_pickle=False)
    else:
        from veil.assets import load_slice

        x, labels = load_slice(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runtime = SimulatedEnclaveRuntime(hazmat_allow_simulation=hazmat_simulate)
    console.print(f"[bold yellow]warning:[/] {runtime.describe()}")
    enc = OffloadEnclave(graph, runtime, weight_privacy=weight_privacy, freivalds_reps=freivalds_reps)
    offline = enc.precompute(len(x))
    queries = [x[i:i + batch] for i in range(0, len(x), batch)]
    res = run_offload_local(enc, queries, backend=backend)
    out = np.concatenate([next(iter(o.values())) for o in res.outputs])
    ref = next(iter(run_plain(graph, x, dtype=np.float64).values()))
    t = Table(title=f"offload mode: {graph.name}, {len(x)} samples, weight privacy {weight_privacy!r}")
    t.add_column("figure")
    t.add_column("value")
    t.add_row("accelerator backend(s)", ", ".join(f"{k}={v}" for k, v in res.backends.items()))
    t.add_row("max |offload - plain|", f"{np.abs(out - ref).max():.2e}")
    if out.ndim == 2:
        t.add_row("same class as plain", f"{(out.argmax(-1) == ref.argmax(-1)).mean():.2%}")
    if labels is not None and out.ndim == 2:
        t.add_row("accuracy (held-out slice)", f"{(out.argmax(-1) == labels).mean():.2%}")
    t.add_row("offline phase", f"{offline:.3f} s")
    t.add_row("online (enclave)", f"{res.timing['online_s']:.3f} s")
    t.add_row("bytes enclave -> accelerators", f"{res.stats['enclave'].bytes_sent:,}")
    t.add_row("bytes accelerators -> enclave", f"{res.stats['enclave'].bytes_recv:,}")
    t.add_row("rounds", str(res.counters["rounds"]))
    t.add_row("Freivalds checks (miss prob. each)", f"{res.counters['freivalds_checks']:,} ({enc.soundness_error:.1e})")
    t.add_row("material left (samples)", str(res.material_left))
    console.print(t)


def _party(deployment: Path, name: str) -> None:
    from veil.net import connect_tls, load_deployment
    from veil.offload.party import peers_of, run_party

    dep = load_deployment(deployment)
    dep.party(name)
    ch = connect_tls(dep, name, peers_of(dep, name))
    try:
        run_party(dep, name, ch, console)
    finally:
        ch.close()


@app.command()
def enclave(deployment: Path = typer.Option(..., "--deployment", "-d", help="deployment TOML file")) -> None:
    """Run the (simulated) enclave party of an offload deployment."""
    _party(deployment, "enclave")


@app.command()
def accelerator(deployment: Path = typer.Option(..., "--deployment", "-d", help="deployment TOML file"),
                name: str = typer.Option("accelerator", "--as", help="accelerator party name")) -> None:
    """Run an (untrusted) accelerator party of an offload deployment."""
    _party(deployment, name)


@app.command()
def user(deployment: Path = typer.Option(..., "--deployment", "-d", help="deployment TOML file")) -> None:
    """Run the user party: send inputs to the enclave, print the predictions."""
    _party(deployment, "user")
