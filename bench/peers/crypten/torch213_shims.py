"""What CrypTen 0.4.1 needs to import and run under torch 2.13 (import this module before `crypten`).

CrypTen 0.4.1 was released against torch 1.x/2.0. Found by running the benchmarks under torch 2.13:

1. `crypten.nn.onnx_converter` imports `torch.onnx._internal.registration.registry` (the TorchScript
   exporter's symbolic registry, removed in torch 2.9). CrypTen uses it only in `from_pytorch`, to
   re-register its own symbolic functions before re-exporting; the benchmarks load ONNX files with
   `crypten.nn.from_onnx`, which never touches it. The shim provides an empty module so the import
   succeeds; `from_pytorch` is not supported under these shims (it raises if the registry is used).
2. ONNX initializers come back as read-only numpy arrays, and `torch.from_numpy` warns on each one;
   the warning is silenced (CrypTen copies them when it encodes them).
3. Not torch's doing, but met on the same path: CrypTen's tuple cache (`crypten.trace` /
   `crypten.fill_cache`, used to split offline from online time) keys requests by
   `frozenset(kwargs.items())`, which fails for convolutions (stride and padding arrive as lists).
   `TupleProvider.fill_cache` and its cache lookup are replaced by versions that key on a hashable form
   of the arguments (lists become tuples); the tuples generated and their order are unchanged.
"""

from __future__ import annotations

import sys
import types
import warnings

import torch  # noqa: F401  (torch must be imported first: the shim adds a submodule under torch.onnx)

__all__ = ["apply"]


class _NoRegistry:
    def __getattr__(self, name: str) -> object:
        raise RuntimeError("crypten.nn.from_pytorch is not available under torch 2.13 (bench/peers shims): "
                           "export to ONNX and use crypten.nn.from_onnx")


def _key(func_name: str, args: tuple, kwargs: dict) -> tuple:
    def h(v: object) -> object:
        if isinstance(v, list | tuple):
            return tuple(h(e) for e in v)
        if isinstance(v, dict):
            return tuple(sorted((k, h(e)) for k, e in v.items()))
        return v

    return (func_name, h(args), h(kwargs))


def _patch_tuple_cache() -> None:
    from crypten.mpc.provider.provider import TupleProvider

    traceable = TupleProvider.TRACEABLE_FUNCTIONS

    def fill_cache(self) -> None:
        for func_name, args, kwargs in self.request_cache:
            result = object.__getattribute__(self, func_name)(*args, **kwargs)
            self.tuple_cache.setdefault(_key(func_name, args, kwargs), []).append(result)

    def getattribute(self, func_name: str):  # type: ignore[no-untyped-def]
        if func_name not in traceable:
            return object.__getattribute__(self, func_name)
        func = object.__getattribute__(self, func_name)
        if self.tracing:
            def traced(*args, **kwargs):  # type: ignore[no-untyped-def]
                self.request_cache.append((func_name, args, kwargs))
                return func(*args, **kwargs)
            return traced
        if len(self.tuple_cache) == 0:
            return func

        def cached(*args, **kwargs):  # type: ignore[no-untyped-def]
            hit = self.tuple_cache.get(_key(func_name, args, kwargs))
            if hit:
                return hit.pop()
            self.cache_misses = getattr(self, "cache_misses", 0) + 1
            return func(*args, **kwargs)
        return cached

    TupleProvider.fill_cache = fill_cache  # type: ignore[method-assign]
    TupleProvider.__getattribute__ = getattribute  # type: ignore[method-assign]


def apply() -> None:
    name = "torch.onnx._internal.registration"
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.registry = _NoRegistry()  # type: ignore[attr-defined]
        sys.modules[name] = module
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    _patch_tuple_cache()


apply()
