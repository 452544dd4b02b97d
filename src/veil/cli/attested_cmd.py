"""``veil attested ...``: serve models in a (simulated) enclave, print measurements, check a server,
upload a model and run it (``attested_client_cmd.py``), verify hardware evidence (``attested_verify_cmd.py``)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from veil.cli.attested_client_cmd import fail as _fail
from veil.cli.attested_client_cmd import run as _run_model
from veil.cli.attested_client_cmd import upload as _upload_model
from veil.cli.attested_verify_cmd import verify as _verify_evidence_file
from veil.errors import VeilError

__all__ = ["app"]

app = typer.Typer(help="Attested mode: confidential ONNX inference server and verifying client.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command(name="verify")(_verify_evidence_file)
app.command(name="upload")(_upload_model)
app.command(name="run")(_run_model)
console = Console()
err = Console(stderr=True)


@app.command()
def serve(
    store: Path = typer.Option(..., help="directory of the sealed model store (created if absent)"),
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8443, help="TCP port (0: pick a free one, see --ready-file)"),
    hazmat_allow_simulation: bool = typer.Option(
        False, "--hazmat-allow-simulation",
        help="run a SIMULATED enclave (no hardware TEE; development only); the same flag as offload's"),
    old_hazmat_simulate_enclave: bool = typer.Option(False, "--hazmat-simulate-enclave", hidden=True,
                                                     help="old name of --hazmat-allow-simulation"),
    platform: str = typer.Option(
        "auto", help="auto (the machine's SEV-SNP or TDX via configfs-tsm; else the simulation if "
                     "--hazmat-allow-simulation), simulated, sev-snp or tdx"),
    tsm_root: Path | None = typer.Option(None, help="configfs-tsm report directory (default /sys/kernel/config/tsm/report)"),
    ephemeral_sealing: bool = typer.Option(
        False, "--ephemeral-sealing", help="hardware without a sealing key (TDX): seal under a random in-memory key; "
                                           "the store cannot be reopened after a restart"),
    max_model_mb: float = typer.Option(256.0, help="largest model upload, MiB actually received"),
    max_input_elements: int = typer.Option(4 * 1024 * 1024, help="most input elements in one run request"),
    max_request_mb: float = typer.Option(64.0, help="largest run request body, MiB actually received"),
    rate: float = typer.Option(100.0, help="requests per second per credential"),
    burst: int = typer.Option(200, help="burst of requests per credential"),
    max_models: int = typer.Option(64, help="most models in the store"),
    max_output_mb: float = typer.Option(64.0, help="largest total output of one run, MiB"),
    max_run_seconds: float = typer.Option(60.0, help="longest run; onnxruntime stops a run past it"),
    max_run_memory_mb: float = typer.Option(
        4096.0, help="onnxruntime memory of all runs in progress together, MiB (refused before allocating)"),
    state_dir: Path | None = typer.Option(
        None, help="directory for the server's secrets, outside the store (default: under the user's config "
                   "directory, one per store)"),
    upload_token_file: Path | None = typer.Option(
        None, help="file with the operator's upload credential (default STATE_DIR/upload.token, created if absent)"),
    platform_dir: Path | None = typer.Option(
        None, help="simulated platform key directory (default STATE_DIR/simulated-platform)"),
    threads: int = typer.Option(1, help="onnxruntime intra-op threads per model"),
    ready_file: Path | None = typer.Option(None, help="write JSON (url, port, measurement, signer) here when ready"),
    log_level: str = typer.Option("warning", help="uvicorn log level"),
) -> None:
    """Serve ONNX models over attested TLS."""
    from veil.attested.limits import Limits
    from veil.attested.serve import serve as run_server

    limits = Limits(max_model_bytes=int(max_model_mb * 1024 * 1024), max_input_elements=max_input_elements,
                    max_request_bytes=int(max_request_mb * 1024 * 1024), rate_per_s=rate, burst=burst,
                    max_models=max_models, max_output_bytes=int(max_output_mb * 1024 * 1024),
                    max_run_seconds=max_run_seconds, max_run_memory_bytes=int(max_run_memory_mb * 1024 * 1024))
    try:
        run_server(store, host, port, hazmat_allow_simulation=hazmat_allow_simulation or old_hazmat_simulate_enclave,
                   limits=limits,
                   upload_token_file=upload_token_file, platform_dir=platform_dir, intra_op_threads=threads,
                   ready_file=ready_file, log_level=log_level, state_dir=state_dir, platform_kind=platform,
                   tsm_root=tsm_root, ephemeral_sealing=ephemeral_sealing)
    except VeilError as e:
        _fail(e)


@app.command()
def measure() -> None:
    """Print the code measurement a server running this installation reports."""
    from veil.attested.measure import local_code_measurement

    console.print(local_code_measurement())


@app.command()
def attest(
    address: str = typer.Argument(..., help="host:port of the server"),
    measurement: str | None = typer.Option(None, help="expected code measurement (default: this installation's)"),
    simulation_signer: str | None = typer.Option(
        None, help="hex simulation public key to trust (simulated evidence is refused without it; "
                   "`veil attested serve` prints it at start)"),
    hazmat_allow_simulation: bool = typer.Option(False, "--hazmat-allow-simulation",
                                                 help="accept SIMULATED evidence (development only)"),
) -> None:
    """Verify a server's attestation and print what it proves."""
    from veil.attested import Policy, UntrustedSignerError, connect
    from veil.attested.measure import local_code_measurement

    policy = Policy(code_measurement=measurement or local_code_measurement(),
                    simulation_signers=frozenset([simulation_signer]) if simulation_signer else None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with connect(address, policy=policy, hazmat_allow_simulation=hazmat_allow_simulation) as conn:
                ev = conn.evidence
        for w in caught:
            err.print(f"[yellow]warning:[/yellow] {w.message}")
    except UntrustedSignerError as e:
        if e.signer is not None:  # the value to pin, from the (so far unverified) evidence
            console.print(f"simulation signer: {e.signer}", soft_wrap=True)
            err.print("[yellow]to trust it, check it against the key `veil attested serve` printed at start, then "
                      f"pass --simulation-signer {e.signer}[/yellow]")
        _fail(e)
    except VeilError as e:
        _fail(e)
    table = Table(title=f"attestation of {address}: verified")
    table.add_column("claim")
    table.add_column("value")
    table.add_row("platform", ev.report.platform + (" (SIMULATED)" if ev.simulated else ""))
    table.add_row("code measurement", ev.report.measurement)
    if ev.simulated:
        table.add_row("simulation signer (pinned)", ev.report.signer)
    table.add_row("TLS key (SPKI sha256)", ev.tls_spki_sha256)
    table.add_row("models commitment (fresh, hides the model set)", ev.models_root)
    table.add_row("runtime", ", ".join(f"{k} {v}" for k, v in sorted(ev.claims["runtime"].items())))
    console.print(table)


def main() -> None:  # used by ``python -m veil.attested``
    try:
        app()
    except VeilError as e:
        err.print(f"error: {type(e).__name__}: {e}")
        sys.exit(2)
