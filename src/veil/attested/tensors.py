"""Wire format of tensors: ``{"dtype": str, "shape": [int], "data": base64(C-order little-endian bytes)}``.

Decoding checks the *real* size: the decoded byte count must equal ``prod(shape) * itemsize``,
so a declared shape cannot hide a larger or smaller payload.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

__all__ = ["INPUT_DTYPES", "OUTPUT_DTYPES", "ORT_TYPE_TO_DTYPE", "WireFormatError", "encode_tensor",
           "decode_tensor", "to_numpy"]

INPUT_DTYPES = ("float32", "float64", "int32", "int64", "uint8", "bool")
OUTPUT_DTYPES = INPUT_DTYPES + ("float16", "int8", "int16", "uint16", "uint32", "uint64")
ORT_TYPE_TO_DTYPE = {f"tensor({'double' if d == 'float64' else 'float' if d == 'float32' else d})": d
                     for d in OUTPUT_DTYPES}


class WireFormatError(ValueError):
    """A tensor payload is malformed; the message names the field."""


def to_numpy(value: Any) -> np.ndarray:
    """numpy arrays as they are; torch tensors detached to CPU; Python scalars and lists via numpy."""
    if isinstance(value, np.ndarray):
        return value
    mod = type(value).__module__
    if mod.startswith("torch"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def encode_tensor(arr: np.ndarray, allowed: tuple[str, ...] = OUTPUT_DTYPES) -> dict[str, Any]:
    dtype = np.dtype(arr.dtype)
    if dtype.name not in allowed:
        raise WireFormatError(f"dtype {dtype.name} is not supported; supported: {', '.join(allowed)}")
    data = np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
    return {"dtype": dtype.name, "shape": [int(d) for d in arr.shape], "data": base64.b64encode(data.tobytes()).decode()}


def decode_tensor(obj: Any, name: str, allowed: tuple[str, ...], max_elements: int | None = None) -> np.ndarray:
    if not isinstance(obj, dict):
        raise WireFormatError(f"tensor {name!r} must be an object with dtype, shape and data")
    dtype_name, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype_name not in allowed:
        raise WireFormatError(f"tensor {name!r} has dtype {dtype_name!r}; supported: {', '.join(allowed)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape) or len(shape) > 16:
        raise WireFormatError(f"tensor {name!r}: shape must be a list of at most 16 non-negative integers")
    if not isinstance(data, str):
        raise WireFormatError(f"tensor {name!r}: data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WireFormatError(f"tensor {name!r}: data is not valid base64") from None
    dtype = np.dtype(dtype_name).newbyteorder("<") if np.dtype(dtype_name).itemsize > 1 else np.dtype(dtype_name)
    real_elements = len(raw) // dtype.itemsize
    if max_elements is not None and real_elements > max_elements:
        raise OverflowError(f"tensor {name!r} carries {real_elements} elements; the limit is {max_elements}")
    declared = math.prod(shape)
    if len(raw) != declared * dtype.itemsize:
        raise WireFormatError(f"tensor {name!r}: shape {tuple(shape)} needs {declared * dtype.itemsize} bytes of "
                              f"{dtype_name}, but {len(raw)} bytes were sent")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if dtype_name == "bool" and arr.size and arr.view(np.uint8).max() > 1:
        raise WireFormatError(f"tensor {name!r}: bool data must be bytes 0 or 1")
    return arr.astype(dtype.newbyteorder("="), copy=False)
