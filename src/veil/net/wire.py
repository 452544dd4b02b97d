"""Message encoding for channels: arrays, bytes and small JSON values, without pickle.

A message is one of: ``np.ndarray``, ``bytes``, ``None``/``bool``/``int``/``float``/``str``, or a
list/tuple/dict (string keys) of messages. Arrays travel as raw buffers with a small header, so a
large array costs its ``nbytes`` plus a few dozen bytes. Decoding never executes code.

An *abort notice* (:func:`encode_abort`) is a frame of its own, outside the message grammar: a
party that stops sends it to its peers so that they stop at once and name the party at fault
(:class:`~veil.errors.PeerAbortedError`) instead of blaming the messenger.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from veil.errors import ProtocolError

__all__ = ["encode", "decode", "encode_abort", "decode_abort", "is_abort", "ABORT_TAG"]

ABORT_TAG = b"X"
_MAX_REASON = 600

_ALLOWED_DTYPES = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                   "float16", "float32", "float64"}


def _enc(obj: Any, out: list[bytes]) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in _ALLOWED_DTYPES:
            raise ProtocolError(f"cannot send arrays of dtype {obj.dtype}")
        head = json.dumps([obj.dtype.name, list(obj.shape)]).encode()
        data = np.ascontiguousarray(obj).tobytes()
        out += [b"A", struct.pack("<IQ", len(head), len(data)), head, data]
    elif isinstance(obj, bytes | bytearray | memoryview):
        b = bytes(obj)
        out += [b"B", struct.pack("<Q", len(b)), b]
    elif isinstance(obj, list | tuple):
        out += [b"L", struct.pack("<I", len(obj))]
        for x in obj:
            _enc(x, out)
    elif isinstance(obj, dict):
        out += [b"D", struct.pack("<I", len(obj))]
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ProtocolError("dict keys in messages must be strings")
            _enc(k, out)
            _enc(v, out)
    elif obj is None or isinstance(obj, bool | int | float | str | np.integer | np.floating):
        if isinstance(obj, np.integer | np.floating):
            obj = obj.item()
        j = json.dumps(obj).encode()
        out += [b"J", struct.pack("<I", len(j)), j]
    else:
        raise ProtocolError(f"cannot send a {type(obj).__name__}; send arrays, bytes, numbers, strings, lists or dicts")


def encode(obj: Any) -> bytes:
    parts: list[bytes] = []
    _enc(obj, parts)
    return b"".join(parts)


def _dec(buf: memoryview, i: int) -> tuple[Any, int]:
    tag = bytes(buf[i : i + 1])
    i += 1
    if tag == b"A":
        hl, dl = struct.unpack_from("<IQ", buf, i)
        i += 12
        dtype, shape = json.loads(bytes(buf[i : i + hl]))
        i += hl
        if dtype not in _ALLOWED_DTYPES:
            raise ProtocolError(f"received an array of disallowed dtype {dtype!r}")
        arr = np.frombuffer(bytes(buf[i : i + dl]), dtype=dtype)
        return arr.reshape(shape), i + dl
    if tag == b"B":
        (n,) = struct.unpack_from("<Q", buf, i)
        i += 8
        return bytes(buf[i : i + n]), i + n
    if tag == b"J":
        (n,) = struct.unpack_from("<I", buf, i)
        i += 4
        return json.loads(bytes(buf[i : i + n])), i + n
    if tag in (b"L", b"D"):
        (n,) = struct.unpack_from("<I", buf, i)
        i += 4
        if tag == b"L":
            items = []
            for _ in range(n):
                x, i = _dec(buf, i)
                items.append(x)
            return items, i
        d = {}
        for _ in range(n):
            k, i = _dec(buf, i)
            v, i = _dec(buf, i)
            d[k] = v
        return d, i
    raise ProtocolError(f"malformed message (unknown tag {tag!r})")


def decode(data: bytes) -> Any:
    try:
        obj, end = _dec(memoryview(data), 0)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"malformed message ({type(e).__name__})") from None
    if end != len(data):
        raise ProtocolError("malformed message (trailing bytes)")
    return obj


def encode_abort(reason: str, culprit: str | None = None) -> bytes:
    """An abort notice: why the sender stops and, when it is a third party's fault, whom to blame."""
    return ABORT_TAG + json.dumps({"reason": str(reason)[:_MAX_REASON], "culprit": culprit}).encode()


def is_abort(data: bytes) -> bool:
    return data[:1] == ABORT_TAG


def decode_abort(data: bytes) -> tuple[str, str | None]:
    """(reason, culprit) of an abort notice; a malformed one still reads as an abort."""
    try:
        obj = json.loads(bytes(data[1:]))
        culprit = obj.get("culprit")
        return str(obj.get("reason", "no reason given"))[:_MAX_REASON], (str(culprit) if culprit else None)
    except (ValueError, AttributeError):
        return "a malformed abort notice", None
