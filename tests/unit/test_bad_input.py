"""Bad input on the NATS side: whatever bytes arrive, `shared.codec.decode` either returns
the message's entry fields or raises BadPayload with a message naming the problem;
nothing else escapes it. Valid messages round-trip decode -> typed_message.

The payloads are built with a hand encoder of the protobuf wire format (not the
protobuf library), so the tests also cover encodings the library would never emit:
wrong wire types, overlong lengths, invalid UTF-8, NUL, NaN/inf, unknown enum numbers.

`FANOUT_FUZZ_EXAMPLES=200000 pytest tests/unit/test_bad_input.py -k fuzz` runs the
long fuzz of the decoder; in CI the same test runs with a few hundred examples.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared import codec
from shared.codec import BadPayload
from shared.feeds import EXECUTION, FEEDS, SPORT_EVENT, Feed
from shared.proto import event_pb2
from tests.protowire import I32, I64, LEN, VARINT, f_float, f_len, f_str, f_varint, tag

# A field's number, its wire type, and how to encode a valid value of it.
EXECUTION_FIELDS: dict[str, tuple[int, int]] = {
    "symbol": (1, LEN),
    "market": (2, LEN),
    "price": (3, I32),
    "quantity": (4, I32),
    "executionEpoch": (5, VARINT),
    "stateSymbol": (6, LEN),
}
EVENT_FIELDS: dict[str, tuple[int, int]] = {
    "sport": (1, VARINT),
    "match_title": (2, LEN),
    "data_event": (3, LEN),
}
WIRE_FIELDS = {EXECUTION.name: EXECUTION_FIELDS, SPORT_EVENT.name: EVENT_FIELDS}

# Text that is valid in a string field: any Unicode scalar but NUL (surrogates cannot
# be encoded as UTF-8 at all).
clean_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
sport_numbers = st.sampled_from([v.number for v in event_pb2.sport.DESCRIPTOR.values])


@st.composite
def executions(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    values: dict[str, Any] = {
        "symbol": draw(clean_text),
        "market": draw(clean_text),
        "price": draw(finite_f32),
        "quantity": draw(finite_f32),
        "executionEpoch": draw(st.integers(-(2**63), 2**63 - 1)),
        "stateSymbol": draw(clean_text),
    }
    payload = (
        f_str(1, values["symbol"])
        + f_str(2, values["market"])
        + f_float(3, values["price"])
        + f_float(4, values["quantity"])
        + f_varint(5, values["executionEpoch"])
        + f_str(6, values["stateSymbol"])
    )
    return payload, values


@st.composite
def events(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    number = draw(sport_numbers)
    values: dict[str, Any] = {
        "sport": event_pb2.sport.Name(number),
        "match_title": draw(clean_text),
        "data_event": draw(clean_text),
    }
    payload = f_varint(1, number) + f_str(2, values["match_title"]) + f_str(3, values["data_event"])
    return payload, values


VALID: dict[str, Callable[[], st.SearchStrategy[tuple[bytes, dict[str, Any]]]]] = {
    EXECUTION.name: executions,
    SPORT_EVENT.name: events,
}
feeds = st.sampled_from(list(FEEDS.values()))


def assert_rejected_or_valid(feed: Feed, payload: bytes) -> dict[str, str] | None:
    """decode() either gives a complete entry or raises BadPayload with a message."""
    try:
        fields = codec.decode(feed, payload)
    except BadPayload as exc:
        assert str(exc), "a BadPayload must say what is wrong"
        return None
    assert list(fields) == [f.name for f in feed.message.DESCRIPTOR.fields]
    assert all(isinstance(v, str) and "\x00" not in v for v in fields.values())
    # Whatever decodes also converts to the typed message without raising.
    codec.typed_message(feed, _entry(fields))
    return fields


def _entry(fields: dict[str, str]) -> dict[str, str]:
    return {
        "seq": "1",
        "message_id": "1764321212345.1",
        **fields,
        "broker_time": "2026-11-28T09:13:32.123Z",
        "ingest_time": "2026-11-28T09:13:32.125Z",
    }


def bad(feed: Feed, payload: bytes) -> str:
    with pytest.raises(BadPayload) as info:
        codec.decode(feed, payload)
    return str(info.value)


# --- valid messages round-trip ------------------------------------------------------


@given(data=st.data(), feed=feeds)
def test_valid_messages_round_trip_through_decode_and_typed_message(data: st.DataObject, feed: Feed) -> None:
    payload, values = data.draw(VALID[feed.name]())
    typed = codec.typed_message(feed, _entry(codec.decode(feed, payload)))
    for name, value in values.items():
        if isinstance(value, float):
            # The entry holds the shortest text of the 32-bit float: it reads back the same.
            assert struct.unpack("<f", struct.pack("<f", typed[name]))[0] == value
        else:
            assert typed[name] == value
    assert typed["seq"] == 1 and typed["message_id"] == "1764321212345.1"


@given(data=st.data(), feed=feeds)
def test_field_order_and_repeated_fields_follow_protobuf_rules(data: st.DataObject, feed: Feed) -> None:
    """Fields in any order decode the same; a repeated scalar field: the last one wins."""
    payload, _ = data.draw(VALID[feed.name]())
    first = codec.decode(feed, payload)
    again = codec.decode(feed, payload + payload)
    assert again == first


# --- bad input is BadPayload, never anything else ----------------------------------


@given(feed=feeds, payload=st.binary(max_size=300))
def test_random_bytes_are_bad_payload_or_a_complete_message(feed: Feed, payload: bytes) -> None:
    assert_rejected_or_valid(feed, payload)


@given(data=st.data(), feed=feeds)
def test_every_truncation_of_a_valid_payload_is_rejected(data: st.DataObject, feed: Feed) -> None:
    payload, _ = data.draw(VALID[feed.name]())
    cut = data.draw(st.integers(0, len(payload) - 1))
    message = bad(feed, payload[:cut])
    assert "missing required field" in message or "not a valid protobuf" in message


@given(data=st.data(), feed=feeds)
def test_a_missing_required_field_is_named(data: st.DataObject, feed: Feed) -> None:
    _, values = data.draw(VALID[feed.name]())
    dropped = data.draw(st.sampled_from(list(values)))
    kept = b"".join(_encode_field(feed, name, values[name]) for name in values if name != dropped)
    assert f"missing required field(s): {dropped}" in bad(feed, kept)


def _encode_field(feed: Feed, name: str, value: Any) -> bytes:
    number, wire = WIRE_FIELDS[feed.name][name]
    if wire == LEN:
        return f_str(number, value)
    if wire == I32:
        return f_float(number, value)
    if name == "sport":
        return f_varint(number, event_pb2.sport.Value(value))
    return f_varint(number, value)


@given(data=st.data(), feed=feeds)
def test_a_field_with_the_wrong_wire_type_is_rejected(data: st.DataObject, feed: Feed) -> None:
    _, values = data.draw(VALID[feed.name]())
    name = data.draw(st.sampled_from(list(values)))
    number, wire = WIRE_FIELDS[feed.name][name]
    other = data.draw(st.sampled_from([w for w in (VARINT, I64, LEN, I32) if w != wire]))
    wrong = {
        VARINT: f_varint(number, 7),
        I64: tag(number, I64) + struct.pack("<d", 1.5),
        LEN: f_str(number, "x"),
        I32: f_float(number, 1.5),
    }[other]
    kept = b"".join(_encode_field(feed, n, values[n]) for n in values if n != name)
    # Only the wrongly typed field: the message lacks the field it needs.
    assert_rejected_or_valid(feed, kept + wrong)
    bad(feed, kept + wrong)


@given(data=st.data(), garbage=st.binary(min_size=1, max_size=20))
def test_invalid_utf8_in_a_string_field_is_named(data: st.DataObject, garbage: bytes) -> None:
    try:
        garbage.decode()
    except UnicodeDecodeError:
        pass
    else:
        assume(False)
    feed = data.draw(feeds)
    payload, _ = data.draw(VALID[feed.name]())
    strings = [n for n, (_, w) in WIRE_FIELDS[feed.name].items() if w == LEN]
    name = data.draw(st.sampled_from(strings))
    number, _ = WIRE_FIELDS[feed.name][name]
    # A later occurrence of a scalar field replaces the earlier one.
    message = bad(feed, payload + f_len(number, garbage))
    assert name in message and "UTF-8" in message


@given(data=st.data(), before=clean_text, after=clean_text)
def test_nul_in_a_string_field_is_named(data: st.DataObject, before: str, after: str) -> None:
    feed = data.draw(feeds)
    payload, _ = data.draw(VALID[feed.name]())
    strings = [n for n, (_, w) in WIRE_FIELDS[feed.name].items() if w == LEN]
    name = data.draw(st.sampled_from(strings))
    number, _ = WIRE_FIELDS[feed.name][name]
    message = bad(feed, payload + f_str(number, before + "\x00" + after))
    assert name in message and "NUL" in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["price", "quantity"])
def test_non_finite_floats_are_named(name: str, value: float) -> None:
    number, _ = EXECUTION_FIELDS[name]
    payload = (
        f_str(1, "AAPL")
        + f_str(2, "NASDAQ")
        + f_float(3, 1.0)
        + f_float(4, 2.0)
        + f_varint(5, 1)
        + f_str(6, "CA")
    )
    message = bad(EXECUTION, payload + f_float(number, value))
    assert name in message and "finite" in message


@given(sign=st.integers(0, 1), mantissa=st.integers(0, 2**23 - 1))
def test_every_nan_and_infinity_bit_pattern_is_rejected(sign: int, mantissa: int) -> None:
    raw = sign << 31 | 0xFF << 23 | mantissa  # exponent all ones: inf (mantissa 0) or a NaN
    payload = f_str(1, "A") + f_str(2, "B") + tag(3, I32) + raw.to_bytes(4, "little") + f_float(4, 2.0)
    payload += f_varint(5, 1) + f_str(6, "C")
    assert "price" in bad(EXECUTION, payload)


@given(data=st.data(), number=st.integers(-(2**31), 2**31 - 1))
def test_an_unknown_sport_is_rejected(data: st.DataObject, number: int) -> None:
    assume(number not in {v.number for v in event_pb2.sport.DESCRIPTOR.values})
    payload = f_varint(1, number) + f_str(2, "Lakers vs Celtics") + f_str(3, "tip-off")
    # proto2 enums are closed: an unknown number is kept as an unknown field, so the
    # required `sport` is missing.
    assert "sport" in bad(SPORT_EVENT, payload)


def test_an_unknown_sport_after_a_known_one_keeps_the_known_one() -> None:
    payload = f_varint(1, 2) + f_str(2, "Lakers vs Celtics") + f_str(3, "tip-off") + f_varint(1, 99)
    assert codec.decode(SPORT_EVENT, payload)["sport"] == "BASKETBALL"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\x0a\xff\xff\xff\xff\x0f", "a length beyond the payload"),
        (b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "a varint longer than 10 bytes"),
        (b"\x00\x01", "field number 0"),
        (b"\x0b\x0c", "a start-group tag (deprecated groups)"),
        (b"\x0f", "wire type 7 does not exist"),
        (b"\x0a\x05abc", "a string cut short"),
        (b"", "an empty payload"),
    ],
)
@pytest.mark.parametrize("feed", list(FEEDS.values()), ids=list(FEEDS))
def test_structurally_broken_payloads_are_rejected(feed: Feed, payload: bytes, why: str) -> None:
    assert bad(feed, payload), why


@given(data=st.data(), unknown=st.integers(16, 2**29 - 1), blob=st.binary(max_size=20))
def test_unknown_fields_are_ignored_as_protobuf_requires(
    data: st.DataObject, unknown: int, blob: bytes
) -> None:
    """Forward compatibility: a field this version does not know is not an error."""
    feed = data.draw(feeds)
    payload, _ = data.draw(VALID[feed.name]())
    assert codec.decode(feed, f_len(unknown, blob) + payload) == codec.decode(feed, payload)


@given(data=st.data(), feed=feeds)
def test_a_payload_of_the_other_feed_is_rejected_or_decodes_completely(
    data: st.DataObject, feed: Feed
) -> None:
    """An execution published on the sport subject (or the reverse) is never half-read."""
    other = next(f for f in FEEDS.values() if f is not feed)
    payload, _ = data.draw(VALID[other.name]())
    assert_rejected_or_valid(feed, payload)


# --- the fuzz run ---------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("FANOUT_FUZZ_EXAMPLES", "300"))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Feed, bytes]:
    """A valid payload with random byte flips, insertions, deletions and splices."""
    feed = draw(feeds)
    payload, _ = draw(VALID[feed.name]())
    buf = bytearray(payload)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "splice"]))
        at = draw(st.integers(0, len(buf)))
        if op == "flip" and buf:
            i = min(at, len(buf) - 1)
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[at : at + draw(st.integers(1, 8))]
        else:
            buf[at:at] = draw(st.sampled_from([b"\x0a", b"\x1d", b"\x28", b"\xff\xff\xff\xff\x0f"]))
    return feed, bytes(buf)


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.one_of(mutated(), st.tuples(feeds, st.binary(max_size=2000))))
def test_fuzz_the_decoder(case: tuple[Feed, bytes]) -> None:
    feed, payload = case
    assert_rejected_or_valid(feed, payload)
