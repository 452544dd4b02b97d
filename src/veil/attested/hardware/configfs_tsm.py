"""The server's trusted platform on real hardware, through Linux's configfs-tsm report interface.

Linux (6.7+) offers one interface for SEV-SNP and TDX guests under ``/sys/kernel/config/tsm/report``:
create a directory (an *entry*), write 64 bytes of report data to its ``inblob``, read the signed
evidence from ``outblob`` (SEV-SNP: the 1184-byte report; TDX: a DCAP quote, produced by the
host's quoting service), and ``provider`` (``sev_guest`` or ``tdx_guest``). ``auxblob`` holds, on
SEV-SNP hosts that provide them, the certificate table (VCEK or VLEK, ASK, ARK); ``generation``
counts writes, so a concurrent writer is detected (the entry is private to this process anyway).

Sealing keys (:meth:`ConfigfsTsmPlatform.derive_key`): configfs-tsm gives no keys.

* SEV-SNP: the key is asked from the firmware with ``MSG_KEY_REQ`` through ``/dev/sev-guest``
  (``SNP_GET_DERIVED_KEY`` ioctl), derived from the VCEK root key and bound to the guest policy and
  the launch measurement: only the same code on the same chip derives it, and an update of the
  measured code cannot unseal the store (re-upload the models). veil then derives one key per
  purpose with HKDF-SHA256.
* TDX has no sealing key for TDs (there is no ``EGETKEY``): a key must come from a key-release
  service that checks the TD's quote first, which veil does not include. Without one the platform
  refuses to seal (:class:`SealingUnavailableError`), unless ``ephemeral_sealing`` is chosen: a
  random key held in memory only, so the store cannot be reopened after a restart.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.attested.hardware.errors import EvidenceFormatError, SealingUnavailableError
from veil.attested.hardware.sevsnp import parse_snp_report
from veil.attested.hardware.tdx import parse_tdx_quote
from veil.attested.platform import TrustedPlatform
from veil.errors import DeploymentError

__all__ = [
    "DEFAULT_TSM_ROOT",
    "PROVIDERS",
    "TsmUnavailableError",
    "TsmReport",
    "ConfigfsTsm",
    "ConfigfsTsmPlatform",
    "detect_platform",
    "parse_snp_cert_table",
    "snp_derived_key",
]

DEFAULT_TSM_ROOT = "/sys/kernel/config/tsm/report"
PROVIDERS = {"sev_guest": "sev-snp", "tdx_guest": "tdx"}
SNP_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}


class TsmUnavailableError(DeploymentError):
    """The configfs-tsm interface is absent, or did not produce evidence."""


@dataclass(frozen=True)
class TsmReport:
    provider: str
    outblob: bytes
    auxblob: bytes
    generation: int


def _read(path: Path, required: bool = True) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if required:
            raise TsmUnavailableError(f"configfs-tsm entry lacks {path.name} ({path})") from None
        return b""
    except OSError as e:
        raise TsmUnavailableError(f"reading {path} failed: {e.strerror}") from None


class ConfigfsTsm:
    """Reports through ``root`` (default ``/sys/kernel/config/tsm/report``).

    ``mkdir``/``rmdir`` create and remove entries (the kernel fills a new entry with its attribute
    files; tests pass functions that do it for a fake tree). ``privlevel``: SEV-SNP VMPL to request at.
    """

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_TSM_ROOT, *, privlevel: int | None = None,
                 mkdir: Callable[[Path], None] | None = None, rmdir: Callable[[Path], None] | None = None):
        self.root = Path(root)
        self.privlevel = privlevel
        self._mkdir = mkdir or (lambda p: os.mkdir(p, 0o700))
        self._rmdir = rmdir or os.rmdir

    def available(self) -> bool:
        return self.root.is_dir()

    def report(self, report_data: bytes) -> TsmReport:
        if len(report_data) != 64:
            raise ValueError("report data must be 64 bytes")
        if not self.available():
            raise TsmUnavailableError(f"no configfs-tsm report interface at {self.root} (needs Linux 6.7+ in an "
                                      "SEV-SNP or TDX guest, configfs mounted)")
        entry = self.root / f"veil-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self._mkdir(entry)
        except OSError as e:
            raise TsmUnavailableError(f"cannot create configfs-tsm entry {entry}: {e.strerror}") from None
        try:
            if self.privlevel is not None:
                (entry / "privlevel").write_text(str(self.privlevel))
            (entry / "inblob").write_bytes(report_data)
            gen_before = int(_read(entry / "generation").strip() or b"0")
            out = _read(entry / "outblob")
            aux = _read(entry / "auxblob", required=False)
            provider = _read(entry / "provider").decode(errors="replace").strip()
            gen_after = int(_read(entry / "generation").strip() or b"0")
        except OSError as e:
            raise TsmUnavailableError(f"configfs-tsm report failed: {e.strerror}") from None
        except ValueError:
            raise TsmUnavailableError("configfs-tsm generation is not a number") from None
        finally:
            try:
                self._rmdir(entry)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise TsmUnavailableError(f"cannot remove configfs-tsm entry {entry}: {e.strerror}") from None
        if gen_before != gen_after:
            raise TsmUnavailableError("another writer changed the configfs-tsm entry while the report was read")
        if not out:
            raise TsmUnavailableError(f"configfs-tsm provider {provider!r} returned no evidence")
        return TsmReport(provider, out, aux, gen_after)

    def provider(self) -> str | None:
        """The provider name (``sev_guest``, ``tdx_guest``) or ``None`` when there is no interface."""
        if not self.available():
            return None
        entry = self.root / f"veil-probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._mkdir(entry)
        except OSError:
            return None
        try:
            return _read(entry / "provider").decode(errors="replace").strip() or None
        except TsmUnavailableError:
            return None
        finally:
            try:
                self._rmdir(entry)
            except OSError:
                pass


def detect_platform(tsm: ConfigfsTsm) -> str | None:
    """``"sev-snp"``/``"tdx"`` for the provider this machine has, else ``None``."""
    provider = tsm.provider()
    return PROVIDERS.get(provider) if provider else None


def parse_snp_cert_table(aux: bytes) -> dict[str, bytes]:
    """The certificates of an SNP extended-report certificate table (GUID, offset, length; zero entry ends)."""
    out: dict[str, bytes] = {}
    for pos in range(0, len(aux) - 23, 24):
        raw_guid, offset, length = aux[pos:pos + 16], *struct.unpack_from("<II", aux, pos + 16)
        if not any(aux[pos:pos + 24]):
            return out
        if offset + length > len(aux):
            raise EvidenceFormatError("SNP certificate table entry points outside the table")
        name = SNP_CERT_GUIDS.get(uuid.UUID(bytes_le=raw_guid))
        if name is not None:
            out[name] = aux[offset:offset + length]
    if aux:
        raise EvidenceFormatError("SNP certificate table has no terminating entry")
    return out


# --- SEV-SNP derived keys through /dev/sev-guest ------------------------------------------------------
SNP_GET_DERIVED_KEY = 0xC0205301  # _IOWR('S', 1, struct snp_guest_request_ioctl) (32 bytes)
GUEST_FIELD_POLICY, GUEST_FIELD_MEASUREMENT = 1 << 0, 1 << 3


def snp_derived_key(*, device: str = "/dev/sev-guest", vmpl: int = 0,
                    field_select: int = GUEST_FIELD_POLICY | GUEST_FIELD_MEASUREMENT,
                    ioctl: Callable[[int, int, bytearray], int] | None = None) -> bytes:
    """32 bytes from the SNP firmware's ``MSG_KEY_REQ`` (VCEK root key, bound to ``field_select``)."""
    req = ctypes.create_string_buffer(struct.pack("<IIQIIQ", 0, 0, field_select, vmpl, 0, 0), 32)
    resp = ctypes.create_string_buffer(64)
    arg = bytearray(struct.pack("<B7xQQQ", 1, ctypes.addressof(req), ctypes.addressof(resp), 0))
    do_ioctl = ioctl or (lambda fd, request, buf: fcntl.ioctl(fd, request, buf, True))
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as e:
        raise SealingUnavailableError(f"no SEV-SNP guest device {device} ({e.strerror}): cannot derive a sealing key") from None
    try:
        do_ioctl(fd, SNP_GET_DERIVED_KEY, arg)
    except OSError as e:
        (exitinfo,) = struct.unpack_from("<Q", arg, 24)
        raise SealingUnavailableError(f"SNP_GET_DERIVED_KEY failed: {e.strerror} (firmware/VMM error 0x{exitinfo:x})") from None
    finally:
        os.close(fd)
    raw = resp.raw
    (status,) = struct.unpack_from("<I", raw, 0)
    if status != 0:
        raise SealingUnavailableError(f"the SNP firmware refused the key request (status 0x{status:x})")
    return raw[32:64]


