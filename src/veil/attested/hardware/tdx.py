"""Intel TDX DCAP quotes (version 4): parsing and verification.

Layout: a 48-byte header, the 584-byte TD report body, a 4-byte length, then the signature data:
the quote signature (ECDSA P-256 ``r||s``, big-endian) over header + body, the 64-byte attestation
public key (``x||y``), and certification data of type 6: the quoting enclave's (QE) 384-byte
report, the PCK's signature over it, the QE authentication data, and certification data of type 5,
the PCK certificate chain (PEM). Bytes after the signature data are not signed; they are ignored
and counted in the claims (``trailing_bytes``).

:func:`verify_tdx_quote` checks, in this order, and raises the first failure:

1. structure (version 4, ECDSA P-256 attestation key, TEE type TDX, Intel's QE vendor id, sizes);
2. the PCK chain PCK -> PCK Platform/Processor CA -> Intel SGX Root CA, the root being the one veil
   ships (or the caller gives), every certificate valid at the verification time;
3. the revocation lists: the root CA's CRL for the intermediate, the intermediate's CRL for the PCK;
4. the QE report's signature by the PCK key, and its report data equal to
   ``SHA-256(attestation key || QE authentication data)`` followed by 32 zero bytes;
5. the quote's signature by the attestation key;
6. QE identity (Intel's JSON): signer, product id, MISCSELECT and ATTRIBUTES under their masks,
   the QE's TCB level (ISVSVN) and its status;
7. TCB info (Intel's JSON): FMSPC and PCE id equal to the PCK certificate's, the TDX module's
   signer and attributes, and the platform's TCB level: the first level whose SGX components and
   PCE SVN (from the PCK certificate) and TDX components (``TEE_TCB_SVN``) are all reached; its
   status must be one the policy accepts;
8. the policy: debug TDs refused, MRTD, RTMR0-3, MRCONFIGID/MROWNER/MROWNERCONFIG, REPORTDATA.

The JSON collateral is signed by Intel's TCB signing key, whose chain Intel's service sends in an
HTTP header (``TCB-Info-Issuer-Chain``, ``SGX-Enclave-Identity-Issuer-Chain``). When that chain is
given, the signature is verified (and required for collateral that did not come from the
operator's own files); collateral read from local files without its chain is taken as given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from veil.attested.errors import MeasurementMismatchError
from veil.attested.hardware.anchors import intel_sgx_root
from veil.attested.hardware.certs import (
    ECDSA_SHA256,
    check_crl,
    load_crl,
    load_pem_chain,
    utc,
    verify_chain,
)
from veil.attested.hardware.der import OCTET_STRING, SEQUENCE, der_int, der_oid, read_one
from veil.attested.hardware.errors import (
    BadSignatureError,
    CertificateChainError,
    CollateralError,
    EvidenceFormatError,
    HardwarePolicyError,
    PolicyError,
    ReportDataMismatchError,
    TcbError,
)

__all__ = [
    "TDX_HEADER_SIZE",
    "TDX_BODY_SIZE",
    "INTEL_QE_VENDOR_ID",
    "TdReportBody",
    "EnclaveReport",
    "TdxQuote",
    "PckInfo",
    "TdxCollateral",
    "TdxPolicy",
    "VerifiedTdxQuote",
    "parse_tdx_quote",
    "pck_info",
    "verify_signed_collateral",
    "verify_tdx_quote",
]

TDX_HEADER_SIZE, TDX_BODY_SIZE, ENCLAVE_REPORT_SIZE = 48, 584, 384
SIGNED_SIZE = TDX_HEADER_SIZE + TDX_BODY_SIZE
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TEE_TYPE_TDX, ATT_KEY_ECDSA_P256 = 0x81, 2
CERT_DATA_PCK_CHAIN, CERT_DATA_QE_REPORT = 5, 6
TD_ATTRIBUTES_DEBUG_BIT = 0
SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
NOT_SUPPORTED = "NotSupported"  # below every level Intel lists
ACCEPTABLE_STATUSES = frozenset({"UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                                 "ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"})


@dataclass(frozen=True)
class TdReportBody:
    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") >> TD_ATTRIBUTES_DEBUG_BIT & 1)


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX enclave report body (here: the quoting enclave's)."""

    raw: bytes
    cpusvn: bytes
    miscselect: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isvprodid: int
    isvsvn: int
    report_data: bytes


