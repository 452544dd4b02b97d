"""Arrays on the wire between user and cloud: JSON objects ``{"dtype", "shape", "data"}`` with the
raw little-endian bytes in base64 (veil's one JSON tensor codec, :mod:`veil.tensor_json`, shared
with attested). Only float32 and int64 are accepted; shape and byte count must agree; errors are
:class:`~veil.errors.InputError`. No pickle, no object arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from veil import tensor_json
from veil.errors import InputError

__all__ = ["encode_array", "decode_array", "MAX_ELEMENTS"]

_DTYPES = ("float32", "int64")
_CAST = {"f": "float32", "i": "int64", "u": "int64"}  # floats travel as float32, integers as int64
MAX_ELEMENTS = 1 << 26


def encode_array(x: np.ndarray) -> dict[str, Any]:
    try:
        return tensor_json.encode(np.asarray(x), _DTYPES, cast=_CAST, name="array")
    except tensor_json.TensorFormatError as e:
        raise InputError(str(e)) from None  # the class name travels in error replies: keep InputError


def decode_array(obj: Any, what: str = "array") -> np.ndarray:
    try:
        return tensor_json.decode(obj, what, _DTYPES, max_rank=4, max_elements=MAX_ELEMENTS)
    except tensor_json.TensorFormatError as e:
        raise InputError(str(e)) from None
