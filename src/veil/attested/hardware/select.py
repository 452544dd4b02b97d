"""Which trusted platform ``veil attested serve`` runs on (``--platform``).

* ``auto`` (default): the machine's configfs-tsm provider (SEV-SNP or TDX); without one, the
  simulation if (and only if) ``--hazmat-allow-simulation`` was given; otherwise an error.
* ``sev-snp`` / ``tdx``: that hardware, through configfs-tsm; an error if the machine has another
  provider or none.
* ``simulated``: the simulation; needs ``--hazmat-allow-simulation``.
"""

from __future__ import annotations

from veil.attested.hardware.configfs_tsm import ConfigfsTsm, detect_platform
from veil.errors import DeploymentError

__all__ = ["PLATFORM_CHOICES", "choose_platform"]

PLATFORM_CHOICES = ("auto", "simulated", "sev-snp", "tdx")


def choose_platform(choice: str, *, hazmat_allow_simulation: bool, tsm: ConfigfsTsm | None = None) -> str:
    """``"simulated"``, ``"sev-snp"`` or ``"tdx"`` for ``choice`` on this machine (see module doc)."""
    if choice not in PLATFORM_CHOICES:
        raise DeploymentError(f"--platform {choice!r} is not one of {', '.join(PLATFORM_CHOICES)}")
    if choice == "simulated":
        if not hazmat_allow_simulation:
            raise DeploymentError("--platform simulated runs a SIMULATED enclave: it also needs "
                                  "--hazmat-allow-simulation (development only)")
        return "simulated"
    tsm = tsm or ConfigfsTsm()
    if choice in ("sev-snp", "tdx"):
        return choice  # ConfigfsTsmPlatform(expect=choice) checks the provider
    detected = detect_platform(tsm)
    if detected is not None:
        return detected
    if hazmat_allow_simulation:
        return "simulated"
    raise DeploymentError(
        f"no hardware TEE found (no SEV-SNP or TDX provider behind configfs-tsm at {tsm.root}); on a confidential "
        "VM check that configfs is mounted (Linux 6.7+), or start with --hazmat-allow-simulation to run a "
        "SIMULATED enclave (development only)")
