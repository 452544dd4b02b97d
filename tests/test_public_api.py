"""The public surface is explicit: every name in each public module's __all__ exists and is documented."""

from __future__ import annotations

import importlib

import pytest

import veil

PUBLIC = ["veil", "veil.errors", "veil.graph", "veil.plain", "veil.net", "veil.assets"]


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
