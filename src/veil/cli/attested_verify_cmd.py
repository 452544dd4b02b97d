"""``veil attested verify FILE``: verify real SEV-SNP or TDX evidence offline and print its claims.

Exit status 0 with the verified claims on stdout (``key: value`` lines, or ``--json``); any failure
is one line ``error: <ErrorType>: <reason>`` on stderr and exit status 2.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import NoReturn

import typer

from veil.errors import VeilError

__all__ = ["verify"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(2)


def verify(
    file: Path = typer.Argument(..., help="SEV-SNP report (1184 bytes), TDX quote v4, or veil evidence JSON"),
    collateral: Path | None = typer.Option(
        None, help="directory with collateral: vcek.der (SNP); tcb_info.json, qe_identity.json, pck_crl.der, "
                   "root_crl.der (TDX); see docs/attested.md"),
    fetch: bool = typer.Option(False, "--fetch", help="fetch missing collateral from AMD KDS / Intel PCS (network)"),
    at: str | None = typer.Option(None, help="verification time, ISO 8601 (default: now), e.g. 2023-06-20"),
    measurement: str | None = typer.Option(None, help="expected SNP MEASUREMENT or TDX MRTD (96 hex)"),
    report_data: str | None = typer.Option(None, help="expected 64 bytes of report data (128 hex)"),
    allow_debug: bool = typer.Option(False, "--allow-debug", help="accept debug guests (the host can read them)"),
    min_tcb: str | None = typer.Option(None, help="SNP minimum REPORTED_TCB, e.g. bl=3,tee=0,snp=8,ucode=115"),
    max_vmpl: int = typer.Option(0, help="SNP: least privileged VMPL accepted"),
    rtmr: list[str] = typer.Option([], help="TDX expected RTMR as INDEX=HEX (repeatable)"),
    accept_tcb_status: list[str] = typer.Option(
        [], help="TDX TCB status to accept besides UpToDate (repeatable), e.g. SWHardeningNeeded"),
    partial_collateral: bool = typer.Option(
        False, "--partial-collateral", help="TDX: verify without the collateral that is absent (listed as not checked)"),
    as_json: bool = typer.Option(False, "--json", help="print the claims as JSON"),
) -> None:
    """Verify real attestation evidence (SEV-SNP report or TDX quote) and print what it proves."""
    from veil.attested.hardware import CollateralSource, SnpPolicy, TcbVersion, TdxPolicy, verify_blob

    try:
        blob = file.read_bytes()
    except OSError as e:
        _fail(f"cannot read {file}: {e.strerror}")
    try:
        when = None
        if at is not None:
            try:
                when = dt.datetime.fromisoformat(at)
            except ValueError:
                _fail(f"--at {at!r} is not an ISO 8601 time (e.g. 2023-06-20 or 2023-06-20T12:00:00Z)")
        rd = None
        if report_data is not None:
            try:
                rd = bytes.fromhex(report_data)
            except ValueError:
                _fail("--report-data must be hex")
        rtmrs: list[str | None] = [None] * 4
        for item in rtmr:
            index, _, value = item.partition("=")
            if index not in ("0", "1", "2", "3") or not value:
                _fail(f"--rtmr {item!r} is not INDEX=HEX with INDEX 0..3")
            rtmrs[int(index)] = value
        snp_policy = SnpPolicy(measurement=measurement, report_data=rd, allow_debug=allow_debug, max_vmpl=max_vmpl,
                               min_tcb=TcbVersion.parse(min_tcb) if min_tcb else None)
        tdx_policy = TdxPolicy(mrtd=measurement, report_data=rd, allow_debug=allow_debug,
                               rtmrs=rtmrs if any(rtmrs) else None,
                               accepted_tcb_status=frozenset({"UpToDate", *accept_tcb_status}),
                               require_collateral=not partial_collateral)
        source = CollateralSource(collateral, fetch=fetch) if (collateral is not None or fetch) else None
        kind, claims = verify_blob(blob, collateral=source, at=when, snp_policy=snp_policy, tdx_policy=tdx_policy)
    except VeilError as e:
        _fail(f"{type(e).__name__}: {e}")
    if as_json:
        typer.echo(json.dumps({"verified": kind, **claims}, indent=2))
        return
    typer.echo(f"verified: {kind}")
    for key, value in claims.items():
        typer.echo(f"{key}: {value}")
