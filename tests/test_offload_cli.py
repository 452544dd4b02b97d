"""The ``veil offload`` command group and the package's public surface."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from typer.testing import CliRunner

from veil.cli.offload_cmd import app

runner = CliRunner()


MODULES = ["veil.offload", "veil.offload.field", "veil.offload.backend", "veil.offload.runtime",
           "veil.offload.compile", "veil.offload.material", "veil.offload.enclave", "veil.offload.accelerator",
           "veil.offload.local", "veil.offload.party", "veil.offload.errors", "veil.offload.examples"]


@pytest.mark.parametrize("modname", MODULES)
def test_public_surface_is_explicit_and_documented(modname) -> None:
    mod = importlib.import_module(modname)
    assert mod.__doc__ and isinstance(mod.__all__, list) and mod.__all__
    for name in mod.__all__:
        obj = getattr(mod, name)
        if callable(obj):
            assert obj.__doc__, f"{modname}.{name} has no docstring"


def test_offload_errors_derive_from_veil_error() -> None:
    from veil.errors import VeilError
    from veil.offload import errors

    assert all(issubclass(getattr(errors, n), VeilError) for n in errors.__all__)


def test_plan_command_shows_the_split() -> None:
    res = runner.invoke(app, ["plan", "D"])
    assert res.exit_code == 0, res.output
    assert "3 accelerator layers in 3 rounds" in res.output and "conv2d" in res.output


def test_run_command_agrees_with_plain(tmp_path) -> None:
    x = np.random.default_rng(1).random((5, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = runner.invoke(app, ["run", "D", "--inputs", str(tmp_path / "x.npy"), "--batch", "2", "--backend", "numpy",
                              "--hazmat-simulate"])
    assert res.exit_code == 0, res.output
    assert "SIMULATED" in res.output and "100.00%" in res.output


def test_run_command_refuses_without_the_simulation_opt_in() -> None:
    res = runner.invoke(app, ["run", "D", "--n", "2"])
    assert res.exit_code != 0
    assert "hazmat" in str(res.exception)
