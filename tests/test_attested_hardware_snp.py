"""SEV-SNP verification against a real report signed by a real AMD chip (go-sev-guest test data)."""

from __future__ import annotations

import datetime as dt
import warnings

import pytest
from cryptography import x509

from attestation_data import attestation_dir
from veil.attested.errors import (
    AttestationError,
    BadSignatureError,
    EvidenceFormatError,
    MeasurementMismatchError,
)
from veil.attested.hardware import (
    CertificateChainError,
    HardwarePolicyError,
    ReportDataMismatchError,
    SevSnpVerifier,
    SnpPolicy,
    TcbError,
    TcbVersion,
    parse_snp_report,
    verify_snp_report,
)
from veil.attested.hardware.anchors import amd_ask_ark
from veil.attested.hardware.certs import load_certificate, load_pem_chain
from veil.attested.hardware.sevsnp import SNP_SIGNED_SIZE
from veil.attested.platform import get_verifier

AT = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
MEASUREMENT = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
               "6bdf8a9ece31a5a608eb0cf2e4872b01")
REPORT_DATA = bytes([1, 2, 3, 4, 5]) + bytes(59)
OK = SnpPolicy(allow_debug=True)  # the sample guest was launched with a debug-allowing policy


@pytest.fixture(scope="module")
def snp() -> tuple[bytes, bytes]:
    d = attestation_dir() / "sev-snp"
    return (d / "report.bin").read_bytes(), (d / "vcek.der").read_bytes()


def test_parse_fields(snp):
    r = parse_snp_report(snp[0])
    assert (r.version, r.vmpl, r.signature_algo, r.signing_key) == (2, 0, 1, 0)
    assert r.measurement.hex() == MEASUREMENT
    assert r.report_data == REPORT_DATA
    assert r.debug and r.policy == 0xB0000
    with pytest.raises(EvidenceFormatError, match="1184 bytes"):
        parse_snp_report(snp[0][:-1])


