"""The public surface is explicit: every name in each public module's __all__ exists and is documented."""

from __future__ import annotations

import importlib

import pytest

import veil

PUBLIC = ["veil", "veil.errors", "veil.graph", "veil.plain", "veil.net", "veil.assets", "veil.options",
          "veil.simulation"]


@pytest.mark.parametrize("modname", PUBLIC)
def test_all_names_exist_and_have_docs(modname):
    mod = importlib.import_module(modname)
    assert mod.__doc__, f"{modname} has no module docstring"
    assert isinstance(mod.__all__, list) and mod.__all__
    for name in mod.__all__:
        obj = getattr(mod, name)  # raises if __all__ lists a missing name
        if callable(obj) and not name.startswith("__"):
            assert obj.__doc__, f"{modname}.{name} has no docstring"


def test_every_error_derives_from_veil_error():
    import veil.errors as E

    for name in E.__all__:
        assert issubclass(getattr(E, name), E.VeilError)


def test_version():
    assert veil.__version__.count(".") == 2


def test_one_simulation_warning_for_every_mode():
    import veil.attested
    import veil.offload
    from veil.simulation import SimulationWarning

    assert veil.attested.SimulationWarning is SimulationWarning
    assert veil.offload.SimulatedEnclaveWarning is SimulationWarning  # the old name, same class
    with pytest.warns(SimulationWarning, match="SIMULATED"):
        veil.offload.SimulatedEnclaveRuntime(hazmat_allow_simulation=True)


def test_every_mode_runs_with_the_same_call_shape():
    """``outputs, report = veil.<mode>.run(model, x, batch_size=..., ...)`` for mpc and offload, both
    compared with the plain executor on the same input."""
    import inspect
    import warnings

    import numpy as np

    import veil.mpc
    import veil.offload
    from veil.assets import load_slice, model_path

    x, _ = load_slice(4)
    ref = veil.run_plain(veil.load_model(model_path("A")), x)["logits"]
    for run, extra in ((veil.mpc.run, {}), (veil.offload.run, {"hazmat_allow_simulation": True})):
        params = inspect.signature(run).parameters
        assert list(params)[:2] == ["model", "x"] and "batch_size" in params and "timeout" in params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, rep = run(str(model_path("A")), x, batch_size=2, **extra)
        assert isinstance(out, np.ndarray) and out.shape == (4, 10)
        assert np.array_equal(out.argmax(1), ref.argmax(1)) and np.abs(out - ref).max() < 1e-2
        assert rep.images == 4 and rep.queries == 2 and rep.agreement == 1.0
        assert rep.online_s > 0 and rep.offline_s >= 0 and rep.rounds > 0 and rep.online_bytes > 0
        assert rep.summary().startswith("4 ") and "agreement 100.00%" in rep.summary()
