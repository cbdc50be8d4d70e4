"""The generated protobuf code matches the specs, and the specs are the upstream wire format."""

from __future__ import annotations

import pytest

from shared.proto import event_pb2, execution_pb2
from shared.proto.generate import stale_files
from tests.protowire import f_str, varint


def test_generated_code_is_up_to_date_with_the_specs() -> None:
    pytest.importorskip("grpc_tools")
    assert stale_files() == [], "run `python -m shared.proto.generate` and commit the result"


def test_execution_bytes_from_an_independent_encoder_decode() -> None:
    import struct

    # Hand-encoded per the protobuf wire format, not by the protobuf library.
    payload = (
        f_str(1, "AAPL")
        + f_str(2, "NASDAQ")
        + varint(3 << 3 | 5)
        + struct.pack("<f", 189.25)
        + varint(4 << 3 | 5)
        + struct.pack("<f", 300.0)
        + varint(5 << 3 | 0)
        + varint(1764321212345)
        + f_str(6, "CA")
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
        varint(1 << 3 | 0) + varint(2) + f_str(2, "Lakers vs Celtics") + f_str(3, "3-pointer by #23")
    )
    msg = event_pb2.event.FromString(payload)
    assert event_pb2.sport.Name(msg.sport) == "BASKETBALL"
    assert (msg.match_title, msg.data_event) == ("Lakers vs Celtics", "3-pointer by #23")
    assert msg.SerializeToString() == payload