@dataclass(frozen=True)
class TdxQuote:
    raw: bytes
    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    user_data: bytes
    body: TdReportBody
    signature: bytes
    attestation_key: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    trailing_bytes: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]


def _parse_body(b: bytes) -> TdReportBody:
    o = 0

    def take(n: int) -> bytes:
        nonlocal o
        o += n
        return b[o - n:o]

    return TdReportBody(
        tee_tcb_svn=take(16), mrseam=take(48), mrsignerseam=take(48), seam_attributes=take(8),
        td_attributes=take(8), xfam=take(8), mrtd=take(48), mrconfigid=take(48), mrowner=take(48),
        mrownerconfig=take(48), rtmrs=(take(48), take(48), take(48), take(48)), report_data=take(64))


def _parse_enclave_report(b: bytes) -> EnclaveReport:
    (misc,) = struct.unpack_from("<I", b, 16)
    prod, svn = struct.unpack_from("<HH", b, 256)
    return EnclaveReport(raw=b, cpusvn=b[0:16], miscselect=misc, attributes=b[48:64], mrenclave=b[64:96],
                         mrsigner=b[128:160], isvprodid=prod, isvsvn=svn, report_data=b[320:384])


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse a TDX DCAP quote v4 with certification data type 6; raise :class:`EvidenceFormatError`."""
    data = bytes(data)
    if len(data) < SIGNED_SIZE + 4:
        raise EvidenceFormatError(f"a TDX quote is at least {SIGNED_SIZE + 4} bytes, got {len(data)}")
    version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    if version != 4:
        raise EvidenceFormatError(f"TDX quote version {version} is not supported (4)")
    if key_type != ATT_KEY_ECDSA_P256:
        raise EvidenceFormatError(f"TDX quote attestation key type {key_type} is not 2 (ECDSA P-256)")
    if tee_type != TEE_TYPE_TDX:
        raise EvidenceFormatError(f"quote TEE type 0x{tee_type:x} is not TDX (0x81)")
    (sig_len,) = struct.unpack_from("<I", data, SIGNED_SIZE)
    start = SIGNED_SIZE + 4
    if sig_len < 128 + 6 or start + sig_len > len(data):
        raise EvidenceFormatError(f"TDX quote signature data length {sig_len} does not fit the quote")
    sig = data[start:start + sig_len]
    cert_type, cert_size = struct.unpack_from("<HI", sig, 128)
    if cert_type != CERT_DATA_QE_REPORT:
        raise EvidenceFormatError(f"TDX quote certification data type {cert_type} is not 6 (QE report)")
    cert = sig[134:]
    if cert_size != len(cert):
        raise EvidenceFormatError(f"TDX quote certification data is {len(cert)} bytes, its header says {cert_size}")
    if len(cert) < ENCLAVE_REPORT_SIZE + 64 + 2:
        raise EvidenceFormatError("TDX quote QE report certification data is truncated")
    (auth_len,) = struct.unpack_from("<H", cert, ENCLAVE_REPORT_SIZE + 64)
    o = ENCLAVE_REPORT_SIZE + 66
    if o + auth_len + 6 > len(cert):
        raise EvidenceFormatError("TDX quote QE authentication data does not fit")
    auth = cert[o:o + auth_len]
    inner_type, inner_size = struct.unpack_from("<HI", cert, o + auth_len)
    pem = cert[o + auth_len + 6:]
    if inner_type != CERT_DATA_PCK_CHAIN:
        raise EvidenceFormatError(f"TDX quote QE certification data type {inner_type} is not 5 (PCK chain)")
    if inner_size != len(pem):
        raise EvidenceFormatError(f"TDX quote PCK chain is {len(pem)} bytes, its header says {inner_size}")
    return TdxQuote(
        raw=data, version=version, att_key_type=key_type, tee_type=tee_type, qe_vendor_id=data[12:28],
        user_data=data[28:48], body=_parse_body(data[TDX_HEADER_SIZE:SIGNED_SIZE]),
        signature=sig[:64], attestation_key=sig[64:128],
        qe_report=_parse_enclave_report(cert[:ENCLAVE_REPORT_SIZE]),
        qe_report_signature=cert[ENCLAVE_REPORT_SIZE:ENCLAVE_REPORT_SIZE + 64], qe_auth_data=auth,
        pck_chain_pem=pem, trailing_bytes=len(data) - start - sig_len)


# --- the PCK certificate's SGX extension ------------------------------------------------------------
@dataclass(frozen=True)
class PckInfo:
    """What Intel's PCK certificate says about the platform (SGX extensions)."""

    fmspc: bytes
    pce_id: bytes
    pcesvn: int
    sgx_components: tuple[int, ...]
    cpusvn: bytes
    ca: str  # "platform" or "processor"


