"""Wire format of tensors: ``{"dtype": str, "shape": [int], "data": base64(C-order little-endian bytes)}``.

The codec is veil's one JSON tensor codec (:mod:`veil.tensor_json`, shared with permute); this
module fixes attested's dtypes. Decoding checks the *real* size: the decoded byte count must equal
``prod(shape) * itemsize``, so a declared shape cannot hide a larger or smaller payload.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil import tensor_json
from veil.tensor_json import TensorFormatError, to_numpy

__all__ = ["INPUT_DTYPES", "OUTPUT_DTYPES", "ORT_TYPE_TO_DTYPE", "WireFormatError", "encode_tensor",
           "decode_tensor", "to_numpy"]

INPUT_DTYPES = ("float32", "float64", "int32", "int64", "uint8", "bool")
OUTPUT_DTYPES = INPUT_DTYPES + ("float16", "int8", "int16", "uint16", "uint32", "uint64")
ORT_TYPE_TO_DTYPE = {f"tensor({'double' if d == 'float64' else 'float' if d == 'float32' else d})": d
                     for d in OUTPUT_DTYPES}


WireFormatError = TensorFormatError  # the shared codec's error (veil.tensor_json); an InputError and a ValueError


def encode_tensor(arr: np.ndarray, allowed: tuple[str, ...] = OUTPUT_DTYPES) -> dict[str, Any]:
    return tensor_json.encode(arr, allowed)


def decode_tensor(obj: Any, name: str, allowed: tuple[str, ...], max_elements: int | None = None) -> np.ndarray:
    """Decode one tensor; :class:`OverflowError` (a ``TensorLimitError``) past ``max_elements``."""
    return tensor_json.decode(obj, name, allowed, max_rank=16, max_elements=max_elements, copy=False)
