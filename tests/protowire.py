"""A hand encoder of the protobuf wire format, independent of the protobuf library:
what the tests use to make upstream bytes exactly as the spec says, right or wrong."""

from __future__ import annotations

import struct

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def f_len(field: int, raw: bytes) -> bytes:
    return tag(field, LEN) + varint(len(raw)) + raw


def f_str(field: int, text: str) -> bytes:
    return f_len(field, text.encode())


def f_varint(field: int, n: int) -> bytes:
    return tag(field, VARINT) + varint(n)


def f_float(field: int, x: float) -> bytes:
    return tag(field, I32) + struct.pack("<f", x)
