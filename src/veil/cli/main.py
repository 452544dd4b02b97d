"""``veil``: one command line for every mode.

Foundation commands live here (demo, keys, party, inspect, run); each mode adds its own group
from ``veil/cli/<mode>_cmd.py`` (``veil mpc ...``, ``veil permute ...``, ``veil offload ...``,
``veil attested ...``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import signal
import sys
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from veil.cli.error_line import error_line
from veil.errors import VeilError

app = typer.Typer(name="veil", help="Confidential machine-learning inference.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)

MODES = ("mpc", "permute", "offload", "attested")


def _register_modes() -> None:
    """Add ``veil <mode> ...`` for every mode (each mode owns its ``veil/cli/<mode>_cmd.py``)."""
    for mode in MODES:
        app.add_typer(importlib.import_module(f"veil.cli.{mode}_cmd").app, name=mode)


@app.command()
def demo(
    n: int = typer.Option(64, help="images: the first N of the 2000 shipped held-out images (MNIST test 8000..9999)"),
    model: str = typer.Option("C", help="shipped network: A, B, C or D"),
    plain: bool = typer.Option(False, "--plain", help="plaintext only (no secure computation)"),
    batch_size: int = typer.Option(None, "--batch-size", help="samples per query (default: min(N, 256))"),
) -> None:
    """Run a shipped MNIST network on the shipped held-out images (secure mpc by default)."""
    if not plain:
        from veil.mpc.demo import run_demo

        run_demo(model=model, n=n, console=console, batch_size=batch_size)
        return
    from veil.assets import load_slice, model_path
    from veil.graph import load_model
    from veil.options import check_batch_size
    from veil.plain import run_plain

    check_batch_size(batch_size)  # the same answer to a bad value as the secure demo
    graph = load_model(model_path(model))
    x, y = load_slice(n)
    logits = next(iter(run_plain(graph, x).values()))
    acc = float((logits.argmax(-1) == y).mean())
    t = Table(title=f"network {model.upper()}, plain executor")
    t.add_column("images")
    t.add_column(f"accuracy (held-out MNIST test 8000..{8000 + len(y) - 1})")
    t.add_row(str(len(y)), f"{acc:.2%}")
    console.print(t)


@app.command()
def keys(
    deployment: Path = typer.Option(..., "--deployment", "-d", help="deployment TOML file"),
    out: Path = typer.Option(None, help="key directory (default: the deployment's `keys`)"),
    force: bool = typer.Option(False, "--force", help="replace an existing CA and every party's keys "
                                                      "(the folders already copied to hosts stop working)"),
) -> None:
    """Create a deployment CA and one key and certificate per party, one folder per party."""
    from veil.net import create_keys, load_deployment

    dep = load_deployment(deployment)
    ca_dir = (out if out is not None else dep.keys_dir) / "ca"
    if not force and (ca_dir / "ca.key").exists():
        raise VeilError(f"a deployment CA already exists in {ca_dir}: replacing it would invalidate every party's "
                        "keys already copied to its host; pass --force to replace them all")
    d = create_keys(dep, out)
    console.print(f"wrote the CA to {d / 'ca'} (keep ca.key on this machine only) and one folder per party "
                  f"({', '.join(str(d / p) for p in dep.parties)}): copy each folder to that party's host only "
                  "(private keys mode 0600)")


@app.command()
def party(
    deployment: Path = typer.Option(..., "--deployment", "-d", help="deployment TOML file"),
    name: str = typer.Option(..., "--as", help="the party this process plays"),
) -> None:
    """Run one party of a deployment (the mode's role for that party name)."""
    from veil.net import load_deployment

    dep = load_deployment(deployment)
    dep.party(name)
    try:
        mod = importlib.import_module(f"veil.{dep.mode}.party")
    except ModuleNotFoundError:
        with_roles = [m for m in MODES if importlib.util.find_spec(f"veil.{m}.party") is not None]
        raise VeilError(f"deployment mode {dep.mode!r} has no party roles; modes with party roles: "
                        f"{', '.join(with_roles)}") from None
    from veil.net import connect_tls

    peers = mod.peers_of(dep, name) if hasattr(mod, "peers_of") else None
    channel = connect_tls(dep, name, peers)
    console.print(f"party {name}: connected to {', '.join(channel.peers)} over mutual TLS")
    try:
        with channel.aborting():  # on any error the peers are told why and stop at once
            mod.run_party(dep, name, channel, console)
    finally:
        channel.close()


def _model_file(model: Path) -> Path:
    """``model``, or the shipped network of that name (A-D) when no such file exists, as in ``veil mpc run C``."""
    from veil.assets import NETWORKS, model_path

    return model_path(str(model)) if not model.exists() and str(model).upper() in NETWORKS else model


@app.command()
def inspect(model: Path = typer.Argument(..., help="ONNX model file or shipped network A-D"),
            mode: str = typer.Option(None, "--mode", help="also check that this mode (mpc, offload, plain) runs every op")) -> None:
    """Load a model into veil's graph and print it."""
    from veil.graph import load_model

    console.print(load_model(_model_file(model), mode=mode).summary())
    if mode is not None:
        console.print(f"every operator runs in {mode} mode")


@app.command()
def run(
    model: Path = typer.Argument(..., help="ONNX model file or shipped network A-D"),
    inputs: Path = typer.Argument(..., help=".npy file (one input) or .npz file (named inputs)"),
    out: Path = typer.Option(None, help="write outputs to this .npz file"),
) -> None:
    """Run a model with the plain (reference) executor."""
    from veil.graph import load_model
    from veil.plain import run_plain

    graph = load_model(_model_file(model))
    if out is not None and not out.parent.is_dir():
        raise VeilError(f"--out {out}: folder {out.parent} does not exist")
    try:
        data = np.load(inputs, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise VeilError(f"cannot read inputs from {inputs}: expected a .npy or .npz file ({e})") from None
    feed = dict(data) if isinstance(data, np.lib.npyio.NpzFile) else data
    result = run_plain(graph, feed)
    for k, v in result.items():
        console.print(f"{k}: shape {v.shape}, argmax {v.reshape(v.shape[0], -1).argmax(-1)[:16].tolist()}")
    if out:
        np.savez(out, **result)  # type: ignore[arg-type]  # numpy stubs check **kwds against allow_pickle


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (``timeout``, ``kill``, a service manager) ends veil as Ctrl-C does: ``finally`` blocks run,
    so the party processes a command started (``veil demo``, ``veil mpc local``...) are stopped and its
    temporary files removed instead of being left running. A second SIGTERM kills at once. Servers that
    handle the signal themselves (uvicorn) replace this handler while they serve."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _exit_cleanly_on_sigterm()
    try:
        app()
    except VeilError as e:
        err_console.print(error_line(str(e)))
        sys.exit(2)
    except OSError as e:  # a file the user named cannot be read or written (e.g. --out in a missing folder)
        where = f": {e.filename}" if e.filename else ""
        err_console.print(error_line(f"{e.strerror or e}{where}"))
        sys.exit(2)


_register_modes()

if __name__ == "__main__":
    main()
