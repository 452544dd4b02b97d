"""``veil attested verify FILE``: real evidence verifies (exit 0, claims printed); any failure is one line, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from attestation_data import attestation_dir
from veil.cli.main import app

MRTD = "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
SNP_MEASUREMENT = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
                   "6bdf8a9ece31a5a608eb0cf2e4872b01")


def run(*args: str):
    return CliRunner().invoke(app, ["attested", "verify", *args])


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_snp_report_verifies():
    d = attestation_dir() / "sev-snp"
    r = run(str(d / "report.bin"), "--collateral", str(d), "--allow-debug", "--at", "2024-01-01",
            "--measurement", SNP_MEASUREMENT, "--report-data", "0102030405" + "00" * 59, "--min-tcb", "snp=5")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == "verified: sev-snp"
    assert f"measurement: {SNP_MEASUREMENT}" in r.stdout
    assert "chain: VCEK -> SEV-Milan -> ARK-Milan" in r.stdout


def test_snp_failures_are_one_line_exit_2(tmp_path):
    d = attestation_dir() / "sev-snp"
    r = run(str(d / "report.bin"), "--collateral", str(d), "--at", "2024-01-01")
    assert r.exit_code == 2 and "HardwarePolicyError" in _error_line(r) and "debug" in r.stderr
    r = run(str(d / "report.bin"), "--collateral", str(d), "--allow-debug", "--at", "2031-01-01")
    assert r.exit_code == 2 and "CertificateChainError" in _error_line(r)
    r = run(str(d / "report.bin"), "--collateral", str(d), "--allow-debug", "--measurement", "00" * 48)
    assert r.exit_code == 2 and "MeasurementMismatchError" in _error_line(r)
    r = run(str(d / "report.bin"), "--allow-debug")  # no VCEK anywhere
    assert r.exit_code == 2 and "CollateralError" in _error_line(r)
    bad = tmp_path / "report.bin"
    data = bytearray((d / "report.bin").read_bytes())
    data[0x90] ^= 1
    bad.write_bytes(bytes(data))
    r = run(str(bad), "--collateral", str(d), "--allow-debug", "--at", "2024-01-01")
    assert r.exit_code == 2 and "BadSignatureError" in _error_line(r)
    r = run(str(tmp_path / "absent.bin"))
    assert r.exit_code == 2 and "cannot read" in _error_line(r)
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    r = run(str(tmp_path / "junk"))
    assert r.exit_code == 2 and "EvidenceFormatError" in _error_line(r)


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    """Intel's collateral without the TCB info (which does not cover the sample quote's TCB)."""
    d = attestation_dir() / "tdx"
    out = tmp_path_factory.mktemp("coll")
    for name in ("sample_qeIdentity_response", "pckcrl", "rootcrl.der"):
        shutil.copy(d / name, out / name)
    return out


def test_tdx_quote_verifies(coll):
    d = attestation_dir() / "tdx"
    r = run(str(d / "tdx_prod_quote_SPR_E4.dat"), "--collateral", str(coll), "--at", "2023-06-20T00:00:00Z",
            "--measurement", MRTD, "--rtmr", "3=" + "00" * 48, "--partial-collateral", "--json")
    assert r.exit_code == 0, r.stderr
    claims = json.loads(r.stdout)
    assert claims["verified"] == "tdx" and claims["mrtd"] == MRTD and claims["qe_status"] == "UpToDate"
    assert claims["not_checked"] == "TCB info not checked (absent)"


@pytest.mark.parametrize("full, extra, error", [
    (True, [], "TcbError"),  # Intel's sample TCB info does not cover this machine's TCB
    (False, [], "CollateralError"),  # TCB info missing and --partial-collateral not given
    (False, ["--at", "2023-09-01", "--partial-collateral"], "CollateralError"),  # collateral out of date
    (False, ["--partial-collateral", "--rtmr", "0=" + "00" * 48], "HardwarePolicyError"),
    (False, ["--partial-collateral", "--measurement", "11" * 48], "MeasurementMismatchError"),
    (False, ["--partial-collateral", "--at", "yesterday"], "ISO 8601"),
])
def test_tdx_failures(coll, full, extra, error):
    d = attestation_dir() / "tdx"
    args = [str(d / "tdx_prod_quote_SPR_E4.dat"), "--collateral", str(d if full else coll), "--at", "2023-06-20",
            *extra]
    r = run(*args)
    assert r.exit_code == 2 and error in _error_line(r)
