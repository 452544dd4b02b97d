"""The server's real-hardware platform, against a fake configfs-tsm tree (no TEE on this machine).

The fake plays the kernel: a new entry gets ``provider``, ``outblob`` (a real SNP report or TDX
quote from the test data), ``auxblob`` and ``generation``; what the server wrote to ``inblob`` is
recorded when the entry is removed.
"""

from __future__ import annotations

import ctypes
import shutil
import struct
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from attestation_data import attestation_dir
from veil.attested.errors import BadSignatureError, EvidenceFormatError
from veil.attested.evidence import report_data_for
from veil.attested.hardware import (
    ConfigfsTsm,
    ConfigfsTsmPlatform,
    SealingUnavailableError,
    TsmUnavailableError,
)
from veil.attested.hardware.anchors import amd_ask_ark
from veil.attested.hardware.configfs_tsm import SNP_GET_DERIVED_KEY, parse_snp_cert_table, snp_derived_key
from veil.attested.hardware.select import choose_platform
from veil.attested.platform import get_verifier
from veil.attested.policy import Policy, verify_evidence
from veil.attested.tlskeys import generate_tls_identity
from veil.attested.trusted import TrustedSide
from veil.cli.main import app
from veil.errors import DeploymentError

SNP_MEASUREMENT = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
                   "6bdf8a9ece31a5a608eb0cf2e4872b01")
MRTD = "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")


def cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    header_len = 24 * (len(entries) + 1)
    header, body = b"", b""
    for guid, blob in entries:
        header += guid.bytes_le + struct.pack("<II", header_len + len(body), len(blob))
        body += blob
    return header + bytes(24) + body


class FakeKernel:
    def __init__(self, provider: str, outblob: bytes, auxblob: bytes = b""):
        self.provider, self.outblob, self.auxblob = provider, outblob, auxblob
        self.inblobs: list[bytes] = []

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        (path / "provider").write_text(self.provider + "\n")
        (path / "outblob").write_bytes(self.outblob)
        (path / "auxblob").write_bytes(self.auxblob)
        (path / "generation").write_text("1\n")

    def rmdir(self, path: Path) -> None:
        if (path / "inblob").exists():
            self.inblobs.append((path / "inblob").read_bytes())
        shutil.rmtree(path)

    def tsm(self, root: Path) -> ConfigfsTsm:
        return ConfigfsTsm(root, mkdir=self.mkdir, rmdir=self.rmdir)


@pytest.fixture(scope="module")
def data() -> dict[str, bytes]:
    d = attestation_dir()
    return {"report": (d / "sev-snp" / "report.bin").read_bytes(), "vcek": (d / "sev-snp" / "vcek.der").read_bytes(),
            "quote": (d / "tdx" / "tdx_prod_quote_SPR_E4.dat").read_bytes()}


def test_snp_platform_plumbing(tmp_path, data):
    ask = amd_ask_ark("Milan")[0].public_bytes(Encoding.DER)  # the kernel's table holds DER certificates
    kernel = FakeKernel("sev_guest", data["report"], cert_table([(VCEK_GUID, data["vcek"]), (ASK_GUID, ask)]))
    platform = ConfigfsTsmPlatform(kernel.tsm(tmp_path), ephemeral_sealing=True)
    assert (platform.name, platform.simulated) == ("sev-snp", False)
    assert platform.measurement() == SNP_MEASUREMENT
    assert kernel.inblobs == [bytes(64)]  # the measurement comes from a report over zero report data
    trusted = TrustedSide(platform, generate_tls_identity(("127.0.0.1",)))
    nonce = "ab" * 32
    ev = trusted.evidence(nonce, {})
    assert kernel.inblobs[-1] == report_data_for(ev.claims)  # the server asked the platform to bind its claims
    assert ev.platform == "sev-snp" and ev.report == data["report"] and ev.endorsements[0] == data["vcek"]
    assert list(tmp_path.iterdir()) == []  # every entry removed
    # the client's registered verifier accepts the real signature and chain...
    assert get_verifier("sev-snp").verify(ev.report, ev.endorsements, None).measurement == SNP_MEASUREMENT
    # ...and refuses the evidence, because this (static, fake) report does not carry these claims
    with pytest.warns(UserWarning):
        policy = Policy(hazmat_any_measurement=True)
    with pytest.raises(BadSignatureError, match="report data"):
        verify_evidence(ev, policy, nonce=nonce, tls_spki_sha256=trusted.tls.spki_sha256)
    a = platform.seal(b"model bytes", b"aad")
    assert platform.unseal(a, b"aad") == b"model bytes"