class ConfigfsTsmPlatform(TrustedPlatform):
    """A real SEV-SNP or TDX guest, seen through configfs-tsm (see module doc)."""

    simulated = False

    def __init__(self, tsm: ConfigfsTsm | None = None, *, expect: str | None = None,
                 ephemeral_sealing: bool = False, key_source: Callable[[], bytes] | None = None):
        self.tsm = tsm or ConfigfsTsm()
        detected = detect_platform(self.tsm)
        if detected is None:
            raise TsmUnavailableError(f"no SEV-SNP or TDX provider behind configfs-tsm at {self.tsm.root}")
        if expect is not None and expect != detected:
            raise TsmUnavailableError(f"--platform {expect} was asked, but this machine's configfs-tsm provider is "
                                      f"{detected}")
        self.name = detected
        self._ephemeral = ephemeral_sealing
        self._key_source = key_source
        self._root_key: bytes | None = None
        self._measurement: str | None = None

    def measurement(self) -> str:
        if self._measurement is None:
            out = self.tsm.report(bytes(64)).outblob
            if self.name == "sev-snp":
                self._measurement = parse_snp_report(out).measurement.hex()
            else:
                self._measurement = parse_tdx_quote(out).body.mrtd.hex()
        return self._measurement

    def report(self, report_data: bytes) -> tuple[bytes, tuple[bytes, ...]]:
        rep = self.tsm.report(report_data)
        if PROVIDERS.get(rep.provider) != self.name:
            raise TsmUnavailableError(f"configfs-tsm provider changed to {rep.provider!r}")
        endorsements: tuple[bytes, ...] = ()
        if self.name == "sev-snp" and rep.auxblob:
            certs = parse_snp_cert_table(rep.auxblob)
            endorsements = tuple(certs[k] for k in ("vcek", "vlek", "ask") if k in certs)
        return rep.outblob, endorsements

    def derive_key(self, purpose: str) -> bytes:
        if self._root_key is None:
            if self._key_source is not None:
                self._root_key = self._key_source()
            elif self.name == "sev-snp":
                try:
                    self._root_key = snp_derived_key()
                except SealingUnavailableError:
                    if not self._ephemeral:
                        raise
                    self._root_key = secrets.token_bytes(32)
            elif self._ephemeral:
                self._root_key = secrets.token_bytes(32)
            else:
                raise SealingUnavailableError(
                    "TDX offers no sealing key to a TD; veil needs a key-release service (not included) or "
                    "--ephemeral-sealing (a random in-memory key: the store cannot be reopened after a restart)")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"veil-attested-platform-key",
                    info=f"{self.name}:{purpose}".encode()).derive(self._root_key)
