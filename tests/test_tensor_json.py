"""One JSON tensor codec (veil.tensor_json) for the HTTP modes: attested and permute speak the same
format, and malformed tensors are VeilErrors that name the field."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from veil.attested.tensors import INPUT_DTYPES, OUTPUT_DTYPES, WireFormatError, decode_tensor, encode_tensor
from veil.errors import InputError, VeilError
from veil.permute.wire import decode_array, encode_array
from veil.tensor_json import TensorFormatError, TensorLimitError, decode, encode


@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_round_trip_every_dtype(dtype):
    arr = (np.arange(24) % 2).astype(dtype).reshape(2, 3, 4)
    back = decode(encode(arr, OUTPUT_DTYPES), "t", OUTPUT_DTYPES)
    assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)
    assert back.flags.writeable


def test_attested_and_permute_share_the_format():
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    for arr in (x, ids):
        np.testing.assert_array_equal(decode_array(encode_tensor(arr)), arr)  # attested -> permute
        np.testing.assert_array_equal(decode_tensor(encode_array(arr), "t", INPUT_DTYPES), arr)  # permute -> attested
    assert encode_array(x) == encode_tensor(x)  # byte for byte
    # permute casts: float64 travels as float32, uint8 as int64
    assert encode_array(x.astype(np.float64))["dtype"] == "float32"
    assert encode_array(np.ones(2, np.uint8))["dtype"] == "int64"


def test_malformed_tensors_are_veil_errors_naming_the_field():
    enc = encode(np.zeros((2, 3), np.float32), ["float32"])
    cases = [
        ({**enc, "dtype": "complex64"}, "has dtype 'complex64'"),
        ({**enc, "shape": [2]}, "needs 8 bytes"),
        ({**enc, "shape": [-1, 3]}, "shape must be a list"),
        ({**enc, "shape": [True, 3]}, "shape must be a list"),
        ({**enc, "data": "***"}, "not valid base64"),
        ({**enc, "data": 7}, "data must be a base64 string"),
        ([1, 2], "must be an object"),
    ]
    for obj, words in cases:
        with pytest.raises(TensorFormatError, match=words) as e:
            decode(obj, "x", ["float32"])
        assert "'x'" in str(e.value) and isinstance(e.value, InputError | VeilError) and isinstance(e.value, ValueError)
    with pytest.raises(TensorFormatError, match="bool data must be bytes 0 or 1"):
        decode({"dtype": "bool", "shape": [1], "data": base64.b64encode(b"\x07").decode()}, "b", ["bool"])
    with pytest.raises(TensorFormatError, match="at most 4"):
        decode({**enc, "shape": [1, 1, 1, 1, 6]}, "x", ["float32"], max_rank=4)


def test_limits_apply_to_declared_and_real_sizes():
    many = np.zeros(40, np.float32)
    real = {"dtype": "float32", "shape": [4], "data": base64.b64encode(many.tobytes()).decode()}
    with pytest.raises(TensorLimitError, match="carries 40 elements; the limit is 10"):
        decode(real, "x", ["float32"], max_elements=10)  # declares 4, carries 40
    with pytest.raises(TensorLimitError, match="declares 1000000000000 elements"):
        decode({"dtype": "float32", "shape": [10**6, 10**6], "data": ""}, "x", ["float32"], max_elements=10)
    with pytest.raises(OverflowError):  # what the attested server answers with 413
        decode_tensor(real, "x", INPUT_DTYPES, max_elements=10)
    with pytest.raises(InputError):  # permute's error replies keep their class name
        decode_array({"dtype": "object", "shape": [1], "data": ""}, "inputs")
    assert WireFormatError is TensorFormatError
