"""Where the real attestation test data lives: the copy shipped in tests/data/attestation (preferred),
else $VEIL_ATTESTATION_DATA, else ../shared/data/attestation relative to the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "tests" / "data" / "attestation"


def attestation_dir() -> Path:
    candidates = [SHIPPED]
    if os.environ.get("VEIL_ATTESTATION_DATA"):
        candidates.insert(0, Path(os.environ["VEIL_ATTESTATION_DATA"]))
    candidates.append(REPO.parent / "shared" / "data" / "attestation")
    for c in candidates:
        if (c / "sev-snp" / "report.bin").is_file() and (c / "tdx" / "tdx_prod_quote_SPR_E4.dat").is_file():
            return c
    pytest.skip("real attestation test data (tests/data/attestation or ../shared/data/attestation) is absent")
