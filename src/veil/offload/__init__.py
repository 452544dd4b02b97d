"""Offload mode: a trusted enclave keeps the non-linear layers and the secrets; untrusted accelerators
run the linear layers on one-time-blinded field elements (Slalom-style), verified with Freivalds' check.

Start with :class:`OffloadEnclave` (the trusted party), :func:`serve_accelerator` (the untrusted one)
and :func:`run_offload_local` (both in one process); :func:`run` is the one-call entry point
shaped like every mode's (``outputs, report = veil.offload.run(model, x, ...)``). The enclave is simulated on these machines:
:class:`SimulatedEnclaveRuntime` needs ``hazmat_allow_simulation=True`` and warns.
"""

from veil.offload.accelerator import Accelerator, serve_accelerator
from veil.offload.api import OffloadReport, run
from veil.offload.backend import NumpyBackend, TorchBackend, select_backend
from veil.offload.compile import OFFLOAD_OPS, OffloadPlan, compile_offload
from veil.offload.enclave import OffloadEnclave
from veil.offload.errors import (
    AcceleratorProtocolError,
    AcceleratorUnavailableError,
    FieldRangeError,
    OffloadModelError,
    SealError,
)
from veil.offload.field import P
from veil.offload.local import OffloadRun, run_offload_local
from veil.offload.runtime import EnclaveRuntime, SimulatedEnclaveRuntime, SimulatedEnclaveWarning

__all__ = [
    "run", "OffloadReport", "OffloadEnclave", "Accelerator", "serve_accelerator", "run_offload_local", "OffloadRun", "compile_offload",
    "OffloadPlan", "OFFLOAD_OPS", "EnclaveRuntime", "SimulatedEnclaveRuntime", "SimulatedEnclaveWarning",
    "select_backend", "NumpyBackend", "TorchBackend", "P", "SealError", "AcceleratorUnavailableError",
    "AcceleratorProtocolError", "FieldRangeError", "OffloadModelError",
]
