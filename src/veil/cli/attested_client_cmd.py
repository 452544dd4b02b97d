"""``veil attested upload`` and ``veil attested run``: the Python client (:func:`veil.attested.connect`)
as commands, with the same attestation checks before anything is sent.

Both verify the server first (code measurement, TLS key, freshness; simulated evidence is refused
unless ``--hazmat-allow-simulation`` and its signer is pinned with ``--simulation-signer``) and say on
stderr when the server is a simulation. Credentials are read from files and written to files (mode
0600), never printed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.text import Text

from veil.cli.error_line import error_line
from veil.errors import InputError, VeilError
from veil.options import read_inputs

__all__ = ["upload", "run", "fail"]

console = Console()
err = Console(stderr=True)

_SERVER = typer.Option(..., "--server", help="the server: host:port or https://host:port")
_CREDENTIAL = typer.Option(..., "--credential-file",
                           help="file holding the credential (upload: the operator's STATE_DIR/upload.token; "
                                "run: the model's owner or run credential)")
_MEASUREMENT = typer.Option(None, help="expected code measurement (default: this installation's `veil attested "
                                       "measure`)")
_SIGNER = typer.Option(None, "--simulation-signer", "--pin",
                       help="hex simulation public key to trust (`veil attested serve` prints it); simulated "
                            "evidence is refused without it")
_SIMULATION = typer.Option(False, "--hazmat-allow-simulation", help="accept SIMULATED evidence (development only)")


def fail(e: VeilError) -> NoReturn:
    """The attested group's error (every ``veil attested`` command): one line naming the error's class, exit 2."""
    err.print(error_line(f"{type(e).__name__}: {e}", "red"), soft_wrap=True)
    raise typer.Exit(2)


def _read_credential(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--credential-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not token or len(token.split()) != 1:
        raise InputError(f"--credential-file {path}: expected one credential on one line")
    return token


def _write_secret(path: Path, value: str, what: str) -> None:
    """Write a credential to a new file readable by its owner only; an existing file is not replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InputError(f"{what} {path} already exists; choose another file (it is not replaced)") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot create it ({e.strerror})") from None
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


@contextmanager
def _attested(server: str, credential: str, measurement: str | None, signer: str | None, allow_simulation: bool,
              models: dict[str, str] | None = None) -> Iterator[Any]:
    """Verify ``server``, pin its key, and yield the connection; print what was verified."""
    from veil.attested import Policy, SimulationNotAllowedError, UntrustedSignerError, connect
    from veil.attested.measure import local_code_measurement
    from veil.simulation import SimulationWarning

    policy = Policy(code_measurement=measurement or local_code_measurement(),
                    simulation_signers=frozenset([signer]) if signer else None, models=models or {})
    err.print(f"attesting {server} ...")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conn = connect(server, policy=policy, credential=credential, hazmat_allow_simulation=allow_simulation)
    except UntrustedSignerError as e:
        if e.signer is not None:
            err.print(f"[yellow]the evidence names simulation signer {e.signer}: check it against the key "
                      "`veil attested serve` printed at start, then pass --simulation-signer[/yellow]", soft_wrap=True)
        raise
    except SimulationNotAllowedError:
        err.print("[yellow]the server is a simulation: only for development, accept it with "
                  "--hazmat-allow-simulation and --simulation-signer[/yellow]", soft_wrap=True)
        raise
    ev = conn.evidence
    for w in caught:
        if not issubclass(w.category, SimulationWarning):  # said below, once, in the CLI's words
            err.print(Text.assemble(("warning:", "yellow"), f" {w.message}"), soft_wrap=True)
    if ev.simulated:
        err.print(Text("SIMULATED enclave: no hardware protects the model, the inputs or the outputs on this server "
                       f"(simulation signer {ev.report.signer}, pinned); development only", style="bold yellow"),
                  soft_wrap=True)
    err.print(f"verified: platform {ev.report.platform}, code {ev.report.measurement[:16]}..., TLS key "
              f"{ev.tls_spki_sha256[:16]}... pinned", soft_wrap=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)  # each fresh evidence would warn again
            yield conn
    finally:
        conn.close()


def _load_inputs(path: Path) -> Any:
    if path.suffix not in (".npy", ".npz"):
        raise InputError(f"--input must be a .npy file (the model's one input, or its first) or a .npz file (inputs "
                         f"by name); got {path.name!r}")
    return read_inputs(path)


