"""AMD SEV-SNP attestation reports: parsing and verification.

A report (SEV-SNP firmware ABI, ``ATTESTATION_REPORT``, versions 2 and 3) is 1184 bytes; bytes
``0x000..0x29F`` are signed by the chip's VCEK (or the cloud provider's VLEK) with ECDSA P-384 /
SHA-384; the signature at ``0x2A0`` holds ``r`` then ``s``, 72 bytes each, little-endian, then
zeros. :func:`verify_snp_report` checks, in this order, and raises the first failure:

1. the report's structure (size, version, signature algorithm, zero padding of the signature);
2. the chain VCEK (or VLEK) -> ASK (or ASVK) -> ARK of the product line (RSA-PSS, SHA-384, salt 48),
   the ARK being one veil ships (or the caller gives) as trust anchor, every certificate valid at
   the verification time; the ARK's CRL when one is supplied;
3. the VCEK's extensions: product line, chip id (``hwID``) equal to the report's ``CHIP_ID``, and
   the TCB it was issued for (bootloader, TEE, SNP, microcode, FMC SPLs) equal to ``REPORTED_TCB``;
4. the report signature by the VCEK's P-384 key;
5. the policy: debug refused (guest policy bit 19) unless allowed, VMPL, minimum TCB, expected
   launch measurement, host data, and the 64 bytes of ``REPORT_DATA`` the caller expects.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from veil.attested.errors import MeasurementMismatchError
from veil.attested.hardware.anchors import AMD_PRODUCTS, amd_ask_ark
from veil.attested.hardware.certs import (
    RSA_PSS_SHA384,
    check_crl,
    load_certificate,
    load_crl,
    utc,
    verify_chain,
)
from veil.attested.hardware.der import IA5STRING, der_int, read_one
from veil.attested.hardware.errors import (
    BadSignatureError,
    CertificateChainError,
    EvidenceFormatError,
    HardwarePolicyError,
    PolicyError,
    ReportDataMismatchError,
    TcbError,
)

__all__ = [
    "SNP_REPORT_SIZE",
    "SNP_SIGNED_SIZE",
    "TcbVersion",
    "SnpReport",
    "SnpPolicy",
    "VerifiedSnpReport",
    "parse_snp_report",
    "product_from_cpuid",
    "verify_snp_report",
    "split_endorsements",
    "signing_cert_product",
]

SNP_REPORT_SIZE = 0x4A0
SNP_SIGNED_SIZE = 0x2A0
_SIG_COMPONENT = 72
POLICY_DEBUG_BIT = 19
POLICY_MIGRATE_MA_BIT = 18
SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE = 0, 1, 7

_AMD_OID = "1.3.6.1.4.1.3704.1."
OID_PRODUCT_NAME = _AMD_OID + "2"
OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL, OID_FMC_SPL = (
    _AMD_OID + "3.1", _AMD_OID + "3.2", _AMD_OID + "3.3", _AMD_OID + "3.8", _AMD_OID + "3.9")
OID_HWID, OID_CSP_ID = _AMD_OID + "4", _AMD_OID + "5"


@dataclass(frozen=True, order=False)
class TcbVersion:
    """The security patch levels of an SNP platform (``TCB_VERSION``). ``fmc`` exists from Turin on."""

    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0
    fmc: int | None = None

    @classmethod
    def from_raw(cls, raw: bytes, product: str) -> TcbVersion:
        if product == "Turin":  # FMC, BOOTLOADER, TEE, SNP, reserved x3, MICROCODE
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])  # BL, TEE, reserved x4, SNP, UCODE

    @classmethod
    def parse(cls, text: str) -> TcbVersion:
        """``"bl=3,tee=0,snp=8,ucode=115[,fmc=1]"`` (any subset; missing parts are 0)."""
        names = {"bl": "bootloader", "bootloader": "bootloader", "tee": "tee", "snp": "snp",
                 "ucode": "microcode", "microcode": "microcode", "fmc": "fmc"}
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key.strip().lower() not in names or not value.strip().isdigit():
                raise PolicyError(f"minimum TCB part {part!r} is not NAME=NUMBER with NAME in bl, tee, snp, ucode, fmc")
            values[names[key.strip().lower()]] = int(value)
        return cls(**values)

    def components(self) -> dict[str, int]:
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def below(self, minimum: TcbVersion) -> list[str]:
        """Names of the components lower than in ``minimum``."""
        mine = self.components()
        return [k for k, v in minimum.components().items() if mine.get(k, 0) < v]

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.components().items())


_CPUID_PRODUCTS = (  # (family, first model, last model, product)
    (0x19, 0x00, 0x0F, "Milan"),
    (0x19, 0x10, 0x1F, "Genoa"),
    (0x19, 0xA0, 0xAF, "Genoa"),
    (0x1A, 0x00, 0x11, "Turin"),
)


def product_from_cpuid(family: int, model: int) -> str | None:
    for fam, lo, hi, product in _CPUID_PRODUCTS:
        if family == fam and lo <= model <= hi:
            return product
    return None


@dataclass(frozen=True)
class SnpReport:
    """The fields of an SNP attestation report (raw values; TCBs decoded once the product line is known)."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb_raw: bytes
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb_raw: bytes
    cpuid: tuple[int, int, int] | None
    chip_id: bytes
    committed_tcb_raw: bytes
    current_version: tuple[int, int, int]
    committed_version: tuple[int, int, int]
    launch_tcb_raw: bytes
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SNP_SIGNED_SIZE]

    def cpuid_product(self) -> str | None:
        if self.cpuid is None or self.cpuid == (0, 0, 0):
            return None
        return product_from_cpuid(self.cpuid[0], self.cpuid[1])


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse a 1184-byte SNP report (version 2 or 3); raise :class:`EvidenceFormatError` if malformed."""
    data = bytes(data)
    if len(data) != SNP_REPORT_SIZE:
        raise EvidenceFormatError(f"an SEV-SNP report is {SNP_REPORT_SIZE} bytes, got {len(data)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0)
    if version not in (2, 3):
        raise EvidenceFormatError(f"SEV-SNP report version {version} is not supported (2 or 3)")
    vmpl, sig_algo = struct.unpack_from("<II", data, 0x30)
    if sig_algo != 1:
        raise EvidenceFormatError(f"SEV-SNP report signature algorithm {sig_algo} is not 1 (ECDSA P-384 SHA-384)")
    (platform_info,) = struct.unpack_from("<Q", data, 0x40)
    (flags,) = struct.unpack_from("<I", data, 0x48)
    sig = data[SNP_SIGNED_SIZE:]
    if any(sig[2 * _SIG_COMPONENT:]):
        raise EvidenceFormatError("SEV-SNP report signature padding is not zero")
    r = int.from_bytes(sig[:_SIG_COMPONENT], "little")
    s = int.from_bytes(sig[_SIG_COMPONENT:2 * _SIG_COMPONENT], "little")
    cpuid = (data[0x188], data[0x189], data[0x18A]) if version >= 3 else None
    return SnpReport(
        raw=data, version=version, guest_svn=guest_svn, policy=policy,
        family_id=data[0x10:0x20], image_id=data[0x20:0x30], vmpl=vmpl, signature_algo=sig_algo,
        current_tcb_raw=data[0x38:0x40], platform_info=platform_info,
        author_key_en=bool(flags & 1), mask_chip_key=bool(flags >> 1 & 1), signing_key=flags >> 2 & 7,
        report_data=data[0x50:0x90], measurement=data[0x90:0xC0], host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110], author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160], report_id_ma=data[0x160:0x180], reported_tcb_raw=data[0x180:0x188],
        cpuid=cpuid, chip_id=data[0x1A0:0x1E0], committed_tcb_raw=data[0x1E0:0x1E8],
        current_version=(data[0x1EA], data[0x1E9], data[0x1E8]),
        committed_version=(data[0x1EE], data[0x1ED], data[0x1EC]),
        launch_tcb_raw=data[0x1F0:0x1F8], signature_r=r, signature_s=s,
    )


def _hex(value: str | bytes | None, what: str, length: int) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        raw = value
    else:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise PolicyError(f"{what} must be hex") from None
    if len(raw) != length:
        raise PolicyError(f"{what} must be {length} bytes ({2 * length} hex characters), got {len(raw)}")
    return raw


@dataclass(frozen=True)
class SnpPolicy:
    """What a verified SNP report must also satisfy.

    ``measurement``: expected launch measurement (48 bytes / 96 hex, as ``sev-snp-measure`` prints it).
    ``report_data``: the exact 64 bytes expected in ``REPORT_DATA`` (veil: SHA-512 of the claims that
    bind the TLS key and the client's nonce). ``max_vmpl``: the least privileged VMPL accepted (0: only
    reports requested from VMPL 0). ``min_tcb``: lowest accepted ``REPORTED_TCB`` (per component).
    ``allow_debug``: accept guests whose policy allows debugging (their memory is readable by the host).
    """

    measurement: str | bytes | None = None
    report_data: bytes | None = None
    allow_debug: bool = False
    max_vmpl: int | None = 0
    min_tcb: TcbVersion | None = None
    host_data: str | bytes | None = None
    allow_vlek: bool = True
    allow_migration_agent: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurement", _hex(self.measurement, "SNP measurement", 48))
        object.__setattr__(self, "report_data", _hex(self.report_data, "report data", 64))
        object.__setattr__(self, "host_data", _hex(self.host_data, "SNP host data", 32))
        if self.max_vmpl is not None and not 0 <= self.max_vmpl <= 3:
            raise PolicyError("max_vmpl must be 0..3")


@dataclass(frozen=True)
class VerifiedSnpReport:
    """An SNP report whose signature, chain and policy checks passed."""

    report: SnpReport
    product: str
    signing_key: str  # "VCEK" or "VLEK"
    reported_tcb: TcbVersion
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    current_tcb: TcbVersion
    verified_at: dt.datetime
    certificate_chain: tuple[str, ...] = field(default=())

    def claims(self) -> dict[str, Any]:
        r = self.report
        return {
            "platform": "sev-snp",
            "product": self.product,
            "report_version": r.version,
            "signing_key": self.signing_key,
            "chain": " -> ".join(self.certificate_chain),
            "measurement": r.measurement.hex(),
            "report_data": r.report_data.hex(),
            "host_data": r.host_data.hex(),
            "debug": r.debug,
            "guest_policy": f"0x{r.policy:x}",
            "vmpl": r.vmpl,
            "guest_svn": r.guest_svn,
            "reported_tcb": str(self.reported_tcb),
            "committed_tcb": str(self.committed_tcb),
            "launch_tcb": str(self.launch_tcb),
            "firmware": "{}.{}.{}".format(*r.current_version),
            "chip_id": r.chip_id.hex(),
            "id_key_digest": r.id_key_digest.hex(),
            "author_key_digest": r.author_key_digest.hex(),
            "family_id": r.family_id.hex(),
            "image_id": r.image_id.hex(),
            "verified_at": self.verified_at.isoformat(timespec="seconds"),
        }


def _ext_value(cert: x509.Certificate, oid: str) -> bytes | None:
    for ext in cert.extensions:
        if ext.oid.dotted_string == oid:
            value = ext.value
            return value.value if isinstance(value, x509.UnrecognizedExtension) else None
    return None


def _ext_int(cert: x509.Certificate, oid: str) -> int | None:
    raw = _ext_value(cert, oid)
    return None if raw is None else der_int(read_one(raw))


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


def signing_cert_product(cert: x509.Certificate) -> str:
    """The product line named by the issuer of a VCEK (``SEV-Milan``) or VLEK (``SEV-VLEK-Milan``)."""
    issuer = _cn(cert.issuer)
    for product in AMD_PRODUCTS:
        if issuer in (f"SEV-{product}", f"SEV-VLEK-{product}"):
            return product
    raise CertificateChainError(f"the SNP signing certificate's issuer {issuer!r} is not an AMD ASK/ASVK "
                                f"of {', '.join(AMD_PRODUCTS)}")


def _check_vcek_extensions(cert: x509.Certificate, report: SnpReport, product: str, kind: str,
                           reported: TcbVersion) -> None:
    raw_name = _ext_value(cert, OID_PRODUCT_NAME)
    if raw_name is not None:
        tlv = read_one(raw_name)
        name = tlv.value.decode("ascii", errors="replace") if tlv.tag == IA5STRING else ""
        if not name.startswith(product):
            raise CertificateChainError(f"the {kind}'s product name {name!r} is not of the {product} line")
    if kind == "VCEK" and not report.mask_chip_key:
        hwid = _ext_value(cert, OID_HWID)
        if hwid is None:
            raise CertificateChainError("the VCEK has no hwID extension")
        if len(hwid) in (10, 66) and hwid[:2] == b"\x04" + bytes([len(hwid) - 2]):  # some KDS versions wrap it in an OCTET STRING
            hwid = hwid[2:]
        if not hwid or report.chip_id[:len(hwid)] != hwid or any(report.chip_id[len(hwid):]):
            raise CertificateChainError("the VCEK was issued for another chip than the one that signed the report "
                                        "(hwID differs from CHIP_ID)")
    if kind == "VLEK" and _ext_value(cert, OID_CSP_ID) is None:
        raise CertificateChainError("the VLEK has no CSP id extension")
    got = {"bootloader": _ext_int(cert, OID_BL_SPL), "tee": _ext_int(cert, OID_TEE_SPL),
           "snp": _ext_int(cert, OID_SNP_SPL), "microcode": _ext_int(cert, OID_UCODE_SPL),
           "fmc": _ext_int(cert, OID_FMC_SPL)}
    want = reported.components()
    for comp, value in got.items():
        if value is not None and comp in want and value != want[comp]:
            raise TcbError(f"the {kind} was issued for {comp} SPL {value}, but the report's REPORTED_TCB has "
                           f"{want[comp]}: the certificate does not match the reported TCB")


def verify_snp_report(report: bytes | SnpReport, *, signing_cert: bytes | x509.Certificate,
                      policy: SnpPolicy | None = None, at: dt.datetime | None = None,
                      roots: Mapping[str, tuple[x509.Certificate, x509.Certificate]] | None = None,
                      intermediates: Iterable[bytes | x509.Certificate] = (),
                      ark_crl: bytes | None = None) -> VerifiedSnpReport:
    """Verify an SNP report (see module doc). ``signing_cert``: the VCEK or VLEK (DER or PEM).

    ``roots``: product -> (ASK, ARK) trust anchors (default: those veil ships). ``intermediates``:
    extra ASK/ASVK certificates (each is used only if the trusted ARK signed it). ``at``: the
    verification time (default: now).
    """
    policy = policy or SnpPolicy()
    rep = report if isinstance(report, SnpReport) else parse_snp_report(report)
    when = utc(at)
    cert = signing_cert if isinstance(signing_cert, x509.Certificate) else load_certificate(signing_cert, "VCEK/VLEK")
    subject = _cn(cert.subject)
    if subject not in ("SEV-VCEK", "SEV-VLEK"):
        raise CertificateChainError(f"the SNP signing certificate is {subject!r}, expected SEV-VCEK or SEV-VLEK")
    kind = subject[4:]
    expected_kind = {SIGNING_KEY_VCEK: "VCEK", SIGNING_KEY_VLEK: "VLEK"}.get(rep.signing_key)
    if expected_kind is None:
        raise EvidenceFormatError(f"the SNP report is not signed by a VCEK or VLEK (SIGNING_KEY={rep.signing_key})")
    if kind != expected_kind:
        raise CertificateChainError(f"the report says it is signed by the {expected_kind}, the certificate is a {kind}")
    if kind == "VLEK" and not policy.allow_vlek:
        raise HardwarePolicyError("the report is signed by a VLEK, which the policy does not accept")
    product = signing_cert_product(cert)
    cpuid_product = rep.cpuid_product()
    if cpuid_product is not None and cpuid_product != product:
        raise CertificateChainError(f"the report's CPUID says {cpuid_product}, its certificate is of the {product} line")

    # 2. chain to the trusted ARK
    anchors = roots if roots is not None else {p: amd_ask_ark(p) for p in AMD_PRODUCTS}
    if product not in anchors:
        raise CertificateChainError(f"no trusted AMD root for the {product} product line")
    ask, ark = anchors[product]
    candidates: list[x509.Certificate] = [ask]
    for extra in intermediates:
        candidates.append(extra if isinstance(extra, x509.Certificate)
                          else load_certificate(extra, "supplied AMD intermediate certificate"))
    issuer = next((c for c in candidates if c.subject == cert.issuer), None)
    if issuer is None:
        raise CertificateChainError(f"no trusted certificate named {_cn(cert.issuer)!r} (the {kind}'s issuer) "
                                    "chains to the trusted ARK (for a VLEK, supply the ASVK)")
    verify_chain([(cert, kind), (issuer, _cn(issuer.subject))], ark, RSA_PSS_SHA384, when)
    if ark_crl is not None:
        check_crl(load_crl(ark_crl, "AMD ARK CRL"), ark, RSA_PSS_SHA384, when,
                  [(issuer, _cn(issuer.subject))], "AMD ARK CRL")

    # 3. the certificate is the one for this chip and TCB
    reported = TcbVersion.from_raw(rep.reported_tcb_raw, product)
    _check_vcek_extensions(cert, rep, product, kind, reported)

    # 4. the report signature
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise CertificateChainError(f"the {kind} key is not ECDSA P-384")
    try:
        key.verify(encode_dss_signature(rep.signature_r, rep.signature_s), rep.signed_bytes,
                   ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise BadSignatureError(f"the SEV-SNP report signature does not verify with the {kind}") from None

    # 5. policy
    if rep.debug and not policy.allow_debug:
        raise HardwarePolicyError("the guest policy allows debugging (bit 19): the host can read its memory; "
                                  "the policy does not accept debug guests")
    if rep.policy >> POLICY_MIGRATE_MA_BIT & 1 and not policy.allow_migration_agent:
        raise HardwarePolicyError("the guest policy allows a migration agent; the policy does not accept it")
    if policy.max_vmpl is not None and rep.vmpl > policy.max_vmpl:
        raise HardwarePolicyError(f"the report was requested at VMPL {rep.vmpl}; the policy accepts VMPL <= "
                                  f"{policy.max_vmpl}")
    if policy.min_tcb is not None and (low := reported.below(policy.min_tcb)):
        raise TcbError(f"REPORTED_TCB {reported} is below the minimum {policy.min_tcb} ({', '.join(low)})")
    if policy.measurement is not None and rep.measurement != policy.measurement:
        assert isinstance(policy.measurement, bytes)
        raise MeasurementMismatchError(rep.measurement.hex(), policy.measurement.hex())
    if policy.host_data is not None and rep.host_data != policy.host_data:
        raise HardwarePolicyError("the report's HOST_DATA differs from the policy's")
    if policy.report_data is not None and rep.report_data != policy.report_data:
        raise ReportDataMismatchError("the report's REPORT_DATA is not the expected 64 bytes (it does not bind "
                                      "this TLS key and nonce)")
    return VerifiedSnpReport(
        report=rep, product=product, signing_key=kind, reported_tcb=reported,
        committed_tcb=TcbVersion.from_raw(rep.committed_tcb_raw, product),
        launch_tcb=TcbVersion.from_raw(rep.launch_tcb_raw, product),
        current_tcb=TcbVersion.from_raw(rep.current_tcb_raw, product), verified_at=when,
        certificate_chain=(kind, _cn(issuer.subject), _cn(ark.subject)),
    )


def split_endorsements(endorsements: Sequence[bytes]) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """(VCEK/VLEK, other certificates) among DER/PEM endorsements; unparseable ones are refused."""
    leaf, others = None, []
    for i, blob in enumerate(endorsements):
        cert = load_certificate(blob, f"endorsement {i}")
        if _cn(cert.subject) in ("SEV-VCEK", "SEV-VLEK") and leaf is None:
            leaf = cert
        else:
            others.append(cert)
    return leaf, others