def test_real_report_verifies(snp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the VCEK's serial number 0 must not leak a warning (or fail)
        v = verify_snp_report(snp[0], signing_cert=snp[1], at=AT,
                              policy=SnpPolicy(allow_debug=True, measurement=MEASUREMENT, report_data=REPORT_DATA,
                                               min_tcb=TcbVersion(bootloader=2, snp=5, microcode=68), max_vmpl=0))
    assert v.product == "Milan" and v.signing_key == "VCEK"
    assert v.reported_tcb == TcbVersion(bootloader=2, tee=0, snp=5, microcode=0x44)
    c = v.claims()
    assert c["measurement"] == MEASUREMENT and c["chain"] == "VCEK -> SEV-Milan -> ARK-Milan"


def test_policy_checks(snp):
    report, vcek = snp
    with pytest.raises(HardwarePolicyError, match="debug"):
        verify_snp_report(report, signing_cert=vcek, at=AT)  # default policy refuses debug guests
    with pytest.raises(MeasurementMismatchError):
        verify_snp_report(report, signing_cert=vcek, at=AT, policy=SnpPolicy(allow_debug=True, measurement="00" * 48))
    with pytest.raises(TcbError, match="snp"):
        verify_snp_report(report, signing_cert=vcek, at=AT, policy=SnpPolicy(allow_debug=True, min_tcb=TcbVersion(snp=6)))
    with pytest.raises(ReportDataMismatchError):
        verify_snp_report(report, signing_cert=vcek, at=AT,
                          policy=SnpPolicy(allow_debug=True, report_data=bytes(64)))
    with pytest.raises(HardwarePolicyError, match="HOST_DATA"):
        verify_snp_report(report, signing_cert=vcek, at=AT, policy=SnpPolicy(allow_debug=True, host_data="11" * 32))
    assert TcbVersion.parse("bl=2,tee=0,snp=5,ucode=68") == TcbVersion(2, 0, 5, 68)


def test_time_is_checked(snp):
    with pytest.raises(CertificateChainError, match="valid from"):
        verify_snp_report(snp[0], signing_cert=snp[1], policy=OK, at=dt.datetime(2030, 1, 1))  # VCEK expired
    with pytest.raises(CertificateChainError, match="valid from"):
        verify_snp_report(snp[0], signing_cert=snp[1], policy=OK, at=dt.datetime(2021, 1, 1))  # not yet issued


def test_wrong_root_is_refused(snp):
    genoa = amd_ask_ark("Genoa")
    with pytest.raises(CertificateChainError):
        verify_snp_report(snp[0], signing_cert=snp[1], policy=OK, at=AT, roots={"Milan": genoa})
    ask, _ = amd_ask_ark("Milan")
    with pytest.raises(CertificateChainError):  # the right ASK under another ARK
        verify_snp_report(snp[0], signing_cert=snp[1], policy=OK, at=AT, roots={"Milan": (ask, genoa[1])})
    with pytest.raises(CertificateChainError):  # no anchor for the product line at all
        verify_snp_report(snp[0], signing_cert=snp[1], policy=OK, at=AT, roots={"Genoa": genoa})


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def test_every_flipped_report_byte_is_refused(snp):
    report, vcek = snp
    cert = load_certificate(vcek, "vcek")
    kinds: dict[str, int] = {}
    for i in range(len(report)):  # the signed region, the signature and its padding
        with pytest.raises(AttestationError) as e:
            verify_snp_report(_flip(report, i), signing_cert=cert, policy=OK, at=AT)
        kinds[type(e.value).__name__] = kinds.get(type(e.value).__name__, 0) + 1
        assert "\n" not in str(e.value)
    assert kinds["BadSignatureError"] > SNP_SIGNED_SIZE  # most flips are caught by the signature itself


def _flipped_certs(der: bytes, step: int = 7):
    for i in range(0, len(der), step):
        try:
            yield i, load_certificate(_flip(der, i), "flipped")
        except CertificateChainError:
            yield i, None  # no longer parses: refused at load


def test_flipped_certificate_bytes_are_refused(snp):
    from cryptography.hazmat.primitives.serialization import Encoding

    report, vcek = snp
    ask, ark = amd_ask_ark("Milan")
    for _i, cert in _flipped_certs(vcek):
        if cert is not None:
            with pytest.raises(AttestationError):
                verify_snp_report(report, signing_cert=cert, policy=OK, at=AT)
    for which in ("ask", "ark"):
        der = (ask if which == "ask" else ark).public_bytes(Encoding.DER)
        for _i, cert in _flipped_certs(der):
            if cert is None:
                continue
            roots = {"Milan": (cert, ark) if which == "ask" else (ask, cert)}
            with pytest.raises(CertificateChainError):
                verify_snp_report(report, signing_cert=vcek, policy=OK, at=AT, roots=roots)


def test_flipped_signature_is_a_bad_signature(snp):
    report, vcek = snp
    for i in range(SNP_SIGNED_SIZE, SNP_SIGNED_SIZE + 144):
        with pytest.raises(BadSignatureError):
            verify_snp_report(_flip(report, i), signing_cert=vcek, policy=OK, at=AT)


def test_vcek_must_match_chip_and_tcb(snp):
    report = bytearray(snp[0])
    report[0x1A0] ^= 1  # another chip id: the VCEK is not this chip's (refused before the signature check)
    with pytest.raises(CertificateChainError, match="hwID"):
        verify_snp_report(bytes(report), signing_cert=snp[1], policy=OK, at=AT)
    report = bytearray(snp[0])
    report[0x186] = 6  # REPORTED_TCB.snp 6: the VCEK was issued for 5
    with pytest.raises(TcbError, match="REPORTED_TCB"):
        verify_snp_report(bytes(report), signing_cert=snp[1], policy=OK, at=AT)


def test_platform_verifier_plugs_into_client(snp):
    """The registered verifier turns (report, endorsements) into a PlatformReport for verify_evidence."""
    import veil.attested.hardware  # noqa: F401  (registers sev-snp and tdx)

    assert isinstance(get_verifier("sev-snp"), SevSnpVerifier)
    v = SevSnpVerifier(at=AT)
    pr = v.verify(snp[0], (snp[1],), None)
    assert (pr.platform, pr.measurement, pr.report_data, pr.debug, pr.simulated) == (
        "sev-snp", MEASUREMENT, REPORT_DATA, True, False)
    assert "Milan VCEK" in pr.signer
    with pytest.raises(AttestationError, match="no VCEK"):
        v.verify(snp[0], (), None)
    ask_pem = load_pem_chain((attestation_dir() / "sev-snp" / "ask_ark_milan.pem").read_bytes(), "ask")[0]
    assert isinstance(ask_pem, x509.Certificate)