def test_tdx_platform_plumbing(tmp_path, data):
    kernel = FakeKernel("tdx_guest", data["quote"])
    platform = ConfigfsTsmPlatform(kernel.tsm(tmp_path))
    assert platform.name == "tdx" and platform.measurement() == MRTD
    report, endorsements = platform.report(bytes(range(64)))
    assert report == data["quote"] and endorsements == () and kernel.inblobs[-1] == bytes(range(64))
    with pytest.raises(SealingUnavailableError, match="key-release"):
        platform.derive_key("seal")
    eph = ConfigfsTsmPlatform(kernel.tsm(tmp_path), ephemeral_sealing=True)
    assert eph.unseal(eph.seal(b"x", b""), b"") == b"x"
    assert eph.derive_key("seal") != ConfigfsTsmPlatform(kernel.tsm(tmp_path), ephemeral_sealing=True).derive_key("seal")


def test_platform_choice(tmp_path, data):
    missing = ConfigfsTsm(tmp_path / "absent")
    with pytest.raises(DeploymentError, match="no hardware TEE"):
        choose_platform("auto", hazmat_allow_simulation=False, tsm=missing)
    assert choose_platform("auto", hazmat_allow_simulation=True, tsm=missing) == "simulated"
    with pytest.raises(DeploymentError, match="hazmat-allow-simulation"):
        choose_platform("simulated", hazmat_allow_simulation=False, tsm=missing)
    snp = FakeKernel("sev_guest", data["report"]).tsm(tmp_path)
    assert choose_platform("auto", hazmat_allow_simulation=False, tsm=snp) == "sev-snp"
    assert choose_platform("auto", hazmat_allow_simulation=True, tsm=snp) == "sev-snp"  # hardware first
    with pytest.raises(TsmUnavailableError, match="provider is sev-snp"):
        ConfigfsTsmPlatform(snp, expect="tdx")
    with pytest.raises(TsmUnavailableError):
        ConfigfsTsmPlatform(missing)
    with pytest.raises(DeploymentError):
        choose_platform("sgx", hazmat_allow_simulation=True, tsm=missing)


def test_cert_table_parsing(data):
    table = cert_table([(VCEK_GUID, data["vcek"])])
    assert parse_snp_cert_table(table) == {"vcek": data["vcek"]}
    broken = bytearray(table)
    broken[20:24] = struct.pack("<I", 10**6)
    with pytest.raises(EvidenceFormatError):
        parse_snp_cert_table(bytes(broken))


def test_snp_derived_key_request(tmp_path):
    """The MSG_KEY_REQ ioctl's layout, against a fake /dev/sev-guest (the firmware answer is simulated)."""
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    seen = {}

    def fake_ioctl(fd: int, request: int, arg: bytearray) -> int:
        version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", arg)
        seen.update(request=request, version=version, req=ctypes.string_at(req_addr, 32))
        answer = struct.pack("<I", 0) + bytes(28) + bytes(range(32))
        ctypes.memmove(resp_addr, answer, 64)
        return 0

    assert snp_derived_key(device=str(device), ioctl=fake_ioctl) == bytes(range(32))
    assert seen["request"] == SNP_GET_DERIVED_KEY == 0xC0205301 and seen["version"] == 1
    root_key, _, field_select, vmpl, svn, tcb = struct.unpack("<IIQIIQ", seen["req"])
    assert (root_key, field_select, vmpl) == (0, 0b1001, 0)  # VCEK root key; guest policy + measurement

    def refusing(fd: int, request: int, arg: bytearray) -> int:
        resp_addr = struct.unpack("<B7xQQQ", arg)[2]
        ctypes.memmove(resp_addr, struct.pack("<I", 0x16) + bytes(60), 64)
        return 0

    with pytest.raises(SealingUnavailableError, match="0x16"):
        snp_derived_key(device=str(device), ioctl=refusing)
    with pytest.raises(SealingUnavailableError, match="no SEV-SNP guest device"):
        snp_derived_key(device=str(tmp_path / "absent"))


@pytest.mark.parametrize("args, message", [
    (["--platform", "tdx"], "TsmUnavailableError"),
    (["--platform", "simulated"], "hazmat-allow-simulation"),
    ([], "no hardware TEE"),
])
def test_serve_refuses_without_platform(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    r = CliRunner().invoke(app, ["attested", "serve", "--store", str(tmp_path / "store"), "--port", "0",
                                 "--tsm-root", str(tmp_path / "no-tsm"), *args])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error") and message in lines[0], r.stderr
