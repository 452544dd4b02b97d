"""The permute mode's public surface: every module declares ``__all__`` and exports what it names;
its errors sit in veil's exception tree."""

from __future__ import annotations

import importlib
import pkgutil

import veil.permute
from veil.errors import InputError, IntegrityError, ModelError, VeilError
from veil.permute import errors


def test_every_module_has_a_complete_all():
    for info in pkgutil.iter_modules(veil.permute.__path__):
        mod = importlib.import_module(f"veil.permute.{info.name}")
        assert hasattr(mod, "__all__"), info.name
        for name in mod.__all__:
            assert hasattr(mod, name), f"{info.name}.{name}"


def test_error_tree():
    assert issubclass(errors.KeyBundleError, IntegrityError)
    assert issubclass(errors.UnsupportedFamilyError, ModelError)
    assert issubclass(errors.SequenceTooLongError, InputError)
    assert issubclass(errors.CloudError, VeilError)
