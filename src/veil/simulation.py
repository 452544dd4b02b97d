"""Simulated trust, stated once for every mode: one warning class and one opt-in name.

veil runs on machines without SGX, SEV-SNP or TDX; offload's enclave and attested's platform are
then *simulated* in software and protect nothing from the host. Using a simulation needs an
explicit opt-in, spelled the same in every mode: ``hazmat_allow_simulation=True`` in Python,
``--hazmat-allow-simulation`` on the command line, ``hazmat_allow_simulation = true`` in a
deployment's ``[options]``. Every simulation emits :class:`SimulationWarning` when it starts.
"""

from __future__ import annotations

__all__ = ["SimulationWarning", "OPT_IN", "CLI_OPT_IN", "OPTION_OPT_IN"]

OPT_IN = "hazmat_allow_simulation"
"""The Python keyword (and deployment option) that allows a simulated enclave or attestation."""

CLI_OPT_IN = "--hazmat-allow-simulation"
"""The command-line flag that allows a simulated enclave or attestation (every mode)."""

OPTION_OPT_IN = OPT_IN
"""The deployment file ``[options]`` key that allows a simulated enclave."""


class SimulationWarning(UserWarning):
    """A simulated enclave or attestation is in use: it gives no hardware protection (every mode)."""