def pck_info(cert: x509.Certificate) -> PckInfo:
    raw = next((e.value.value for e in cert.extensions
                if e.oid.dotted_string == SGX_EXTENSIONS_OID and isinstance(e.value, x509.UnrecognizedExtension)), None)
    if raw is None:
        raise CertificateChainError("the PCK certificate has no SGX extensions")
    top = read_one(raw)
    if top.tag != SEQUENCE:
        raise CertificateChainError("the PCK certificate's SGX extensions are not a SEQUENCE")
    fields: dict[str, Any] = {}
    for item in top.children():
        oid_tlv, value = item.children()[:2]
        fields[der_oid(oid_tlv)[len(SGX_EXTENSIONS_OID) + 1:]] = value
    try:
        tcb = {der_oid(c.children()[0])[len(SGX_EXTENSIONS_OID) + 3:]: c.children()[1] for c in fields["2"].children()}
        comps = tuple(der_int(tcb[str(i)]) for i in range(1, 17))
        pcesvn = der_int(tcb["17"])
        cpusvn, fmspc, pce_id = tcb["18"], fields["4"], fields["3"]
    except (KeyError, IndexError):
        raise CertificateChainError("the PCK certificate's SGX extensions lack TCB, FMSPC or PCE id") from None
    if OCTET_STRING not in (cpusvn.tag, fmspc.tag, pce_id.tag) or len(fmspc.value) != 6 or len(pce_id.value) != 2:
        raise CertificateChainError("the PCK certificate's FMSPC or PCE id is malformed")
    issuer_cn = cert.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ca = "processor" if issuer_cn and "Processor" in str(issuer_cn[0].value) else "platform"
    return PckInfo(fmspc=fmspc.value, pce_id=pce_id.value, pcesvn=pcesvn, sgx_components=comps,
                   cpusvn=cpusvn.value, ca=ca)


# --- collateral -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TdxCollateral:
    """Intel's collateral for a quote: raw bodies as the service serves them, with optional issuer chains.

    ``local``: read from the operator's own files, whose unsigned JSON is then taken as given.
    """

    tcb_info: bytes | None = None
    tcb_info_chain: bytes | None = None
    qe_identity: bytes | None = None
    qe_identity_chain: bytes | None = None
    pck_crl: bytes | None = None
    root_crl: bytes | None = None
    local: bool = True


