"""Recognise a piece of evidence (SEV-SNP report, TDX quote, or veil evidence JSON) and verify it.

Used by ``veil attested verify FILE``. A veil evidence JSON (what ``GET /attestation`` answers)
is verified as its platform report plus the binding: the report data must equal
``SHA-512(claims)``; its claims are then printed too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import struct
from typing import Any

from veil.attested.evidence import EVIDENCE_FORMAT, Evidence, report_data_for
from veil.attested.hardware.collateral import CollateralSource
from veil.attested.hardware.errors import BadSignatureError, EvidenceFormatError
from veil.attested.hardware.sevsnp import SNP_REPORT_SIZE, SnpPolicy
from veil.attested.hardware.tdx import TdxPolicy
from veil.attested.hardware.verifiers import SevSnpVerifier, TdxVerifier

__all__ = ["detect_kind", "verify_blob"]


def detect_kind(blob: bytes) -> str:
    """``"sev-snp"``, ``"tdx"`` or ``"veil-evidence"``; :class:`EvidenceFormatError` for anything else."""
    if blob[:1] == b"{":
        try:
            obj = json.loads(blob)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise EvidenceFormatError("the file starts like JSON but is not JSON") from None
        if isinstance(obj, dict) and obj.get("format") == EVIDENCE_FORMAT:
            return "veil-evidence"
        raise EvidenceFormatError(f"the JSON file is not veil evidence ({EVIDENCE_FORMAT})")
    if len(blob) == SNP_REPORT_SIZE and struct.unpack_from("<I", blob, 0)[0] in (2, 3, 4, 5):
        return "sev-snp"
    if len(blob) >= 48 and struct.unpack_from("<HHI", blob, 0)[::2] == (4, 0x81):
        return "tdx"
    raise EvidenceFormatError(f"the file ({len(blob)} bytes) is neither a {SNP_REPORT_SIZE}-byte SEV-SNP report, "
                              "a TDX quote v4, nor veil evidence JSON")


def verify_blob(blob: bytes, *, collateral: CollateralSource | None = None, at: dt.datetime | None = None,
                snp_policy: SnpPolicy | None = None, tdx_policy: TdxPolicy | None = None,
                endorsements: tuple[bytes, ...] = ()) -> tuple[str, dict[str, Any]]:
    """(kind, verified claims) of ``blob``; raises a typed attestation error on any failure."""
    kind = detect_kind(blob)
    if kind == "sev-snp":
        snp = SevSnpVerifier(snp_policy, collateral=collateral, at=at).check(blob, endorsements)
        return kind, snp.claims()
    if kind == "tdx":
        tdx = TdxVerifier(tdx_policy, collateral=collateral, at=at).check(blob)
        claims = tdx.claims()
        if tdx.notes:
            claims["not_checked"] = "; ".join(tdx.notes)
        return kind, claims
    ev = Evidence.from_json(json.loads(blob))
    if ev.platform not in ("sev-snp", "tdx"):
        raise EvidenceFormatError(f"veil evidence from platform {ev.platform!r}: only sev-snp and tdx evidence is "
                                  "verified here (simulated evidence: `veil attested attest`)")
    expected = report_data_for(ev.claims)
    if ev.platform == "sev-snp":
        pol = snp_policy or SnpPolicy()
        if pol.report_data is not None and pol.report_data != expected:
            raise BadSignatureError("the given --report-data differs from SHA-512 of the evidence claims")
        inner = SevSnpVerifier(dataclasses.replace(pol, report_data=expected), collateral=collateral, at=at)
        claims = inner.check(ev.report, ev.endorsements).claims()
    else:
        tpol = tdx_policy or TdxPolicy()
        if tpol.report_data is not None and tpol.report_data != expected:
            raise BadSignatureError("the given --report-data differs from SHA-512 of the evidence claims")
        claims = TdxVerifier(dataclasses.replace(tpol, report_data=expected), collateral=collateral,
                             at=at).check(ev.report).claims()
    claims["veil_claims"] = ev.claims.decode("utf-8", errors="replace")
    return "veil-evidence/" + ev.platform, claims
