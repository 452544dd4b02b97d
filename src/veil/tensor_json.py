"""Tensors in JSON over HTTP, one codec for every mode that speaks HTTP (permute, attested).

A tensor is ``{"dtype": str, "shape": [int, ...], "data": base64(C-order little-endian bytes)}``.
Each caller states the dtypes it accepts (and, for encoding, how other dtypes are cast), the
highest rank and the most elements. Decoding checks the *real* size: the decoded byte count must
equal ``prod(shape) * itemsize``, so a declared shape cannot hide a larger or smaller payload, and
the element limit applies to the declared and to the real count. No pickle, no object arrays.

Errors: :class:`TensorFormatError` (an :class:`~veil.errors.InputError`, and a ``ValueError``) for a
malformed tensor, :class:`TensorLimitError` (also an ``OverflowError``) when it is too large; each
message names the tensor and the field.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from veil.errors import InputError

__all__ = ["TensorFormatError", "TensorLimitError", "encode", "decode", "to_numpy"]


class TensorFormatError(InputError, ValueError):
    """A tensor payload is malformed (dtype, shape, data or their sizes); the message names the field."""


class TensorLimitError(TensorFormatError, OverflowError):
    """A tensor holds more elements than the receiver accepts."""


def _wire_dtype(name: str) -> np.dtype[Any]:
    dt = np.dtype(name)
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


def to_numpy(value: Any) -> np.ndarray:
    """numpy arrays as they are; torch tensors detached to CPU; Python scalars and lists via numpy."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def encode(arr: Any, allowed: Collection[str], cast: Mapping[str, str] | None = None,
           name: str = "tensor") -> dict[str, Any]:
    """``arr`` as a JSON-ready dict. ``cast`` maps a numpy dtype kind (``"f"``, ``"i"``, ``"u"``,
    ``"b"``) to the dtype it is sent as; without it the dtype must be one of ``allowed``."""
    a = to_numpy(arr)
    dtype_name = cast.get(a.dtype.kind, a.dtype.name) if cast is not None else a.dtype.name
    if dtype_name not in allowed:
        raise TensorFormatError(f"{name}: dtype {a.dtype.name} cannot be sent; supported: {', '.join(allowed)}")
    data = np.ascontiguousarray(a, dtype=_wire_dtype(dtype_name))
    return {"dtype": dtype_name, "shape": [int(d) for d in a.shape],
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def decode(obj: Any, name: str, allowed: Collection[str], *, max_rank: int = 16, max_elements: int | None = None,
           copy: bool = True) -> np.ndarray:
    """The array a JSON tensor carries, in native byte order (read-only unless ``copy``)."""
    if not isinstance(obj, dict):
        raise TensorFormatError(f"tensor {name!r} must be an object with dtype, shape and data")
    dtype_name, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype_name not in allowed:
        raise TensorFormatError(f"tensor {name!r} has dtype {dtype_name!r}; supported: {', '.join(allowed)}")
    if not isinstance(shape, list) or len(shape) > max_rank or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TensorFormatError(f"tensor {name!r}: shape must be a list of at most {max_rank} non-negative integers")
    declared = math.prod(shape)
    if max_elements is not None and declared > max_elements:
        raise TensorLimitError(f"tensor {name!r} declares {declared} elements; the limit is {max_elements}")
    if not isinstance(data, str):
        raise TensorFormatError(f"tensor {name!r}: data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise TensorFormatError(f"tensor {name!r}: data is not valid base64") from None
    dtype = _wire_dtype(str(dtype_name))
    real = len(raw) // dtype.itemsize
    if max_elements is not None and real > max_elements:
        raise TensorLimitError(f"tensor {name!r} carries {real} elements; the limit is {max_elements}")
    if len(raw) != declared * dtype.itemsize:
        raise TensorFormatError(f"tensor {name!r}: shape {tuple(shape)} needs {declared * dtype.itemsize} bytes of "
                                f"{dtype_name}, but {len(raw)} bytes were sent")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if dtype_name == "bool" and arr.size and arr.view(np.uint8).max() > 1:
        raise TensorFormatError(f"tensor {name!r}: bool data must be bytes 0 or 1")
    return arr.astype(dtype.newbyteorder("="), copy=copy)
