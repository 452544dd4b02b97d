"""TDX DCAP quote verification against a real production quote and Intel's collateral (go-tdx-guest data)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from attestation_data import attestation_dir
from veil.attested.errors import (
    AttestationError,
    BadSignatureError,
    EvidenceFormatError,
    MeasurementMismatchError,
)
from veil.attested.hardware import (
    CertificateChainError,
    CollateralError,
    CollateralSource,
    HardwarePolicyError,
    ReportDataMismatchError,
    TcbError,
    TdxCollateral,
    TdxPolicy,
    TdxVerifier,
    parse_tdx_quote,
    verify_tdx_quote,
)
from veil.attested.hardware.collateral import kds_vcek_url, pcs_pck_crl_url, pcs_tcb_info_url
from veil.attested.hardware.sevsnp import TcbVersion
from veil.attested.hardware.tdx import SIGNED_SIZE, verify_signed_collateral

AT = dt.datetime(2023, 6, 20, tzinfo=dt.UTC)  # inside every validity window of the 2023 collateral
MRTD = "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
NO_TCB = TdxPolicy(require_collateral=False)  # the sample TCB info does not cover this quote's platform TCB


@pytest.fixture(scope="module")
def tdx() -> dict[str, bytes]:
    d = attestation_dir() / "tdx"
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _collateral(files: dict[str, bytes], *, tcb: bool = True, **over: bytes | None) -> TdxCollateral:
    col = TdxCollateral(tcb_info=files["sample_tcbInfo_response"] if tcb else None,
                        qe_identity=files["sample_qeIdentity_response"], pck_crl=files["pckcrl"],
                        root_crl=files["rootcrl.der"])
    return dataclasses.replace(col, **over)


def test_parse_fields(tdx):
    q = parse_tdx_quote(tdx["tdx_prod_quote_SPR_E4.dat"])
    assert (q.version, q.att_key_type, q.tee_type) == (4, 2, 0x81)
    assert q.body.mrtd.hex() == MRTD and not q.body.debug
    assert q.qe_report.isvsvn == 4 and len(q.qe_auth_data) == 32
    assert q.trailing_bytes == 39  # test data has a text note appended after the signature data
    with pytest.raises(EvidenceFormatError):
        parse_tdx_quote(tdx["tdx_prod_quote_SPR_E4.dat"][:1000])


def test_real_quote_verifies(tdx):
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    q = parse_tdx_quote(quote)
    v = verify_tdx_quote(quote, collateral=_collateral(tdx, tcb=False), at=AT,
                         policy=TdxPolicy(require_collateral=False, mrtd=MRTD, report_data=q.body.report_data,
                                          rtmrs=[q.body.rtmrs[0].hex(), None, None, bytes(48).hex()]))
    c = v.claims()
    assert c["mrtd"] == MRTD and c["qe_status"] == "UpToDate" and c["fmspc"] == "50806f000000"
    assert c["qe_identity_signature"].startswith("not verified (local file")
    assert v.notes == ("TCB info not checked (absent)",)


def test_tcb_info_is_evaluated(tdx):
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    # Intel's sample TCB info lists levels above this machine's PCK TCB (SGX components 3,3,.. < 5,5,..)
    with pytest.raises(TcbError, match="below every TCB level"):
        verify_tdx_quote(quote, collateral=_collateral(tdx), at=AT)
    # the same TCB info with the levels lowered to what this machine has: first level matches
    info = json.loads(tdx["sample_tcbInfo_response"])
    for level in info["tcbInfo"]["tcbLevels"]:
        for comp, svn in zip(level["tcb"]["sgxtcbcomponents"], [3, 3, 2, 2, 2, 1, 0, 2] + [0] * 8, strict=True):
            comp["svn"] = svn
        level["tcb"]["tdxtcbcomponents"][2]["svn"] = 4
    info["tcbInfo"]["tcbLevels"][0]["tcbStatus"] = "SWHardeningNeeded"
    lowered = json.dumps(info).encode()
    with pytest.raises(TcbError, match="SWHardeningNeeded"):
        verify_tdx_quote(quote, collateral=_collateral(tdx, tcb_info=lowered), at=AT)
    v = verify_tdx_quote(quote, collateral=_collateral(tdx, tcb_info=lowered), at=AT,
                         policy=TdxPolicy(accepted_tcb_status=frozenset({"UpToDate", "SWHardeningNeeded"})))
    assert (v.tcb_status, v.qe_status) == ("SWHardeningNeeded", "UpToDate")
    info["tcbInfo"]["fmspc"] = "00906ed50000"
    with pytest.raises(CollateralError, match="FMSPC"):
        verify_tdx_quote(quote, collateral=_collateral(tdx, tcb_info=json.dumps(info).encode()), at=AT)


def test_qe_identity_is_checked(tdx):
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    ident = json.loads(tdx["sample_qeIdentity_response"])
    ident["enclaveIdentity"]["mrsigner"] = "00" * 32
    with pytest.raises(TcbError, match="MRSIGNER"):
        verify_tdx_quote(quote, collateral=_collateral(tdx, tcb=False, qe_identity=json.dumps(ident).encode()),
                         at=AT, policy=NO_TCB)


def test_policy_checks(tdx):
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    col = _collateral(tdx, tcb=False)
    with pytest.raises(MeasurementMismatchError):
        verify_tdx_quote(quote, collateral=col, at=AT, policy=TdxPolicy(require_collateral=False, mrtd="00" * 48))
    with pytest.raises(HardwarePolicyError, match="RTMR2"):
        verify_tdx_quote(quote, collateral=col, at=AT,
                         policy=TdxPolicy(require_collateral=False, rtmrs=[None, None, "11" * 48, None]))
    with pytest.raises(ReportDataMismatchError):
        verify_tdx_quote(quote, collateral=col, at=AT, policy=TdxPolicy(require_collateral=False, report_data=bytes(64)))
    with pytest.raises(CollateralError, match="missing TDX collateral: TCB info"):
        verify_tdx_quote(quote, collateral=col, at=AT)  # strict by default
    debug = bytearray(quote)
    debug[48 + 120] |= 1  # TD_ATTRIBUTES.DEBUG: signed, so it breaks the signature first
    with pytest.raises(BadSignatureError):
        verify_tdx_quote(bytes(debug), collateral=col, at=AT, policy=NO_TCB)


def test_time_is_checked(tdx):
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    with pytest.raises(CollateralError, match="current"):  # PCK CRL's next update passed
        verify_tdx_quote(quote, collateral=_collateral(tdx, tcb=False), at=dt.datetime(2023, 8, 1), policy=NO_TCB)
    with pytest.raises(CertificateChainError, match="valid from"):  # PCK certificate expired
        verify_tdx_quote(quote, collateral=TdxCollateral(), at=dt.datetime(2030, 1, 1), policy=NO_TCB)


def _self_signed_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2040, 1, 1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def test_wrong_root_is_refused(tdx):
    _, other = _self_signed_ca("Intel SGX Root CA")  # same name, another key
    with pytest.raises(CertificateChainError):
        verify_tdx_quote(tdx["tdx_prod_quote_SPR_E4.dat"], at=AT, root=other, policy=NO_TCB)


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def test_flipped_quote_bytes_are_refused(tdx):
    """Every byte of header, body, signature length, signature, attestation key, QE report, its
    signature and auth data, and every 7th byte of the PCK certificate chain."""
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    q = parse_tdx_quote(quote)
    pem_start = quote.index(b"-----BEGIN CERTIFICATE-----")
    pem_end = pem_start + len(q.pck_chain_pem)
    positions = [*range(pem_start), *range(pem_start, pem_end, 7)]
    assert len(positions) > SIGNED_SIZE + 600
    kinds: dict[str, int] = {}
    for i in positions:
        with pytest.raises(AttestationError) as e:
            verify_tdx_quote(_flip(quote, i), at=AT, policy=NO_TCB)
        kinds[type(e.value).__name__] = kinds.get(type(e.value).__name__, 0) + 1
    assert kinds["BadSignatureError"] > SIGNED_SIZE and kinds["CertificateChainError"] > 400, kinds


def test_flipped_crl_bytes_are_refused(tdx):
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    for name in ("pckcrl", "rootcrl.der"):
        crl = tdx[name]
        key = "pck_crl" if name == "pckcrl" else "root_crl"
        for i in range(0, len(crl), 7):
            with pytest.raises(AttestationError):
                verify_tdx_quote(quote, collateral=TdxCollateral(**{key: _flip(crl, i)}), at=AT, policy=NO_TCB)


def test_signed_collateral_chain():
    """Intel signs TCB info / QE identity with its TCB signing key (chain in an HTTP header, absent
    from the sample): the signature over the exact member bytes is checked up to the trusted root."""
    root_key, root = _self_signed_ca("Test Root CA")
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test TCB Signing")]))
              .issuer_name(root.subject).public_key(signer_key.public_key()).serial_number(2)
              .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2040, 1, 1))
              .sign(root_key, hashes.SHA256()))
    chain = signer.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM)
    member = b'{"id":"TDX","version":3}'
    r, s = decode_dss_signature(signer_key.sign(member, ec.ECDSA(hashes.SHA256())))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    verify_signed_collateral(member, sig, chain, root, AT, "TCB info")
    with pytest.raises(CollateralError, match="signature"):
        verify_signed_collateral(member.replace(b"3", b"4"), sig, chain, root, AT, "TCB info")
    _, other_root = _self_signed_ca("Test Root CA")
    with pytest.raises(CollateralError):
        verify_signed_collateral(member, sig, chain, other_root, AT, "TCB info")


def test_fetched_collateral_must_be_signed(tdx):
    """Collateral from Intel's PCS (here a mock transport: nothing leaves the machine) must carry its chain."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if "/tcb" in request.url.path:
            return httpx.Response(200, content=tdx["sample_tcbInfo_response"])  # no TCB-Info-Issuer-Chain header
        return httpx.Response(404)

    source = CollateralSource(fetch=True, transport=httpx.MockTransport(handler))
    with pytest.raises(CollateralError, match="issuer chain header"):
        TdxVerifier(collateral=source, at=AT).check(tdx["tdx_prod_quote_SPR_E4.dat"])
    assert seen == [pcs_tcb_info_url(bytes.fromhex("50806f000000"))]
    assert seen[0] == "https://api.trustedservices.intel.com/tdx/certification/v4/tcb?fmspc=50806f000000"


