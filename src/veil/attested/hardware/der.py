"""A minimal DER reader for the vendor extensions of AMD VCEK and Intel PCK certificates.

``cryptography`` parses the certificates; it returns these private extensions as raw DER. They
are small SEQUENCEs of (OID, value) pairs and INTEGERs, read here with strict length checks.
"""

from __future__ import annotations

from veil.attested.errors import EvidenceFormatError

__all__ = ["Tlv", "read_tlv", "read_all", "read_one", "der_int", "der_oid"]

INTEGER, OCTET_STRING, OID, ENUMERATED, SEQUENCE, BOOLEAN, IA5STRING = 0x02, 0x04, 0x06, 0x0A, 0x30, 0x01, 0x16


class Tlv:
    __slots__ = ("tag", "value")

    def __init__(self, tag: int, value: bytes):
        self.tag, self.value = tag, value

    def children(self) -> list[Tlv]:
        return read_all(self.value)


def read_tlv(data: bytes, pos: int = 0) -> tuple[Tlv, int]:
    """One element at ``pos``: (element, position after it)."""
    if pos + 2 > len(data):
        raise EvidenceFormatError("DER element is truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise EvidenceFormatError("DER length is malformed")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise EvidenceFormatError("DER element is longer than its container")
    return Tlv(tag, data[pos:pos + length]), pos + length


def read_all(data: bytes) -> list[Tlv]:
    out, pos = [], 0
    while pos < len(data):
        tlv, pos = read_tlv(data, pos)
        out.append(tlv)
    return out


def read_one(data: bytes) -> Tlv:
    tlv, end = read_tlv(data)
    if end != len(data):
        raise EvidenceFormatError("DER value has trailing bytes")
    return tlv


def der_int(tlv: Tlv) -> int:
    if tlv.tag not in (INTEGER, ENUMERATED) or not tlv.value:
        raise EvidenceFormatError("DER value is not an INTEGER")
    return int.from_bytes(tlv.value, "big", signed=True)


def der_oid(tlv: Tlv) -> str:
    if tlv.tag != OID or not tlv.value:
        raise EvidenceFormatError("DER value is not an OBJECT IDENTIFIER")
    v = tlv.value
    parts, acc = [], 0
    for b in v:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(acc)
            acc = 0
    first = min(parts[0] // 40, 2)
    return ".".join(str(x) for x in [first, parts[0] - 40 * first, *parts[1:]])
