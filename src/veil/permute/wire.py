"""Arrays on the wire between user and cloud: JSON objects ``{"dtype", "shape", "data"}`` with the
raw little-endian bytes in base64. Only float32 and int64 are accepted; shape and byte count must
agree. No pickle, no object arrays."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from veil.errors import InputError

__all__ = ["encode_array", "decode_array", "MAX_ELEMENTS"]

_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
MAX_ELEMENTS = 1 << 26


def encode_array(x: np.ndarray) -> dict[str, Any]:
    arr = np.asarray(x)
    name = {"f": "float32", "i": "int64", "u": "int64"}.get(arr.dtype.kind)
    if name is None:
        raise InputError(f"cannot send an array of dtype {arr.dtype}; expected floats or integers")
    arr = np.ascontiguousarray(arr, dtype=_DTYPES[name])
    return {"dtype": name, "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_array(obj: Any, what: str = "array") -> np.ndarray:
    if not isinstance(obj, dict):
        raise InputError(f"{what}: expected an object with dtype, shape and data")
    dtype = _DTYPES.get(obj.get("dtype"))  # type: ignore[arg-type]
    shape = obj.get("shape")
    if dtype is None:
        raise InputError(f"{what}: dtype {obj.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape) or len(shape) > 4:
        raise InputError(f"{what}: shape must be a list of at most 4 non-negative integers")
    count = int(np.prod(shape)) if shape else 1
    if count > MAX_ELEMENTS:
        raise InputError(f"{what}: {count} elements is more than the {MAX_ELEMENTS} accepted")
    try:
        raw = base64.b64decode(obj.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InputError(f"{what}: data is not valid base64") from None
    if len(raw) != count * dtype.itemsize:
        raise InputError(f"{what}: {len(raw)} bytes do not match shape {tuple(shape)} of {obj['dtype']}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
