"""A client verifying a real-platform server through the same Policy, end to end.

Real reports cannot carry a test's claims (their report data is fixed), so here a *synthetic* AMD
chain (test ARK -> ASK -> VCEK, same algorithms and extensions as AMD's) signs reports produced on
demand for the server's report data, behind a configfs-tsm stand-in. The client's verifier is the
real one, given the synthetic ARK as its trust anchor; with veil's shipped AMD roots it refuses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from veil.attested.errors import (
    AttestationError,
    BadSignatureError,
    KeyMismatchError,
    MeasurementMismatchError,
    StaleNonceError,
)
from veil.attested.hardware import CertificateChainError, ConfigfsTsm, ConfigfsTsmPlatform, SevSnpVerifier
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
    return {"ark": ark, "ask": ask, "vcek": vcek, "vcek_key": vcek_key}


def make_report(vcek_key, report_data: bytes, *, policy: int = 0x30000) -> bytes:
    r = bytearray(SNP_REPORT_SIZE)
    struct.pack_into("<IIQ", r, 0, 2, 0, policy)
    struct.pack_into("<II", r, 0x30, 0, 1)  # VMPL 0, ECDSA P-384 SHA-384
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
    from cryptography.hazmat.primitives.serialization import Encoding

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
