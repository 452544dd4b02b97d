"""The ``veil offload`` command group and the package's public surface."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

import veil.offload
from veil.cli.offload_cmd import app

runner = CliRunner()


def test_public_surface_is_complete() -> None:
    for name in veil.offload.__all__:
        assert hasattr(veil.offload, name), name


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