def _signed_member(body: bytes, key: str, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    """(parsed member, its exact bytes as signed, signature) of ``{"key":{...},"signature":"hex"}``."""
    try:
        text = body.decode("utf-8")
        outer = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CollateralError(f"{what} is not JSON") from None
    if not isinstance(outer, dict) or not isinstance(outer.get(key), dict) or not isinstance(outer.get("signature"), str):
        raise CollateralError(f"{what} is not an object with {key!r} and 'signature'")
    m = re.match(r'\s*\{\s*"' + key + r'"\s*:\s*', text)
    if m is None:
        raise CollateralError(f"{what}: {key!r} is not its first member, cannot locate the signed bytes")
    _, end = json.JSONDecoder().raw_decode(text, m.end())
    try:
        signature = bytes.fromhex(outer["signature"])
    except ValueError:
        raise CollateralError(f"{what}: signature is not hex") from None
    return outer[key], text[m.end():end].encode("utf-8"), signature


def verify_signed_collateral(signed: bytes, signature: bytes, chain_pem: bytes, root: x509.Certificate,
                             at: dt.datetime, what: str) -> None:
    """Intel's ECDSA P-256 signature (``r||s``) over ``signed``, by the leaf of ``chain_pem`` chained to ``root``."""
    certs = load_pem_chain(chain_pem, f"{what} issuer chain")
    if not certs:
        raise CollateralError(f"{what} issuer chain is empty")
    below_root = [(c, f"{what} signer" if i == 0 else f"{what} issuer {i}") for i, c in enumerate(certs)
                  if c != root]
    try:
        verify_chain(below_root, root, ECDSA_SHA256, at, require_ca=True)
    except CertificateChainError as e:
        raise CollateralError(str(e)) from None
    key = certs[0].public_key()
    if len(signature) != 64 or not isinstance(key, ec.EllipticCurvePublicKey):
        raise CollateralError(f"{what}: signature is not a 64-byte ECDSA P-256 signature")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CollateralError(f"{what}: Intel's signature over it is invalid") from None


def _parse_time(value: Any, what: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(dt.UTC)
    except ValueError:
        raise CollateralError(f"{what} is not an ISO time") from None


def _check_current(obj: dict[str, Any], at: dt.datetime, what: str) -> None:
    issued, nxt = _parse_time(obj.get("issueDate"), f"{what} issueDate"), _parse_time(obj.get("nextUpdate"), f"{what} nextUpdate")
    if not issued <= at <= nxt:
        raise CollateralError(f"{what} is current from {issued:%Y-%m-%d} to {nxt:%Y-%m-%d}, not at the verification "
                              f"time {at:%Y-%m-%d %H:%M}: get fresh collateral")


def _hexfield(obj: dict[str, Any], key: str, what: str) -> bytes:
    try:
        return bytes.fromhex(str(obj[key]))
    except (KeyError, ValueError):
        raise CollateralError(f"{what} field {key!r} is missing or not hex") from None


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=False))


def _load_signed(body: bytes, key: str, chain: bytes | None, local: bool, root: x509.Certificate,
                 at: dt.datetime, what: str) -> tuple[dict[str, Any], str]:
    obj, signed, signature = _signed_member(body, key, what)
    if chain is not None:
        verify_signed_collateral(signed, signature, chain, root, at, what)
        status = "verified"
    elif local:
        status = "not verified (local file, no issuer chain given)"
    else:
        raise CollateralError(f"{what} came without its issuer chain; its signature cannot be verified")
    _check_current(obj, at, what)
    return obj, status


def _qe_identity_status(identity: dict[str, Any], qe: EnclaveReport) -> str:
    what = "QE identity"
    if identity.get("id") != "TD_QE" or identity.get("version") != 2:
        raise CollateralError(f"{what} is not a TD_QE identity version 2")
    if qe.mrsigner != _hexfield(identity, "mrsigner", what):
        raise TcbError("the quoting enclave's MRSIGNER is not Intel's TD QE signer")
    if qe.isvprodid != identity.get("isvprodid"):
        raise TcbError(f"the quoting enclave's product id {qe.isvprodid} is not {identity.get('isvprodid')}")
    misc_mask = int.from_bytes(_hexfield(identity, "miscselectMask", what), "big")
    if qe.miscselect & misc_mask != int.from_bytes(_hexfield(identity, "miscselect", what), "big") & misc_mask:
        raise TcbError("the quoting enclave's MISCSELECT does not match the QE identity")
    attr_mask = _hexfield(identity, "attributesMask", what)
    if _masked(qe.attributes, attr_mask) != _masked(_hexfield(identity, "attributes", what), attr_mask):
        raise TcbError("the quoting enclave's ATTRIBUTES do not match the QE identity")
    for level in identity.get("tcbLevels", []):
        try:
            if qe.isvsvn >= int(level["tcb"]["isvsvn"]):
                return str(level["tcbStatus"])
        except (KeyError, TypeError, ValueError):
            raise CollateralError(f"{what} has a malformed TCB level") from None
    return NOT_SUPPORTED