def test_collateral_directory(tdx, tmp_path):
    v = TdxVerifier(collateral=CollateralSource(attestation_dir()), at=AT,
                    policy=TdxPolicy(require_collateral=True))
    with pytest.raises(TcbError, match="below every TCB level"):  # all four pieces found and used
        v.check(tdx["tdx_prod_quote_SPR_E4.dat"])
    with pytest.raises(CollateralError, match="does not exist"):
        TdxVerifier(collateral=CollateralSource(tmp_path / "missing"), at=AT).check(tdx["tdx_prod_quote_SPR_E4.dat"])


def test_vendor_urls():
    chip = bytes(range(64))
    tcb = TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
    assert kds_vcek_url("Milan", chip, tcb) == (
        f"https://kdsintf.amd.com/vcek/v1/Milan/{chip.hex()}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115")
    turin = TcbVersion(bootloader=1, tee=2, snp=3, microcode=4, fmc=5)
    assert kds_vcek_url("Turin", chip, turin) == (
        f"https://kdsintf.amd.com/vcek/v1/Turin/{chip[:8].hex()}?fmcSPL=05&blSPL=01&teeSPL=02&snpSPL=03&ucodeSPL=04")
    assert pcs_pck_crl_url("platform").endswith("/sgx/certification/v4/pckcrl?ca=platform&encoding=der")


def test_collateral_signing_chain_is_used(tdx):
    """Inside the quote verification: a TCB info issuer chain not rooted in Intel's root is refused, and
    collateral not from local files must come with its chain."""
    quote = tdx["tdx_prod_quote_SPR_E4.dat"]
    _, fake_root = _self_signed_ca("Intel SGX Root CA")
    chain = fake_root.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CollateralError, match="TCB info signer"):
        verify_tdx_quote(quote, collateral=_collateral(tdx, tcb_info_chain=chain), at=AT)
    with pytest.raises(CollateralError, match="without its issuer chain"):
        verify_tdx_quote(quote, collateral=dataclasses.replace(_collateral(tdx), local=False), at=AT)