def upload(
    model: Path = typer.Argument(..., help="the ONNX model file"),
    server: str = _SERVER,
    credential_file: Path = _CREDENTIAL,
    model_id: str | None = typer.Option(None, help="model id on the server (default: the file name without .onnx)"),
    owner_credential_out: Path | None = typer.Option(
        None, help="write the model's owner credential here, mode 0600 (default: MODEL_ID.owner.token); "
                   "an existing file is not replaced"),
    run_credential_out: Path | None = typer.Option(
        None, help="also issue a run-only credential and write it here (mode 0600)"),
    measurement: str | None = _MEASUREMENT,
    simulation_signer: str | None = _SIGNER,
    hazmat_allow_simulation: bool = _SIMULATION,
) -> None:
    """Attest the server, then upload MODEL over the pinned channel; the owner credential goes to a file."""
    import hashlib

    try:
        mid = model_id or model.name.removesuffix(".onnx")
        try:
            data = model.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read the model {model}: {e.strerror}") from None
        owner_out = owner_credential_out or Path(f"{mid}.owner.token")
        for out in (owner_out, run_credential_out):
            if out is not None and out.exists():
                raise InputError(f"{out} already exists; choose another file (credentials are never overwritten)")
        token = _read_credential(credential_file)
        sha = hashlib.sha256(data).hexdigest()
        with _attested(server, token, measurement, simulation_signer, hazmat_allow_simulation, {mid: sha}) as conn:
            err.print(f"uploading {model.name} as {mid!r} ({len(data):,} bytes, sha256 {sha[:16]}...)")
            up = conn.upload_model(data, mid)  # the server's hash of what it received must equal sha
            if up.owner_credential is None:
                raise InputError("the server returned no owner credential")
            _write_secret(owner_out, up.owner_credential, "--owner-credential-out")
            if run_credential_out is not None:
                _write_secret(run_credential_out, conn.create_run_credential(mid, credential=up.owner_credential),
                              "--run-credential-out")
    except VeilError as e:
        fail(e)
    console.print(f"uploaded {up.model_id}: {up.size:,} bytes, sha256 {up.sha256}", soft_wrap=True)
    console.print(f"owner credential written to {owner_out}"
                  + (f", run credential to {run_credential_out}" if run_credential_out is not None else ""))


def run(
    model_id: str = typer.Argument(..., help="model id on the server"),
    inputs: Path = typer.Option(..., "--input", help=".npy (one input) or .npz (inputs by name)"),
    server: str = _SERVER,
    credential_file: Path = _CREDENTIAL,
    out: Path | None = typer.Option(None, help="write every output to this .npz file"),
    model_sha256: str | None = typer.Option(None, help="require the model's attested SHA-256 (hex) to be this"),
    measurement: str | None = _MEASUREMENT,
    simulation_signer: str | None = _SIGNER,
    hazmat_allow_simulation: bool = _SIMULATION,
) -> None:
    """Attest the server and the model, run MODEL_ID on the inputs, print (and --out: save) the outputs."""
    try:
        if out is not None and out.suffix != ".npz":
            raise InputError(f"--out must end in .npz; got {out.name!r}")
        if out is not None and not out.parent.is_dir():
            raise InputError(f"--out {out}: folder {out.parent} does not exist")
        feed = _load_inputs(inputs)
        token = _read_credential(credential_file)
        models = {model_id: model_sha256} if model_sha256 else None
        with _attested(server, token, measurement, simulation_signer, hazmat_allow_simulation, models) as conn:
            sha = conn.attest_model(model_id)
            err.print(f"model {model_id!r} attested: sha256 {sha[:16]}...; running")
            result = conn.run_model(model_id, feed)
    except VeilError as e:
        fail(e)
    for name, value in result.items():
        flat = value.reshape(-1)
        console.print(f"{name}: {value.dtype} {tuple(value.shape)} " + np.array2string(flat[:8], precision=4)
                      + (" ..." if flat.size > 8 else ""), soft_wrap=True)
    if out is not None:
        np.savez(out, **dict(result.outputs))  # type: ignore[arg-type]  # numpy stubs check **kwds against allow_pickle
        console.print(f"{len(result)} outputs written to {out}")
