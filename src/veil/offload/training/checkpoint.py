"""Sealed training checkpoints: stop a run and resume it later with nothing lost.

A checkpoint holds the parameters, the optimizer state, the position in the data order (epoch and
batch), the loss history and the job fingerprint, encoded with veil's pickle-free wire format and
sealed (AES-256-GCM under the enclave's sealing key, :class:`~veil.offload.runtime.EnclaveRuntime`)
with the job fingerprint as associated data: the untrusted host stores it but can neither read it
nor swap in another job's checkpoint. It is written to a temporary file and renamed, so a crash while
writing leaves the previous checkpoint intact.

With the simulated runtime the sealing key lives in a file marked SIMULATED (``key_file``); a real
enclave derives it from its identity (SGX EGETKEY). Rollback to an *older* checkpoint of the same
job is not detected (needs a monotonic counter, not available here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from veil.errors import ProtocolError
from veil.net.wire import decode, encode
from veil.offload.errors import SealError
from veil.offload.runtime import EnclaveRuntime

__all__ = ["save_checkpoint", "load_checkpoint"]

_AAD = b"veil-offload-train-checkpoint/v1|"


def save_checkpoint(path: str | Path, state: dict[str, Any], runtime: EnclaveRuntime, job: str) -> int:
    """Seal ``state`` for ``job`` and write it atomically to ``path``; returns the file size."""
    blob = runtime.seal(encode(state), _AAD + job.encode())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return len(blob)


def load_checkpoint(path: str | Path, runtime: EnclaveRuntime, job: str) -> dict[str, Any]:
    """Unseal a checkpoint of ``job`` (SealError when tampered, foreign or of another job)."""
    p = Path(path)
    if not p.is_file():
        raise SealError(f"no checkpoint at {p.name!r}")
    data = runtime.unseal(p.read_bytes(), _AAD + job.encode())
    try:
        state = decode(data)
    except ProtocolError as e:
        raise SealError(f"checkpoint {p.name!r} does not decode: {e}") from None
    if not isinstance(state, dict):
        raise SealError(f"checkpoint {p.name!r} holds no training state")
    return state
