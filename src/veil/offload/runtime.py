"""The enclave runtime interface, and the simulated runtime used on machines without SGX.

What the offload enclave needs from its trusted runtime is small:

1. ``random_bytes(n)``: a trusted source of randomness (seeds for masks and Freivalds vectors);
2. ``seal(data, aad)`` / ``unseal(blob, aad)``: authenticated encryption under a key that never leaves
   the enclave (SGX: a key from EGETKEY bound to MRENCLAVE/MRSIGNER), so precomputed material can live
   in untrusted memory or on disk;
3. ``describe()``: what backs it, printed in every report.

:class:`SimulatedEnclaveRuntime` fills this with ``os.urandom`` and AES-256-GCM (``cryptography``) under
a key held in this process's memory (optionally written to a file marked SIMULATED). It gives *no*
hardware protection: the host OS can read the key, the masks and every plaintext. It therefore
refuses to start without ``hazmat_allow_simulation=True`` and warns every time it is created.
A real runtime (e.g. a Gramine or Open Enclave host running this code) implements the same methods.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.errors import SimulationNotAllowedError
from veil.offload.errors import SealError
from veil.simulation import SimulationWarning

__all__ = ["EnclaveRuntime", "SimulatedEnclaveRuntime", "SimulatedEnclaveWarning"]

_KEY_FILE_HEADER = b"VEIL-SIMULATED-ENCLAVE-SEALING-KEY (no hardware protection)\n"


SimulatedEnclaveWarning = SimulationWarning  # the old name; one class for every mode (veil.simulation)


class EnclaveRuntime:
    """Interface of a trusted enclave runtime (see module docstring)."""

    simulated: bool = False

    def random_bytes(self, n: int) -> bytes:
        raise NotImplementedError

    def seal(self, data: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class SimulatedEnclaveRuntime(EnclaveRuntime):
    """Software stand-in for an enclave: correct protocol, no hardware isolation."""

    simulated = True

    def __init__(self, hazmat_allow_simulation: bool = False, key_file: str | Path | None = None):
        if not hazmat_allow_simulation:
            raise SimulationNotAllowedError(
                "offload mode: no SGX enclave is available here and the simulated enclave gives no hardware "
                "protection; pass hazmat_allow_simulation=True (CLI: --hazmat-allow-simulation) to run it anyway")
        warnings.warn("offload mode: the enclave is SIMULATED (a normal process; sealing key in ordinary memory); "
                      "the host can read every secret", SimulatedEnclaveWarning, stacklevel=2)
        self._key = self._load_or_create_key(Path(key_file)) if key_file else AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(self._key)

    @staticmethod
    def _load_or_create_key(path: Path) -> bytes:
        if path.is_file():
            data = path.read_bytes()
            if not data.startswith(_KEY_FILE_HEADER) or len(data) != len(_KEY_FILE_HEADER) + 32:
                raise SealError(f"{path} is not a simulated-enclave sealing key file")
            return data[len(_KEY_FILE_HEADER):]
        key = AESGCM.generate_key(bit_length=256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_KEY_FILE_HEADER + key)
        return key

    def random_bytes(self, n: int) -> bytes:
        return os.urandom(n)

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 12 + 16:
            raise SealError("sealed blob is truncated")
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except InvalidTag:
            raise SealError("sealed material failed authentication (tampered, swapped or sealed by another "
                            "enclave)") from None

    def describe(self) -> str:
        return "SIMULATED enclave (software only, no SGX; AES-256-GCM sealing key in process memory)"
