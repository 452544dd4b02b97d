"""The public surface of the mpc mode: every module declares ``__all__`` and its names exist."""

import importlib
import pkgutil

import veil.mpc


def test_every_mpc_module_has_a_consistent_all():
    names = [m.name for m in pkgutil.walk_packages(veil.mpc.__path__, "veil.mpc.")]
    assert "veil.mpc.kernels.compare" in names and "veil.mpc.roles.server" in names
    for name in names:
        mod = importlib.import_module(name)
        assert hasattr(mod, "__all__"), name
        for sym in mod.__all__:
            assert hasattr(mod, sym), f"{name}.{sym}"


def test_top_level_api():
    assert {"run", "run_session", "FixedPoint", "Report", "MPC_OPS"} <= set(veil.mpc.__all__)
    assert {"linear", "conv2d", "relu", "maxpool", "avgpool", "global_avgpool", "flatten", "reshape", "add",
            "add_const", "mul_const", "argmax"} <= veil.mpc.MPC_OPS