def _tcb_info_status(info: dict[str, Any], body: TdReportBody, pck: PckInfo) -> tuple[str, str]:
    what = "TDX TCB info"
    if info.get("id") != "TDX" or info.get("version") != 3:
        raise CollateralError(f"{what} is not a TDX TCB info version 3")
    if _hexfield(info, "fmspc", what) != pck.fmspc:
        raise CollateralError(f"{what} is for FMSPC {info.get('fmspc')}, the PCK certificate's is {pck.fmspc.hex()}")
    if _hexfield(info, "pceId", what) != pck.pce_id:
        raise CollateralError(f"{what} is for PCE id {info.get('pceId')}, the PCK certificate's is {pck.pce_id.hex()}")
    module = info.get("tdxModule")
    if not isinstance(module, dict):
        raise CollateralError(f"{what} has no tdxModule")
    if body.mrsignerseam != _hexfield(module, "mrsigner", what):
        raise TcbError("the TDX module's signer (MRSIGNERSEAM) is not the one in Intel's TCB info")
    mask = _hexfield(module, "attributesMask", what)
    if _masked(body.seam_attributes, mask) != _masked(_hexfield(module, "attributes", what), mask):
        raise TcbError("the TDX module's SEAM attributes do not match Intel's TCB info")
    module_status = ""
    if body.tee_tcb_svn[1] > 0:  # TDX module 1.5+: its own identity and TCB levels
        ident = next((m for m in info.get("tdxModuleIdentities", [])
                      if m.get("id") == f"TDX_{body.tee_tcb_svn[1]:02X}"), None)
        if ident is None:
            raise CollateralError(f"{what} has no identity for TDX module major version {body.tee_tcb_svn[1]}")
        if body.mrsignerseam != _hexfield(ident, "mrsigner", what):
            raise TcbError("the TDX module's signer is not the one of its module identity")
        module_status = next((str(lv["tcbStatus"]) for lv in ident.get("tcbLevels", [])
                              if body.tee_tcb_svn[0] >= int(lv["tcb"]["isvsvn"])), NOT_SUPPORTED)
    for level in info.get("tcbLevels", []):
        try:
            tcb = level["tcb"]
            sgx = [int(c["svn"]) for c in tcb["sgxtcbcomponents"]]
            tdx = [int(c["svn"]) for c in tcb["tdxtcbcomponents"]]
            pcesvn = int(tcb["pcesvn"])
        except (KeyError, TypeError, ValueError):
            raise CollateralError(f"{what} has a malformed TCB level") from None
        if len(sgx) != 16 or len(tdx) != 16:
            raise CollateralError(f"{what} TCB level does not have 16 SGX and 16 TDX components")
        if all(a >= b for a, b in zip(pck.sgx_components, sgx, strict=True)) and pck.pcesvn >= pcesvn:
            start = 2 if body.tee_tcb_svn[1] > 0 else 0
            if all(body.tee_tcb_svn[i] >= tdx[i] for i in range(start, 16)):
                return str(level["tcbStatus"]), module_status
    return NOT_SUPPORTED, module_status


