"""The generated protobuf code matches the specs, and the specs are the upstream wire format."""

from __future__ import annotations

import pytest

from shared.proto import event_pb2, execution_pb2
from shared.proto.generate import stale_files


def test_generated_code_is_up_to_date_with_the_specs() -> None:
    pytest.importorskip("grpc_tools")
    assert stale_files() == [], "run `python -m shared.proto.generate` and commit the result"


def _varint(n: int) -> bytes:
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


def _string(field: int, text: str) -> bytes:
    raw = text.encode()
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def test_execution_bytes_from_an_independent_encoder_decode() -> None:
    import struct

    # Hand-encoded per the protobuf wire format, not by the protobuf library.
    payload = (
        _string(1, "AAPL")
        + _string(2, "NASDAQ")
        + _varint(3 << 3 | 5)
        + struct.pack("<f", 189.25)
        + _varint(4 << 3 | 5)
        + struct.pack("<f", 300.0)
        + _varint(5 << 3 | 0)
        + _varint(1764321212345)
        + _string(6, "CA")
    )
    msg = execution_pb2.execution.FromString(payload)
    assert (msg.symbol, msg.market, msg.price, msg.quantity, msg.executionEpoch, msg.stateSymbol) == (
        "AAPL",
        "NASDAQ",
        189.25,
        300.0,
        1764321212345,
        "CA",
    )
    assert msg.SerializeToString() == payload


def test_event_bytes_from_an_independent_encoder_decode() -> None:
    payload = (
        _varint(1 << 3 | 0) + _varint(2) + _string(2, "Lakers vs Celtics") + _string(3, "3-pointer by #23")
    )
    msg = event_pb2.event.FromString(payload)
    assert event_pb2.sport.Name(msg.sport) == "BASKETBALL"
    assert (msg.match_title, msg.data_event) == ("Lakers vs Celtics", "3-pointer by #23")
    assert msg.SerializeToString() == payload
