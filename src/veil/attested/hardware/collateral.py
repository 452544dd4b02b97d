"""Where the verifiers get collateral: the operator's files, or the vendors' services on request.

A collateral directory may hold (each optional; the first name found is used, also looked up in
its ``sev-snp/`` and ``tdx/`` subdirectories):

========================  ====================================================================
SEV-SNP                   ``vcek.der`` / ``vcek.pem`` / ``vlek.der`` / ``vlek.pem`` (the signing
                          certificate), ``cert_chain.pem`` / ``ask.pem`` / ``asvk.pem`` (extra
                          intermediates, used only if the trusted ARK signed them),
                          ``ark_crl.der`` / ``crl.der`` (the ARK's revocation list)
TDX                       ``tcb_info.json`` (or ``sample_tcbInfo_response``), ``tcb_info_issuer_chain.pem``,
                          ``qe_identity.json`` (or ``sample_qeIdentity_response``),
                          ``qe_identity_issuer_chain.pem``, ``pck_crl.der`` (or ``pckcrl``),
                          ``root_crl.der`` (or ``rootcrl.der``)
========================  ====================================================================

With ``fetch=True`` what is missing is asked from AMD's key distribution service (KDS) or Intel's
provisioning certification service (PCS) over HTTPS (``httpx``). Collateral fetched this way must
carry Intel's signing chain (sent in response headers) and is verified with it; files are the
operator's configuration and are taken as given when they come without a chain.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from veil.attested.hardware.anchors import AMD_PRODUCTS
from veil.attested.hardware.certs import load_certificate
from veil.attested.hardware.errors import CollateralError
from veil.attested.hardware.sevsnp import SnpReport, TcbVersion
from veil.attested.hardware.tdx import PckInfo, TdxCollateral

__all__ = [
    "KDS_BASE",
    "PCS_BASE",
    "INTEL_ROOT_CRL_URL",
    "SnpCollateral",
    "CollateralSource",
    "kds_vcek_url",
    "kds_cert_chain_url",
    "kds_crl_url",
    "pcs_tcb_info_url",
    "pcs_qe_identity_url",
    "pcs_pck_crl_url",
]

KDS_BASE = "https://kdsintf.amd.com"
PCS_BASE = "https://api.trustedservices.intel.com"
INTEL_ROOT_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"


def kds_vcek_url(product: str, chip_id: bytes, tcb: TcbVersion) -> str:
    """AMD KDS URL of the VCEK of ``chip_id`` at ``tcb`` (Turin and later: 8-byte hwid and an FMC SPL)."""
    if product == "Turin":
        hwid = chip_id[:8].hex()
        query = {"fmcSPL": tcb.fmc or 0, "blSPL": tcb.bootloader, "teeSPL": tcb.tee, "snpSPL": tcb.snp,
                 "ucodeSPL": tcb.microcode}
    else:
        hwid = chip_id.hex()
        query = {"blSPL": tcb.bootloader, "teeSPL": tcb.tee, "snpSPL": tcb.snp, "ucodeSPL": tcb.microcode}
    return f"{KDS_BASE}/vcek/v1/{product}/{hwid}?" + "&".join(f"{k}={v:02d}" for k, v in query.items())


def kds_cert_chain_url(product: str, kind: str = "VCEK") -> str:
    """ASK+ARK (for VCEKs) or ASVK+ARK (for VLEKs) of ``product``."""
    return f"{KDS_BASE}/{kind.lower()}/v1/{product}/cert_chain"


def kds_crl_url(product: str, kind: str = "VCEK") -> str:
    return f"{KDS_BASE}/{kind.lower()}/v1/{product}/crl"


def pcs_tcb_info_url(fmspc: bytes) -> str:
    return f"{PCS_BASE}/tdx/certification/v4/tcb?fmspc={fmspc.hex()}"


def pcs_qe_identity_url() -> str:
    return f"{PCS_BASE}/tdx/certification/v4/qe/identity"


def pcs_pck_crl_url(ca: str) -> str:
    return f"{PCS_BASE}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"


@dataclass(frozen=True)
class SnpCollateral:
    signing_cert: bytes | None = None
    intermediates: tuple[bytes, ...] = field(default=())
    ark_crl: bytes | None = None


def _first(directory: Path | None, names: tuple[str, ...], subdir: str) -> bytes | None:
    if directory is None:
        return None
    if not directory.is_dir():
        raise CollateralError(f"collateral directory {directory} does not exist")
    for base in (directory, directory / subdir):
        for name in names:
            path = base / name
            if path.is_file():
                try:
                    return path.read_bytes()
                except OSError as e:
                    raise CollateralError(f"cannot read collateral file {path}: {e.strerror}") from None
    return None


class CollateralSource:
    """Collateral from ``directory`` (optional) and, if ``fetch``, from the vendors' services."""

    def __init__(self, directory: str | Path | None = None, *, fetch: bool = False, timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.fetch = fetch
        self.timeout = timeout
        self._transport = transport

    def _get(self, url: str, what: str) -> httpx.Response:
        try:
            with httpx.Client(timeout=self.timeout, transport=self._transport, follow_redirects=False) as c:
                r = c.get(url)
        except httpx.HTTPError as e:
            raise CollateralError(f"cannot fetch {what} from {url}: {type(e).__name__}") from None
        if r.status_code != 200:
            raise CollateralError(f"fetching {what} from {url} answered HTTP {r.status_code}")
        return r

    # --- SEV-SNP ---------------------------------------------------------------------------------
    def snp(self, report: SnpReport, products: tuple[str, ...], *, need_signing_cert: bool = True) -> SnpCollateral:
        """The signing certificate, extra intermediates and ARK CRL for ``report`` (products: candidates).
        With ``need_signing_cert=False`` (the evidence carries it) nothing is fetched for it."""
        d = self.directory
        cert = _first(d, ("vcek.der", "vcek.pem", "vlek.der", "vlek.pem"), "sev-snp")
        inter = _first(d, ("cert_chain.pem", "ask.pem", "asvk.pem"), "sev-snp")
        crl = _first(d, ("ark_crl.der", "crl.der"), "sev-snp")
        if cert is None and self.fetch and need_signing_cert:
            if report.signing_key != 0:
                raise CollateralError("a VLEK cannot be fetched from AMD's KDS by the verifier; the cloud "
                                      "provider supplies it (put it in the collateral directory as vlek.der)")
            errors = []
            for product in products:
                tcb = TcbVersion.from_raw(report.reported_tcb_raw, product)
                try:
                    cert = self._get(kds_vcek_url(product, report.chip_id, tcb), "the VCEK").content
                    break
                except CollateralError as e:
                    errors.append(str(e))
            if cert is None:
                raise CollateralError("; ".join(errors))
        if crl is None and self.fetch:
            crl_product = products[0] if len(products) == 1 else _product_from_cert(cert)
            if crl_product is not None:
                kind = "VLEK" if report.signing_key == 1 else "VCEK"
                crl = self._get(kds_crl_url(crl_product, kind), f"the {crl_product} ARK CRL").content
        chain = tuple(x for x in (inter,) if x is not None)
        return SnpCollateral(cert, _split_pem(chain), crl)

    # --- TDX ---------------------------------------------------------------------------------------
    def tdx(self, pck: PckInfo) -> TdxCollateral:
        d = self.directory
        tcb = _first(d, ("tcb_info.json", "sample_tcbInfo_response"), "tdx")
        tcb_chain = _first(d, ("tcb_info_issuer_chain.pem",), "tdx")
        qe = _first(d, ("qe_identity.json", "sample_qeIdentity_response"), "tdx")
        qe_chain = _first(d, ("qe_identity_issuer_chain.pem",), "tdx")
        pck_crl = _first(d, ("pck_crl.der", "pckcrl"), "tdx")
        root_crl = _first(d, ("root_crl.der", "rootcrl.der"), "tdx")
        local = True
        if self.fetch and None in (tcb, qe, pck_crl, root_crl):
            local = False  # whatever JSON is used now must come with Intel's chain
            if tcb is None or tcb_chain is None:
                r = self._get(pcs_tcb_info_url(pck.fmspc), "TDX TCB info")
                tcb, tcb_chain = r.content, _header_chain(r, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"))
            if qe is None or qe_chain is None:
                r = self._get(pcs_qe_identity_url(), "TD QE identity")
                qe, qe_chain = r.content, _header_chain(r, ("SGX-Enclave-Identity-Issuer-Chain",))
            if pck_crl is None:
                pck_crl = self._get(pcs_pck_crl_url(pck.ca), "PCK CRL").content
            if root_crl is None:
                root_crl = self._get(INTEL_ROOT_CRL_URL, "Intel root CA CRL").content
        return TdxCollateral(tcb_info=tcb, tcb_info_chain=tcb_chain, qe_identity=qe, qe_identity_chain=qe_chain,
                             pck_crl=pck_crl, root_crl=root_crl, local=local)


def _product_from_cert(cert: bytes | None) -> str | None:
    if cert is None:
        return None
    issuer = load_certificate(cert, "VCEK/VLEK").issuer.rfc4514_string()
    return next((p for p in AMD_PRODUCTS if f"CN=SEV-{p}" in issuer or f"CN=SEV-VLEK-{p}" in issuer), None)


def _header_chain(response: httpx.Response, names: tuple[str, ...]) -> bytes:
    for name in names:
        value = response.headers.get(name)
        if value:
            return urllib.parse.unquote(value).encode()
    raise CollateralError(f"Intel's answer lacks the issuer chain header ({' or '.join(names)})")


def _split_pem(blobs: tuple[bytes, ...]) -> tuple[bytes, ...]:
    marker = b"-----BEGIN CERTIFICATE-----"
    out: list[bytes] = []
    for blob in blobs:
        if marker in blob:
            out.extend(marker + part for part in blob.split(marker)[1:])
        else:
            out.append(blob)
    return tuple(out)
