"""Verification of real AMD SEV-SNP and Intel TDX evidence, and the server's configfs-tsm platform.

Importing this package registers :class:`SevSnpVerifier` (``sev-snp``) and :class:`TdxVerifier`
(``tdx``) with :func:`veil.attested.platform.register_verifier`. Their collateral directory is
``$VEIL_ATTESTATION_COLLATERAL`` when set (nothing is fetched unless a verifier is registered with
``CollateralSource(fetch=True)``). See docs/attested.md, "Real hardware".
"""

from __future__ import annotations

import os

from veil.attested.hardware.collateral import CollateralSource
from veil.attested.hardware.configfs_tsm import (
    ConfigfsTsm,
    ConfigfsTsmPlatform,
    TsmUnavailableError,
    detect_platform,
)
from veil.attested.hardware.errors import (
    CertificateChainError,
    CollateralError,
    HardwarePolicyError,
    ReportDataMismatchError,
    RevokedError,
    SealingUnavailableError,
    TcbError,
)
from veil.attested.hardware.inspect import detect_kind, verify_blob
from veil.attested.hardware.sevsnp import (
    SnpPolicy,
    SnpReport,
    TcbVersion,
    parse_snp_report,
    verify_snp_report,
)
from veil.attested.hardware.tdx import TdxCollateral, TdxPolicy, TdxQuote, parse_tdx_quote, verify_tdx_quote
from veil.attested.hardware.verifiers import SevSnpVerifier, TdxVerifier
from veil.attested.platform import register_verifier

__all__ = [
    "SevSnpVerifier",
    "TdxVerifier",
    "SnpPolicy",
    "SnpReport",
    "TcbVersion",
    "TdxPolicy",
    "TdxQuote",
    "TdxCollateral",
    "CollateralSource",
    "ConfigfsTsm",
    "ConfigfsTsmPlatform",
    "TsmUnavailableError",
    "detect_platform",
    "detect_kind",
    "verify_blob",
    "parse_snp_report",
    "verify_snp_report",
    "parse_tdx_quote",
    "verify_tdx_quote",
    "CertificateChainError",
    "RevokedError",
    "CollateralError",
    "TcbError",
    "HardwarePolicyError",
    "ReportDataMismatchError",
    "SealingUnavailableError",
    "COLLATERAL_ENV",
]

COLLATERAL_ENV = "VEIL_ATTESTATION_COLLATERAL"


def _default_collateral() -> CollateralSource | None:
    directory = os.environ.get(COLLATERAL_ENV)
    return CollateralSource(directory) if directory else None


register_verifier(SevSnpVerifier(collateral=_default_collateral()))
register_verifier(TdxVerifier(collateral=_default_collateral()))
