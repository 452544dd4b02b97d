"""mpc mode: secret-shared inference between two non-colluding servers and a dealer.

Layers, bottom up: :mod:`fixedpoint`, :mod:`ring`, :mod:`prg`, :mod:`sharing`, :mod:`material` and
:mod:`dealer` (offline material), :mod:`kernels`, :mod:`program` (graph -> server program),
:mod:`roles` (the five parties), :mod:`api` (in-process run), :mod:`party` (deployments),
:mod:`demo`. See docs/mpc.md for the protocol, the threat model and measured figures.
"""

from veil.mpc import api
from veil.mpc.api import run, run_session
from veil.mpc.fixedpoint import FixedPoint
from veil.mpc.generate import generate, generate_session
from veil.mpc.program import MPC_OPS, compile_program
from veil.mpc.report import Report

__all__ = ["api", "run", "run_session", "generate", "generate_session", "FixedPoint", "Report", "MPC_OPS",
           "compile_program"]
