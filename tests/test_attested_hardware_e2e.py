"""A client verifying a real-platform server through the same Policy, end to end.

Real reports cannot carry a test's claims (their report data is fixed), so here a *synthetic* AMD
chain (test ARK -> ASK -> VCEK, same algorithms and extensions as AMD's) signs reports produced on
demand for the server's report data, behind a configfs-tsm stand-in. The client's verifier is the
real one, given the synthetic ARK as its trust anchor; with veil's shipped AMD roots it refuses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import struct

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from veil.attested.errors import (
    AttestationError,
    BadSignatureError,
    KeyMismatchError,
    MeasurementMismatchError,
    StaleNonceError,
)
from veil.attested.hardware import (
    CertificateChainError,
    CollateralError,
    CollateralSource,
    ConfigfsTsm,
    ConfigfsTsmPlatform,
    HardwarePolicyError,
    RevokedError,
    SevSnpVerifier,
    SnpPolicy,
    TcbVersion,
    verify_snp_report,
)
from veil.attested.hardware.configfs_tsm import TsmReport
from veil.attested.hardware.sevsnp import SNP_REPORT_SIZE, SNP_SIGNED_SIZE
from veil.attested.platform import get_verifier, register_verifier
from veil.attested.policy import Policy, verify_evidence
from veil.attested.tlskeys import generate_tls_identity
from veil.attested.trusted import TrustedSide

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
CHIP_ID = bytes(range(64))
MEASUREMENT = bytes(range(100, 148))
TCB = bytes([3, 0, 0, 0, 0, 0, 8, 115])  # Milan layout: bootloader 3, tee 0, snp 8, microcode 115


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str, public_key, signing_key, extensions=()) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(dt.datetime(2020, 1, 1))
         .not_valid_after(dt.datetime(2045, 1, 1)))
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    return b.sign(signing_key, hashes.SHA384(), rsa_padding=PSS)


def _amd_ext(suffix: str, der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1." + suffix), der)


@pytest.fixture(scope="module")
def chain():
    ark_key = rsa.generate_private_key(65537, 2048)
    ask_key = rsa.generate_private_key(65537, 2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = _cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key)
    ask = _cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key)
    exts = [_amd_ext("2", b"\x16\x08Milan-B0"), _amd_ext("4", CHIP_ID), _amd_ext("3.1", b"\x02\x01\x03"),
            _amd_ext("3.2", b"\x02\x01\x00"), _amd_ext("3.3", b"\x02\x01\x08"), _amd_ext("3.8", b"\x02\x01\x73")]
    vcek = _cert("SEV-VCEK", "SEV-Milan", vcek_key.public_key(), ask_key, exts)
    return {"ark": ark, "ask": ask, "vcek": vcek, "vcek_key": vcek_key, "ark_key": ark_key}


def make_report(vcek_key, report_data: bytes, *, policy: int = 0x30000, version: int = 2,
                cpuid: tuple[int, int, int] = (0, 0, 0), vmpl: int = 0, signing_key: int = 0) -> bytes:
    r = bytearray(SNP_REPORT_SIZE)
    struct.pack_into("<IIQ", r, 0, version, 0, policy)
    struct.pack_into("<II", r, 0x30, vmpl, 1)  # VMPL, ECDSA P-384 SHA-384
    struct.pack_into("<I", r, 0x48, signing_key << 2)
    if version >= 3:
        r[0x188:0x18B] = bytes(cpuid)
    r[0x38:0x40] = TCB
    r[0x50:0x90] = report_data
    r[0x90:0xC0] = MEASUREMENT
    r[0x180:0x188] = TCB
    r[0x1A0:0x1E0] = CHIP_ID
    r[0x1E0:0x1E8] = TCB
    r[0x1F0:0x1F8] = TCB
    sig_r, sig_s = decode_dss_signature(vcek_key.sign(bytes(r[:SNP_SIGNED_SIZE]), ec.ECDSA(hashes.SHA384())))
    r[SNP_SIGNED_SIZE:SNP_SIGNED_SIZE + 72] = sig_r.to_bytes(72, "little")
    r[SNP_SIGNED_SIZE + 72:SNP_SIGNED_SIZE + 144] = sig_s.to_bytes(72, "little")
    return bytes(r)


class SyntheticSnpTsm(ConfigfsTsm):
    """configfs-tsm as an SNP guest sees it, with a synthetic chip that signs what it is asked."""

    def __init__(self, vcek_key, vcek_der: bytes, policy: int = 0x30000):
        super().__init__("unused")
        self.vcek_key, self.vcek_der, self.policy = vcek_key, vcek_der, policy

    def provider(self) -> str | None:
        return "sev_guest"

    def report(self, report_data: bytes) -> TsmReport:
        from test_attested_hardware_configfs import VCEK_GUID, cert_table

        return TsmReport("sev_guest", make_report(self.vcek_key, report_data, policy=self.policy),
                         cert_table([(VCEK_GUID, self.vcek_der)]), 1)


@pytest.fixture
def synthetic_roots(chain):
    """Register a verifier anchored in the synthetic ARK; restore the default one afterwards."""
    default = get_verifier("sev-snp")
    register_verifier(SevSnpVerifier(roots={"Milan": (chain["ask"], chain["ark"])}))
    yield
    register_verifier(default)


def _server(chain, policy: int = 0x30000) -> TrustedSide:
    tsm = SyntheticSnpTsm(chain["vcek_key"], chain["vcek"].public_bytes(Encoding.DER), policy)
    return TrustedSide(ConfigfsTsmPlatform(tsm, ephemeral_sealing=True), generate_tls_identity(("127.0.0.1",)))


def test_client_verifies_snp_server_with_policy(chain, synthetic_roots):
    server = _server(chain)
    assert server.measurement == MEASUREMENT.hex()
    nonce = "cd" * 32
    ev = server.evidence(nonce, {})
    policy = Policy(code_measurement=MEASUREMENT.hex())
    ok = verify_evidence(ev, policy, nonce=nonce, tls_spki_sha256=server.tls.spki_sha256)
    assert (ok.report.platform, ok.simulated, ok.report.measurement) == ("sev-snp", False, MEASUREMENT.hex())
    assert "Milan VCEK" in ok.report.signer
    with pytest.raises(MeasurementMismatchError):
        verify_evidence(ev, Policy(code_measurement="00" * 48), nonce=nonce, tls_spki_sha256=server.tls.spki_sha256)
    with pytest.raises(StaleNonceError):
        verify_evidence(ev, policy, nonce="ef" * 32, tls_spki_sha256=server.tls.spki_sha256)
    with pytest.raises(KeyMismatchError):
        verify_evidence(ev, policy, nonce=nonce, tls_spki_sha256="00" * 32)
    forged = dataclasses.replace(ev, claims=ev.claims.replace(b'"nonce":"', b'"nonce":"0'))
    with pytest.raises(BadSignatureError, match="report data"):
        verify_evidence(forged, policy, nonce=nonce, tls_spki_sha256=server.tls.spki_sha256)


def test_debug_guest_needs_policy_opt_in(chain, synthetic_roots):
    server = _server(chain, policy=0x30000 | 1 << 19)
    ev = server.evidence("aa" * 32, {})
    with pytest.raises(AttestationError, match="debug"):
        verify_evidence(ev, Policy(code_measurement=MEASUREMENT.hex()), nonce="aa" * 32,
                        tls_spki_sha256=server.tls.spki_sha256)
    ok = verify_evidence(ev, Policy(code_measurement=MEASUREMENT.hex(), allow_debug=True), nonce="aa" * 32,
                         tls_spki_sha256=server.tls.spki_sha256)
    assert ok.report.debug


def test_shipped_amd_roots_refuse_a_synthetic_chain(chain):
    server = _server(chain)
    ev = server.evidence("bb" * 32, {})
    with pytest.raises(CertificateChainError):  # the default verifier trusts only AMD's ARKs
        verify_evidence(ev, Policy(code_measurement=MEASUREMENT.hex()), nonce="bb" * 32,
                        tls_spki_sha256=server.tls.spki_sha256)


def _verify(chain, report: bytes, **kw):
    return verify_snp_report(report, signing_cert=kw.pop("cert", chain["vcek"]), at=dt.datetime(2024, 1, 1),
                             roots={"Milan": (chain["ask"], chain["ark"])}, **kw)


def test_version_3_report_and_cpuid(chain):
    v3 = make_report(chain["vcek_key"], bytes(64), version=3, cpuid=(0x19, 0x01, 0x01))
    v = _verify(chain, v3)
    assert (v.report.version, v.report.cpuid, v.product) == (3, (0x19, 0x01, 0x01), "Milan")
    assert v.reported_tcb == TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
    genoa_cpu = make_report(chain["vcek_key"], bytes(64), version=3, cpuid=(0x19, 0x11, 0x01))
    with pytest.raises(CertificateChainError, match="CPUID says Genoa"):
        _verify(chain, genoa_cpu)
    with pytest.raises(HardwarePolicyError, match="VMPL"):
        _verify(chain, make_report(chain["vcek_key"], bytes(64), vmpl=2))
    assert _verify(chain, make_report(chain["vcek_key"], bytes(64), vmpl=2), policy=SnpPolicy(max_vmpl=3))
    # Turin's TCB_VERSION layout: FMC, bootloader, TEE, SNP, reserved x3, microcode
    assert TcbVersion.from_raw(bytes([1, 2, 3, 4, 0, 0, 0, 5]), "Turin") == TcbVersion(2, 3, 4, 5, fmc=1)


def test_vlek_chains_through_the_asvk(chain):
    ark_key = chain["ark_key"]
    asvk_key = rsa.generate_private_key(65537, 2048)
    asvk = _cert("SEV-VLEK-Milan", "ARK-Milan", asvk_key.public_key(), ark_key)
    vlek_key = ec.generate_private_key(ec.SECP384R1())
    exts = [_amd_ext("5", b"\x16\x03csp"), _amd_ext("3.1", b"\x02\x01\x03"), _amd_ext("3.3", b"\x02\x01\x08")]
    vlek = _cert("SEV-VLEK", "SEV-VLEK-Milan", vlek_key.public_key(), asvk_key, exts)
    report = make_report(vlek_key, bytes(64), signing_key=1)
    v = _verify(chain, report, cert=vlek, intermediates=[asvk])
    assert v.signing_key == "VLEK" and v.certificate_chain == ("VLEK", "SEV-VLEK-Milan", "ARK-Milan")
    with pytest.raises(CertificateChainError, match="ASVK"):
        _verify(chain, report, cert=vlek)  # no ASVK given
    with pytest.raises(HardwarePolicyError, match="VLEK"):
        _verify(chain, report, cert=vlek, intermediates=[asvk], policy=SnpPolicy(allow_vlek=False))
    with pytest.raises(CertificateChainError, match="signed by the VLEK"):
        _verify(chain, report)  # a VCEK offered for a VLEK-signed report
    rogue_key = rsa.generate_private_key(65537, 2048)  # an ASVK not signed by the trusted ARK
    rogue = _cert("SEV-VLEK-Milan", "ARK-Milan", rogue_key.public_key(), rogue_key)
    with pytest.raises(CertificateChainError):
        _verify(chain, report, cert=_cert("SEV-VLEK", "SEV-VLEK-Milan", vlek_key.public_key(), rogue_key, exts),
                intermediates=[rogue])


def test_vcek_fetched_from_kds(chain):
    """With fetch=True the VCEK comes from AMD's KDS at the report's chip and TCB (mock transport: no network)."""
    seen = []
    crl = {"der": _ark_crl(chain, revoked=())}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path.endswith("/crl"):
            return httpx.Response(200, content=crl["der"])
        return httpx.Response(200, content=chain["vcek"].public_bytes(Encoding.DER))

    report = make_report(chain["vcek_key"], bytes(64))
    verifier = SevSnpVerifier(collateral=CollateralSource(fetch=True, transport=httpx.MockTransport(handler)),
                              roots={"Milan": (chain["ask"], chain["ark"])}, at=dt.datetime(2024, 1, 1))
    assert verifier.check(report).product == "Milan"
    assert seen == [f"https://kdsintf.amd.com/vcek/v1/Milan/{CHIP_ID.hex()}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115",
                    "https://kdsintf.amd.com/vcek/v1/Milan/crl"]
    assert verifier.check(report, (chain["vcek"].public_bytes(Encoding.DER),)).product == "Milan"
    assert len(seen) == 3  # the evidence carried the VCEK: only the CRL was fetched
    crl["der"] = _ark_crl(chain, revoked=(chain["ask"],))
    with pytest.raises(RevokedError, match="SEV-Milan"):  # AMD's CRL revokes an ASK
        verifier.check(report)
    crl["der"] = _ark_crl(chain, revoked=(), signer=rsa.generate_private_key(65537, 2048))
    with pytest.raises(CollateralError, match="signature"):
        verifier.check(report)


def _ark_crl(chain, revoked, signer=None) -> bytes:
    b = (x509.CertificateRevocationListBuilder().issuer_name(chain["ark"].subject)
         .last_update(dt.datetime(2023, 1, 1)).next_update(dt.datetime(2025, 1, 1)))
    for cert in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                                      .revocation_date(dt.datetime(2023, 6, 1)).build())
    crl = b.sign(signer or chain["ark_key"], hashes.SHA384(), rsa_padding=PSS)
    return crl.public_bytes(Encoding.DER)


def test_cli_verifies_veil_evidence_json(tmp_path):
    """`veil attested verify` on a server's evidence JSON: the real SNP report verifies, but it does not carry
    SHA-512 of these claims, so the binding is refused."""
    from typer.testing import CliRunner

    from attestation_data import attestation_dir
    from veil.attested.evidence import Evidence
    from veil.cli.main import app

    d = attestation_dir() / "sev-snp"
    ev = Evidence("sev-snp", b'{"nonce":"x"}', (d / "report.bin").read_bytes(), ((d / "vcek.der").read_bytes(),))
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(ev.to_json()))
    r = CliRunner().invoke(app, ["attested", "verify", str(path), "--allow-debug", "--at", "2024-01-01"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ReportDataMismatchError"), r.stderr
