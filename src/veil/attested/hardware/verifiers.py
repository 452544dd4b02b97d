"""Client-side verifiers of real evidence, plugged into :mod:`veil.attested.platform`.

:class:`SevSnpVerifier` (``sev-snp``) and :class:`TdxVerifier` (``tdx``) turn a server's report and
endorsements into a :class:`~veil.attested.platform.PlatformReport`, so that
:func:`veil.attested.policy.verify_evidence` applies the same :class:`~veil.attested.Policy` as for
any platform: the report data must equal ``SHA-512(claims)`` (binding the TLS key and the nonce),
the measurement (SNP ``MEASUREMENT``, TDX ``MRTD``, 96 hex) the policy's ``code_measurement``, and
debug mode is refused unless ``Policy.allow_debug``. Platform-specific requirements (minimum TCB,
VMPL, RTMRs, accepted TCB statuses, collateral) are the verifier's own policy: register a configured
verifier to change them::

    from veil.attested.hardware import SevSnpVerifier, SnpPolicy, TcbVersion, CollateralSource
    from veil.attested.platform import register_verifier
    register_verifier(SevSnpVerifier(SnpPolicy(min_tcb=TcbVersion.parse("bl=3,tee=0,snp=8,ucode=115")),
                                     collateral=CollateralSource(fetch=True)))
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

from cryptography import x509

from veil.attested.hardware.anchors import AMD_PRODUCTS
from veil.attested.hardware.certs import load_pem_chain
from veil.attested.hardware.collateral import CollateralSource
from veil.attested.hardware.errors import CollateralError
from veil.attested.hardware.sevsnp import (
    SnpPolicy,
    VerifiedSnpReport,
    parse_snp_report,
    signing_cert_product,
    split_endorsements,
    verify_snp_report,
)
from veil.attested.hardware.tdx import (
    TdxCollateral,
    TdxPolicy,
    VerifiedTdxQuote,
    parse_tdx_quote,
    pck_info,
    verify_tdx_quote,
)
from veil.attested.platform import PlatformReport, PlatformVerifier

__all__ = ["SevSnpVerifier", "TdxVerifier"]


class SevSnpVerifier(PlatformVerifier):
    """Verifies SEV-SNP reports; the VCEK comes from the endorsements, else from ``collateral``."""

    platform = "sev-snp"
    simulated = False

    def __init__(self, policy: SnpPolicy | None = None, *, collateral: CollateralSource | None = None,
                 at: dt.datetime | None = None,
                 roots: Mapping[str, tuple[x509.Certificate, x509.Certificate]] | None = None):
        self.policy = policy or SnpPolicy()
        self.collateral = collateral
        self.at = at
        self.roots = roots

    def check(self, report: bytes, endorsements: tuple[bytes, ...] = (), *,
              policy: SnpPolicy | None = None) -> VerifiedSnpReport:
        rep = parse_snp_report(report)
        leaf, others = split_endorsements(endorsements)
        signing: bytes | x509.Certificate | None = leaf
        intermediates: list[bytes | x509.Certificate] = list(others)
        crl = None
        if self.collateral is not None:
            hint = signing_cert_product(leaf) if leaf is not None else rep.cpuid_product()
            col = self.collateral.snp(rep, (hint,) if hint else AMD_PRODUCTS, need_signing_cert=leaf is None)
            intermediates.extend(col.intermediates)
            crl = col.ark_crl
            signing = signing if signing is not None else col.signing_cert
        if signing is None:
            raise CollateralError("no VCEK/VLEK: the evidence carries none and no collateral source gave one "
                                  "(a collateral directory with vcek.der, or fetching from AMD's KDS)")
        return verify_snp_report(rep, signing_cert=signing, policy=policy or self.policy, at=self.at, roots=self.roots,
                                 intermediates=intermediates, ark_crl=crl)

    def verify(self, report: bytes, endorsements: tuple[bytes, ...],
               trusted_signers: frozenset[str] | None) -> PlatformReport:
        # debug and the measurement are decided by the caller's Policy (verify_evidence), from the report
        v = self.check(report, endorsements, policy=dataclasses.replace(self.policy, allow_debug=True))
        r = v.report
        return PlatformReport(platform=self.platform, measurement=r.measurement.hex(), report_data=r.report_data,
                              debug=r.debug, signer=f"AMD {v.product} {v.signing_key} (chip {r.chip_id[:8].hex()}..., "
                              f"TCB {v.reported_tcb})", simulated=False)


class TdxVerifier(PlatformVerifier):
    """Verifies TDX quotes; Intel's collateral comes from ``collateral`` (files, or PCS when allowed)."""

    platform = "tdx"
    simulated = False

    def __init__(self, policy: TdxPolicy | None = None, *, collateral: CollateralSource | None = None,
                 at: dt.datetime | None = None, root: x509.Certificate | None = None):
        self.policy = policy or TdxPolicy()
        self.collateral = collateral
        self.at = at
        self.root = root

    def check(self, quote: bytes, *, policy: TdxPolicy | None = None) -> VerifiedTdxQuote:
        q = parse_tdx_quote(quote)
        col = TdxCollateral()
        if self.collateral is not None:
            pck_cert = load_pem_chain(q.pck_chain_pem, "PCK certificate chain in the quote")[0]
            col = self.collateral.tdx(pck_info(pck_cert))
        return verify_tdx_quote(q, collateral=col, policy=policy or self.policy, at=self.at, root=self.root)

    def verify(self, report: bytes, endorsements: tuple[bytes, ...],
               trusted_signers: frozenset[str] | None) -> PlatformReport:
        v = self.check(report, policy=dataclasses.replace(self.policy, allow_debug=True))
        b = v.quote.body
        return PlatformReport(platform=self.platform, measurement=b.mrtd.hex(), report_data=b.report_data,
                              debug=b.debug, signer=f"Intel TDX (FMSPC {v.pck.fmspc.hex()}, TCB {v.tcb_status})",
                              simulated=False)
