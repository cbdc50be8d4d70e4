"""shared/codec.py: payload -> entry fields -> typed message, and the text formats."""

from __future__ import annotations

import base64
import math
import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import codec
from shared.codec import BadPayload
from shared.feeds import EXECUTION, SPORT_EVENT
from shared.proto import event_pb2, execution_pb2


def _execution(**overrides: object) -> execution_pb2.execution:
    values: dict[str, object] = dict(
        symbol="AAPL",
        market="NASDAQ",
        price=189.25,
        quantity=0.1,
        executionEpoch=1764321212345,
        stateSymbol="CA",
    )
    values.update(overrides)
    return execution_pb2.execution(**values)  # type: ignore[arg-type]


def _len_field(number: int, raw: bytes) -> bytes:
    assert len(raw) < 128 and number < 16
    return bytes([number << 3 | 2, len(raw)]) + raw


def test_decode_gives_fields_by_proto_name_in_declaration_order() -> None:
    fields = codec.decode(EXECUTION, _execution().SerializeToString())
    assert fields == {
        "symbol": "AAPL",
        "market": "NASDAQ",
        "price": "189.25",
        "quantity": "0.1",
        "executionEpoch": "1764321212345",
        "stateSymbol": "CA",
    }
    assert list(fields) == [f.name for f in EXECUTION.message.DESCRIPTOR.fields]


def test_enum_is_written_by_name() -> None:
    payload = event_pb2.event(
        sport=event_pb2.NASCAR, match_title="Daytona", data_event="lap 3"
    ).SerializeToString()
    assert codec.decode(SPORT_EVENT, payload)["sport"] == "NASCAR"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\xff\xff\xff", "not a valid protobuf `execution` message"),
        (_execution().SerializeToString()[:-3], "not a valid protobuf"),
        (b"", "missing required field(s): symbol, market, price, quantity, executionEpoch, stateSymbol"),
        (_execution().SerializeToString() + _len_field(1, b"\xc3\x28"), "field symbol is not valid UTF-8"),
        (_execution(market="NAS\x00DAQ").SerializeToString(), "field market contains a NUL character"),
        (_execution(price=math.nan).SerializeToString(), "field price is not a finite number"),
        (_execution(quantity=-math.inf).SerializeToString(), "field quantity is not a finite number"),
    ],
    ids=["garbage", "truncated", "empty", "utf8", "nul", "nan", "inf"],
)
def test_each_bad_payload_is_named(payload: bytes, error: str) -> None:
    with pytest.raises(BadPayload) as raised:
        codec.decode(EXECUTION, payload)
    assert error in str(raised.value)


def test_a_partly_filled_message_names_exactly_the_missing_fields() -> None:
    partial = execution_pb2.execution(symbol="X", price=1.0, stateSymbol="CA").SerializePartialToString()
    with pytest.raises(BadPayload, match=r"missing required field\(s\): market, quantity, executionEpoch$"):
        codec.decode(EXECUTION, partial)


def _f32(value: float) -> float:
    try:
        return float(struct.unpack("<f", struct.pack("<f", value))[0])
    except OverflowError:  # beyond the largest float32 (by more than half a unit)
        return math.inf


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_text_reads_back_as_the_same_float32_and_is_shortest(value: float) -> None:
    text = codec.float32_text(value)
    assert _f32(float(text)) == value
    significant = len(text.lstrip("-").split("e")[0].replace(".", "").strip("0")) or 1
    for fewer in range(1, significant):  # no text with fewer significant digits reads back the same
        assert _f32(float(f"{value:.{fewer}g}")) != value, (text, fewer)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1, "0.1"),
        (189.25, "189.25"),
        (300.0, "300"),
        (3.4028234663852886e38, "3.4028235e+38"),
        (1e-45, "1e-45"),
    ],
)
def test_float32_text_examples(value: float, text: str) -> None:
    assert codec.float32_text(_f32(value)) == text


def test_times_are_utc_iso_with_milliseconds() -> None:
    when = datetime(2026, 11, 28, 9, 13, 32, 123999, tzinfo=UTC)
    assert codec.iso_ms(when) == "2026-11-28T09:13:32.123Z"
    ns = int(when.timestamp()) * 1_000_000_000 + 123_999_999
    assert codec.iso_ms_from_ns(ns) == "2026-11-28T09:13:32.123Z"
    assert codec.parse_iso("2026-11-28T09:13:32.123Z") == datetime(
        2026, 11, 28, 9, 13, 32, 123000, tzinfo=UTC
    )


def test_entry_fields_and_typed_message_round_trip() -> None:
    decoded = codec.decode(EXECUTION, _execution().SerializeToString())
    flat = codec.entry_fields(
        "1764321200000.7", decoded, "2026-11-28T09:13:32.123Z", "2026-11-28T09:13:32.125Z"
    )
    assert flat[:2] == ["message_id", "1764321200000.7"]
    assert flat[-4:] == ["broker_time", "2026-11-28T09:13:32.123Z", "ingest_time", "2026-11-28T09:13:32.125Z"]
    entry = {"seq": "7", **dict(zip(flat[::2], flat[1::2], strict=True))}
    typed = codec.typed_message(EXECUTION, entry)
    assert typed == {
        "symbol": "AAPL",
        "market": "NASDAQ",
        "price": 189.25,
        "quantity": 0.1,
        "executionEpoch": 1764321212345,
        "stateSymbol": "CA",
        "message_id": "1764321200000.7",
        "seq": 7,
        "broker_time": "2026-11-28T09:13:32.123Z",
        "ingest_time": "2026-11-28T09:13:32.125Z",
    }


def test_str_entry_and_feed_of() -> None:
    assert codec.str_entry({b"seq": b"1", "message_id": "1.1"}) == {"seq": "1", "message_id": "1.1"}
    assert codec.feed_of("execution") is EXECUTION
    with pytest.raises(KeyError, match="unknown feed 'trades'; known feeds: execution, sport_event"):
        codec.feed_of("trades")


@given(st.binary(max_size=200), st.text(min_size=1, max_size=80))
def test_a_malformed_entry_keeps_the_bytes_and_the_error_in_a_fixed_order(payload: bytes, error: str) -> None:
    fields = codec.malformed_fields("1795862595094.7", error, payload, "t-broker", "t-ingest")
    entry = dict(zip(fields[::2], fields[1::2], strict=True))
    assert fields[::2] == ["message_id", "error", "payload_b64", "broker_time", "ingest_time"]
    assert base64.b64decode(entry["payload_b64"]) == payload and entry["error"] == error
    assert codec.is_malformed({"seq": "7", **entry})
    good = codec.entry_fields("1795862595094.8", {"symbol": "A"}, "t-broker", "t-ingest")
    assert not codec.is_malformed(dict(zip(good[::2], good[1::2], strict=True)))


def test_text_is_the_one_bytes_to_text_helper() -> None:
    assert codec.text(b"1-0") == codec.text("1-0") == "1-0"
    assert codec.text(7) == "7"
    with pytest.raises(TypeError):
        codec.text(None)  # never the text "None"
