"""``veil offload ...``: compile, run and deploy offload mode (enclave + untrusted accelerators).

* ``veil offload plan MODEL``: show the enclave/accelerator split the compiler derives.
* ``veil offload run MODEL --hazmat-allow-simulation``: enclave and accelerator(s) as threads in this process,
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
    inputs: Path = typer.Option(None, help=".npy input batch or .npz of named inputs (default: shipped MNIST images)"),
    n: int = typer.Option(64, help="the first N shipped held-out images when --inputs is not given"),
    batch_size: int = typer.Option(64, "--batch-size", help="samples per query"),
    batch: int = typer.Option(None, "--batch", hidden=True, help="old name of --batch-size"),
    weight_privacy: str = typer.Option("none", help="none or shares (two non-colluding accelerators)"),
    backend: str = typer.Option("auto", help="accelerator backend: auto, numpy, torch, torch-cpu, torch-cuda"),
    freivalds_reps: int = typer.Option(1, help="Freivalds repetitions (miss probability p^-reps per wrong row)"),
    hazmat_allow_simulation: bool = typer.Option(
        False, "--hazmat-allow-simulation", help="accept a SIMULATED enclave (no SGX here; no hardware protection)"),
    hazmat_simulate: bool = typer.Option(False, "--hazmat-simulate", hidden=True,
                                         help="old name of --hazmat-allow-simulation"),
) -> None:
    """Run MODEL in offload mode in this process and compare with the plain executor."""
    from veil.offload import run as offload_run
    from veil.options import check_batch_size, read_inputs
    from veil.simulation import SimulationWarning

    per_query = check_batch_size(batch if batch is not None else batch_size, "--batch-size")
    labels = None
    if inputs is not None:
        x = read_inputs(inputs)
    else:
        from veil.assets import load_slice

        x, labels = load_slice(n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SimulationWarning)
        out, rep = offload_run(model, x, batch_size=per_query, weight_privacy=weight_privacy, backend=backend,
                               freivalds_reps=freivalds_reps,
                               hazmat_allow_simulation=hazmat_allow_simulation or hazmat_simulate)
    for w in {str(w.message) for w in caught if issubclass(w.category, SimulationWarning)}:
        console.print(f"[bold yellow]warning:[/] {w}")
    first = out if isinstance(out, np.ndarray) else next(iter(out.values()))
    t = Table(title=f"offload mode: {Path(model).name}, {rep.images} samples, weight privacy {weight_privacy!r}")
    t.add_column("figure")
    t.add_column("value")
    t.add_row("accelerator backend(s)", ", ".join(f"{k}={v}" for k, v in rep.backends.items()))
    t.add_row("max |offload - plain|", f"{rep.max_abs_error:.2e}")
    if rep.agreement is not None:
        t.add_row("same class as plain", f"{rep.agreement:.2%}")
    if labels is not None and first.ndim == 2:
        t.add_row(f"accuracy (held-out MNIST test 8000..{8000 + len(labels) - 1})",
                  f"{(first.argmax(-1) == labels).mean():.2%}")
    t.add_row("queries x batch", f"{rep.queries} x {rep.batch}")
    t.add_row("offline phase", f"{rep.offline_s:.3f} s")
    t.add_row("online (enclave)", f"{rep.online_s:.3f} s")
    t.add_row("bytes enclave -> accelerators", f"{rep.bytes_to_accelerators:,}")
    t.add_row("bytes accelerators -> enclave", f"{rep.bytes_from_accelerators:,}")
    t.add_row("rounds", str(rep.rounds))
    t.add_row("Freivalds checks (miss prob. each)", f"{rep.freivalds_checks:,} ({rep.soundness_error:.1e})")
    t.add_row("material left (samples)", str(rep.material_left))
    console.print(t)


def _party(deployment: Path, name: str) -> None:
    from veil.net import connect_tls, load_deployment
    from veil.offload.party import peers_of, run_party

    dep = load_deployment(deployment)
    dep.party(name)
    ch = connect_tls(dep, name, peers_of(dep, name))
    try:
        with ch.aborting():  # on any error the peers are told why and stop at once
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


@app.command()
def train(
    model: str = typer.Argument(..., help="initial model: an .onnx file, A-D (SecureNN architecture, seeded random "
                                          "initial weights) or deep-crossing"),
    data: str = typer.Option("auto", help="mnist (images 0..7999 of the shared MNIST file ../shared/data/mnist_test.npz "
                                          "or $VEIL_MNIST), mnist-slice (the first 256 shipped HELD-OUT images "
                                          "8000..8255: a smoke test only; a model trained on them must not be scored on "
                                          "the held-out set), clicks (synthetic), or an .npz with inputs and y; auto "
                                          "(default): mnist when the shared file is there, else mnist-slice (said at start)"),
    n: int = typer.Option(None, help="use only the first N training samples"),
    optimizer: str = typer.Option("adam", help="sgd (with momentum) or adam"),
    lr: float = typer.Option(1e-3, help="learning rate"),
    momentum: float = typer.Option(0.9, help="SGD momentum"),
    epochs: int = typer.Option(1, help="epochs"),
    batch_size: int = typer.Option(64, help="batch size"),
    seed: int = typer.Option(0, help="seed of the initial weights (A-D, deep-crossing) and of the data order"),
    max_steps: int = typer.Option(None, help="stop after this many steps"),
    out: Path = typer.Option(Path("trained.onnx"), help="where to write the trained model (ONNX)"),
    backend: str = typer.Option("auto", help="accelerator backend: auto, numpy, torch, torch-cpu, torch-cuda"),
    checkpoint_every: int = typer.Option(0, help="seal a checkpoint every K steps (0: never)"),
    min_intensity: float = typer.Option(16.0, help="products with nkm/(nk+km+nm) below this stay in the enclave "
                                                   "(a convolution: nkm over its tensors' sizes; 0: offload every "
                                                   "product); the count is printed at start"),
    precision: str = typer.Option("double", help="secure field products per product: single (one; ~1e-3 error "
                                                 "relative to the largest output) or double (two, same round; ~1e-6)"),
    resume: bool = typer.Option(False, help="resume from the sealed checkpoint in --workdir"),
    workdir: Path = typer.Option(None, help="keep deployment, keys, logs and checkpoint here (default: a temp dir)"),
    deployment: Path = typer.Option(None, "--deployment", "-d",
                                    help="play the data owner of this running deployment instead of starting parties"),
    hazmat_allow_simulation: bool = typer.Option(
        False, "--hazmat-allow-simulation", help="accept a SIMULATED enclave (no SGX here; no hardware protection)"),
    old_hazmat_simulate: bool = typer.Option(False, "--hazmat-simulate", hidden=True,
                                             help="old name of --hazmat-allow-simulation"),
) -> None:
    """Train MODEL privately: a (simulated) enclave plus three untrusted accelerators as processes over mutual TLS."""
    hazmat_simulate = hazmat_allow_simulation or old_hazmat_simulate
    import tempfile
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from veil.errors import SimulationNotAllowedError

    opts: dict = {"model": str(Path(model).resolve()) if Path(model).is_file() else model,
                  "data": str(Path(data).resolve()) if Path(data).is_file() else data,
                  "optimizer": optimizer, "lr": lr, "momentum": momentum, "epochs": epochs, "batch_size": batch_size,
                  "seed": seed, "backend": backend, "hazmat_allow_simulation": hazmat_simulate, "output": "trained.onnx",
                  "min_intensity": min_intensity, "precision": precision}
    if n is not None:
        opts["n"] = n
    if max_steps is not None:
        opts["max_steps"] = max_steps
    from veil.offload.training.party import train_config

    train_config(opts)  # every setting checked before anything starts (VeilError: one line, exit 2)
    if data == "auto":
        from veil.offload.training.data import mnist_path

        data = "mnist" if mnist_path().is_file() else "mnist-slice"
        opts["data"] = data
        console.print(f"data: {data}" + (" (images 0..7999 of the shared MNIST file)" if data == "mnist" else
                                         f" (the shared MNIST file {mnist_path()} is missing: 256 shipped HELD-OUT "
                                         "images, a smoke test only)"))
    if checkpoint_every or resume:
        opts.update({"checkpoint": "train.ckpt", "checkpoint_every": checkpoint_every, "resume": resume,
                     "sealing_key": "sealing.key"})
    if not hazmat_simulate and deployment is None:
        raise SimulationNotAllowedError("offload training: no SGX enclave is available here and the simulated enclave "
                                        "gives no hardware protection; pass --hazmat-allow-simulation to run it anyway")
    console.print("[bold yellow]warning:[/] the enclave is SIMULATED (software only, no SGX); three accelerators "
                  "(two share holders, one triple helper) must not collude pairwise")
    request = None
    if deployment is None:
        from veil.offload.training.party import owner_request
        from veil.offload.training.trainer import TrainConfig, Trainer

        request = owner_request(opts)
        plan = Trainer(request["model"], request["feeds"], request["labels"],
                       TrainConfig.from_dict(request["config"])).product_plan(min_intensity)
        sent = sum(off for _, _, off in plan)
        from veil.offload.training.precision import SECURE_PRODUCTS

        per = SECURE_PRODUCTS[precision]
        console.print(f"per step: {len(plan)} products; {sent} offloaded to the accelerators ({sent * per} secure "
                      f"products at precision {precision}), {len(plan) - sent} kept inside the enclave (arithmetic "
                      f"intensity nkm/(nk+km+nm), a convolution's over its tensors' sizes, below --min-intensity "
                      f"{min_intensity:g})")
        if not sent:
            top = max((intensity for _, intensity, _ in plan), default=0.0)
            console.print(f"[bold yellow]warning:[/] nothing is offloaded: the highest arithmetic intensity of {model} at "
                          f"batch {batch_size} is {top:.1f}; pass --min-intensity 0 to offload every product")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("training", total=None, info="starting parties")

        def on_progress(m: dict) -> None:
            bar.update(task, completed=m["step"], total=m["total"],
                       info=f"epoch {m['epoch']} loss {m['loss']:.4f} {m['samples_per_s']:.1f} samples/s")

        t0 = time.perf_counter()
        if deployment is not None:
            from veil.net import connect_tls, load_deployment
            from veil.offload.training.party import owner_request, run_owner

            dep = load_deployment(deployment)
            ch = connect_tls(dep, "owner", ["enclave"])
            try:
                res = run_owner(ch, owner_request({**dep.options, **opts}, base=dep.path.parent if dep.path else None),
                                timeout=dep.timeout * 20, on_progress=on_progress)
            finally:
                ch.close()
        else:
            from veil.offload.training.launch import run_train_deployment

            if workdir is None:
                with tempfile.TemporaryDirectory(prefix="veil-offload-train-") as tmp:
                    res = run_train_deployment(tmp, opts, on_progress=on_progress, request=request)
            else:
                res = run_train_deployment(workdir, opts, on_progress=on_progress, request=request)
    out.write_bytes(res["onnx"])
    wall = time.perf_counter() - t0
    c = res["counters"]
    t = Table(title=f"offload training: {model} on {data}")
    t.add_column("figure")
    t.add_column("value")
    t.add_row("steps (this run / total)", f"{res['steps_this_run']} / {res['steps']}")
    t.add_row("first / last loss", f"{res['history'][0]:.4f} / {res['history'][-1]:.4f}" if res["history"] else "-")
    t.add_row("wall time (incl. process start)", f"{wall:.1f} s")
    enclave_s = res["timing"]["enclave_s"] + c["enclave_s"]
    t.add_row("enclave work / accelerator wait", f"{enclave_s:.2f} s / {c['wait_s']:.2f} s "
              f"(enclave {enclave_s / max(res['wall_s'], 1e-9):.0%} of the training time)")
    t.add_row("secure products (rounds), Freivalds checks", f"{int(c['products'])} ({int(c['rounds'])}), {int(c['freivalds_checks'])} "
              f"(miss prob. {res['soundness_error_per_row']:.1e} per wrong row)")
    t.add_row("bytes enclave -> / <- accelerators+owner", f"{res['bytes_sent']:,} / {res['bytes_recv']:,}")
    if data == "mnist":
        from veil.graph import load_model
        from veil.offload.training.data import load_mnist
        from veil.plain import run_plain

        xh, yh = load_mnist("heldout")
        pred = next(iter(run_plain(load_model(res["onnx"]), xh).values())).argmax(-1)
        t.add_row("held-out accuracy (images 8000..9999)", f"{(pred == yh).mean():.2%}")
    t.add_row("trained model", str(out))
    console.print(t)
