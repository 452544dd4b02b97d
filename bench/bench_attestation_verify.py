"""Real-evidence verification: time per verification, and an exhaustive byte-flip sweep.

    python bench/bench_attestation_verify.py [--data DIR] [--repeat N]

Prints (1) the median time to verify the real SEV-SNP report and the real TDX quote, and (2) for
every byte of the SNP report, the VCEK, the ASK, the ARK, the TDX quote up to the end of its PCK
chain and both Intel CRLs, whether flipping its lowest bit is refused (the tests sample some of
these; this sweeps all). Data: tests/data/attestation (default) or --data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from veil.attested.errors import AttestationError
from veil.attested.hardware import (
    SnpPolicy,
    TdxCollateral,
    TdxPolicy,
    parse_tdx_quote,
    verify_snp_report,
    verify_tdx_quote,
)
from veil.attested.hardware.anchors import amd_ask_ark
from veil.attested.hardware.certs import load_certificate

SNP_AT, TDX_AT = dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.datetime(2023, 6, 20, tzinfo=dt.UTC)


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


def sweep(name: str, data: bytes, check, positions=None) -> tuple[str, int, int, str]:
    kinds: Counter[str] = Counter()
    accepted = []
    for i in positions if positions is not None else range(len(data)):
        try:
            check(flip(data, i))
            accepted.append(i)
        except AttestationError as e:
            kinds[type(e).__name__] += 1
    top = ", ".join(f"{k} {v}" for k, v in kinds.most_common(3))
    return name, sum(kinds.values()) + len(accepted), len(accepted), top


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tests/data/attestation")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    report = (args.data / "sev-snp/report.bin").read_bytes()
    vcek = (args.data / "sev-snp/vcek.der").read_bytes()
    tdx = args.data / "tdx"
    quote = (tdx / "tdx_prod_quote_SPR_E4.dat").read_bytes()
    pck_crl, root_crl = (tdx / "pckcrl").read_bytes(), (tdx / "rootcrl.der").read_bytes()
    qe = (tdx / "sample_qeIdentity_response").read_bytes()
    snp_pol, tdx_pol = SnpPolicy(allow_debug=True), TdxPolicy(require_collateral=False)
    col = TdxCollateral(qe_identity=qe, pck_crl=pck_crl, root_crl=root_crl)

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    print("| evidence | median verify ms |\n|---|---|")
    print(f"| SEV-SNP report (chain + VCEK checks + signature) | "
          f"{timed(lambda: verify_snp_report(report, signing_cert=vcek, policy=snp_pol, at=SNP_AT)):.2f} |")
    print(f"| TDX quote (PCK chain, 2 CRLs, QE identity, 2 signatures) | "
          f"{timed(lambda: verify_tdx_quote(quote, collateral=col, policy=tdx_pol, at=TDX_AT)):.2f} |")

    ask, ark = amd_ask_ark("Milan")

    def with_roots(which: str):
        def check(der: bytes) -> None:
            cert = load_certificate(der, which)
            roots = {"Milan": (cert, ark) if which == "ASK" else (ask, cert)}
            verify_snp_report(report, signing_cert=vcek, policy=snp_pol, at=SNP_AT, roots=roots)
        return check

    pem_end = len(quote) - parse_tdx_quote(quote).trailing_bytes
    rows = [
        sweep("SNP report (1184 B)", report,
              lambda b: verify_snp_report(b, signing_cert=vcek, policy=snp_pol, at=SNP_AT)),
        sweep("VCEK (DER)", vcek, lambda b: verify_snp_report(report, signing_cert=b, policy=snp_pol, at=SNP_AT)),
        sweep("ASK Milan (DER)", ask.public_bytes(Encoding.DER), with_roots("ASK")),
        sweep("ARK Milan (DER)", ark.public_bytes(Encoding.DER), with_roots("ARK")),
        sweep("TDX quote up to the end of the PCK chain", quote,
              lambda b: verify_tdx_quote(b, policy=tdx_pol, at=TDX_AT), range(pem_end)),
        sweep("PCK CRL", pck_crl,
              lambda b: verify_tdx_quote(quote, collateral=TdxCollateral(pck_crl=b), policy=tdx_pol, at=TDX_AT)),
        sweep("root CA CRL", root_crl,
              lambda b: verify_tdx_quote(quote, collateral=TdxCollateral(root_crl=b), policy=tdx_pol, at=TDX_AT)),
    ]
    print("\n| flipped bytes of | flips | accepted | most frequent refusals |\n|---|---|---|---|")
    for name, n, accepted, top in rows:
        print(f"| {name} | {n} | {accepted} | {top} |")


if __name__ == "__main__":
    main()