# --- policy and result ----------------------------------------------------------------------------
def _hex48(value: str | bytes | None, what: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = value if isinstance(value, bytes) else bytes.fromhex(value)
    except ValueError:
        raise PolicyError(f"{what} must be hex") from None
    if len(raw) != 48:
        raise PolicyError(f"{what} must be 48 bytes (96 hex characters), got {len(raw)}")
    return raw


@dataclass(frozen=True)
class TdxPolicy:
    """What a verified TDX quote must also satisfy.

    ``mrtd``: expected MRTD (the TD firmware's measurement). ``rtmrs``: expected RTMR0..3 (``None``
    entries are not checked). ``report_data``: the exact 64 bytes expected in REPORTDATA.
    ``accepted_tcb_status``: TCB statuses accepted for the platform and the QE (default only
    ``UpToDate``). ``require_collateral``: refuse when TCB info, QE identity or CRLs are missing.
    """

    mrtd: str | bytes | None = None
    rtmrs: Sequence[str | bytes | None] | None = None
    mrconfigid: str | bytes | None = None
    mrowner: str | bytes | None = None
    mrownerconfig: str | bytes | None = None
    report_data: bytes | None = None
    allow_debug: bool = False
    accepted_tcb_status: frozenset[str] = frozenset({"UpToDate"})
    require_collateral: bool = True

    def __post_init__(self) -> None:
        for name in ("mrtd", "mrconfigid", "mrowner", "mrownerconfig"):
            object.__setattr__(self, name, _hex48(getattr(self, name), name.upper()))
        if self.rtmrs is not None:
            if len(self.rtmrs) != 4:
                raise PolicyError("rtmrs must list 4 values (None for one not checked)")
            object.__setattr__(self, "rtmrs", tuple(_hex48(v, f"RTMR{i}") for i, v in enumerate(self.rtmrs)))
        if self.report_data is not None and len(self.report_data) != 64:
            raise PolicyError("report_data must be 64 bytes")
        unknown = set(self.accepted_tcb_status) - ACCEPTABLE_STATUSES
        if unknown:
            raise PolicyError(f"unknown or never acceptable TCB status {sorted(unknown)}; known: "
                              f"{sorted(ACCEPTABLE_STATUSES)}")
        object.__setattr__(self, "accepted_tcb_status", frozenset(self.accepted_tcb_status))


@dataclass(frozen=True)
class VerifiedTdxQuote:
    quote: TdxQuote
    pck: PckInfo
    tcb_status: str
    qe_status: str
    collateral_signatures: dict[str, str]
    verified_at: dt.datetime
    notes: tuple[str, ...] = field(default=())

    def claims(self) -> dict[str, Any]:
        b = self.quote.body
        out: dict[str, Any] = {
            "platform": "tdx",
            "quote_version": self.quote.version,
            "mrtd": b.mrtd.hex(),
            **{f"rtmr{i}": r.hex() for i, r in enumerate(b.rtmrs)},
            "report_data": b.report_data.hex(),
            "debug": b.debug,
            "td_attributes": b.td_attributes.hex(),
            "xfam": b.xfam.hex(),
            "mrconfigid": b.mrconfigid.hex(),
            "mrowner": b.mrowner.hex(),
            "mrownerconfig": b.mrownerconfig.hex(),
            "mrseam": b.mrseam.hex(),
            "tee_tcb_svn": b.tee_tcb_svn.hex(),
            "fmspc": self.pck.fmspc.hex(),
            "pck_ca": self.pck.ca,
            "tcb_status": self.tcb_status,
            "qe_status": self.qe_status,
            "trailing_bytes": self.quote.trailing_bytes,
            "verified_at": self.verified_at.isoformat(timespec="seconds"),
        }
        out.update({f"{k}_signature": v for k, v in self.collateral_signatures.items()})
        return out


def verify_tdx_quote(quote: bytes | TdxQuote, *, collateral: TdxCollateral | None = None,
                     policy: TdxPolicy | None = None, at: dt.datetime | None = None,
                     root: x509.Certificate | None = None) -> VerifiedTdxQuote:
    """Verify a TDX quote (see module doc). ``root``: trust anchor (default: the Intel SGX Root CA veil ships)."""
    policy = policy or TdxPolicy()
    collateral = collateral or TdxCollateral()
    q = quote if isinstance(quote, TdxQuote) else parse_tdx_quote(quote)
    when = utc(at)
    trusted_root = root or intel_sgx_root()
    if q.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise EvidenceFormatError(f"the quote's QE vendor id {q.qe_vendor_id.hex()} is not Intel's")

    # 2. PCK chain
    certs = load_pem_chain(q.pck_chain_pem, "PCK certificate chain in the quote", canonical=True)
    if len(certs) not in (2, 3):
        raise CertificateChainError(f"the quote's PCK chain has {len(certs)} certificates, expected 2 or 3")
    if len(certs) == 3 and certs[2] != trusted_root:
        raise CertificateChainError("the quote's PCK chain ends in a root other than the trusted Intel SGX Root CA")
    pck_cert, inter = certs[0], certs[1]
    verify_chain([(pck_cert, "PCK certificate"), (inter, "PCK CA certificate")], trusted_root, ECDSA_SHA256, when,
                 require_ca=True)
    pck = pck_info(pck_cert)

    # 3. CRLs
    notes: list[str] = []
    if collateral.root_crl is not None:
        check_crl(load_crl(collateral.root_crl, "Intel root CA CRL"), trusted_root, ECDSA_SHA256, when,
                  [(inter, "PCK CA certificate")], "Intel root CA CRL")
    if collateral.pck_crl is not None:
        check_crl(load_crl(collateral.pck_crl, "PCK CRL"), inter, ECDSA_SHA256, when,
                  [(pck_cert, "PCK certificate")], "PCK CRL")
    missing = [n for n, v in (("root CA CRL", collateral.root_crl), ("PCK CRL", collateral.pck_crl),
                              ("TCB info", collateral.tcb_info), ("QE identity", collateral.qe_identity)) if v is None]
    if missing and policy.require_collateral:
        raise CollateralError(f"missing TDX collateral: {', '.join(missing)} (give a collateral directory: "
                              "--collateral DIR or $VEIL_ATTESTATION_COLLATERAL, or allow fetching from Intel's "
                              "PCS: --fetch)")
    notes.extend(f"{n} not checked (absent)" for n in missing)

    # 4. QE report
    pck_key = pck_cert.public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or pck_key.curve.name != "secp256r1":
        raise CertificateChainError("the PCK key is not ECDSA P-256")
    _verify_p256(pck_key, q.qe_report_signature, q.qe_report.raw, "the QE report signature does not verify with the PCK")
    expected_qe_data = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report.report_data != expected_qe_data:
        raise BadSignatureError("the QE report does not vouch for this attestation key "
                                "(report data is not SHA-256(attestation key || QE auth data))")

    # 5. quote signature
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + q.attestation_key)
    except ValueError:
        raise BadSignatureError("the quote's attestation key is not a P-256 point") from None
    _verify_p256(att_key, q.signature, q.signed_bytes, "the TDX quote signature does not verify with its attestation key")

    # 6./7. collateral
    sigs: dict[str, str] = {}
    qe_status = tcb_status = "not checked"
    if collateral.qe_identity is not None:
        identity, sigs["qe_identity"] = _load_signed(collateral.qe_identity, "enclaveIdentity",
                                                     collateral.qe_identity_chain, collateral.local, trusted_root,
                                                     when, "QE identity")
        qe_status = _qe_identity_status(identity, q.qe_report)
        _accept_status(qe_status, policy, "quoting enclave")
    if collateral.tcb_info is not None:
        info, sigs["tcb_info"] = _load_signed(collateral.tcb_info, "tcbInfo", collateral.tcb_info_chain,
                                              collateral.local, trusted_root, when, "TDX TCB info")
        tcb_status, module_status = _tcb_info_status(info, q.body, pck)
        _accept_status(tcb_status, policy, "platform")
        if module_status:
            _accept_status(module_status, policy, "TDX module")

    # 8. policy
    b = q.body
    if b.debug and not policy.allow_debug:
        raise HardwarePolicyError("the TD runs in debug mode (TD_ATTRIBUTES.DEBUG): the host can read its memory")
    if policy.mrtd is not None and b.mrtd != policy.mrtd:
        assert isinstance(policy.mrtd, bytes)
        raise MeasurementMismatchError(b.mrtd.hex(), policy.mrtd.hex())
    for i, want in enumerate(policy.rtmrs or ()):
        if want is not None and b.rtmrs[i] != want:
            raise HardwarePolicyError(f"RTMR{i} is {b.rtmrs[i].hex()[:16]}..., the policy expects "
                                      f"{bytes(want).hex()[:16]}...")  # type: ignore[arg-type]
    for name in ("mrconfigid", "mrowner", "mrownerconfig"):
        want_v = getattr(policy, name)
        if want_v is not None and getattr(b, name) != want_v:
            raise HardwarePolicyError(f"{name.upper()} differs from the policy's")
    if policy.report_data is not None and b.report_data != policy.report_data:
        raise ReportDataMismatchError("the quote's REPORTDATA is not the expected 64 bytes (it does not bind "
                                      "this TLS key and nonce)")
    return VerifiedTdxQuote(quote=q, pck=pck, tcb_status=tcb_status, qe_status=qe_status,
                            collateral_signatures=sigs, verified_at=when, notes=tuple(notes))


def _accept_status(status: str, policy: TdxPolicy, what: str) -> None:
    if status == NOT_SUPPORTED:
        raise TcbError(f"the {what}'s TCB is below every TCB level in Intel's collateral (not supported)")
    if status not in policy.accepted_tcb_status:
        raise TcbError(f"the {what}'s TCB status is {status!r}; the policy accepts "
                       f"{', '.join(sorted(policy.accepted_tcb_status))}")


def _verify_p256(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, message: str) -> None:
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadSignatureError(message) from None
