"""Protobuf payload -> Redis stream entry fields -> typed message.

The stream entry is the one representation every service reads: flat string fields,
readable with `redis-cli XRANGE`, in this order:

    seq, message_id, <the message's fields by proto name>, broker_time, ingest_time

`seq` is added by the Lua script; the rest comes from `entry_fields`. A payload that
cannot be decoded keeps its place (its seq) as `seq, message_id, error, payload_b64,
broker_time, ingest_time` (`malformed_fields`). Enums are
written by name (`BASKETBALL`), floats in their shortest text that reads back as the
same 32-bit float, times as UTC ISO 8601 with milliseconds.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from shared.feeds import FEEDS, Feed

# Field names every entry carries besides the message's own fields.
META_FIELDS = ("seq", "message_id", "broker_time", "ingest_time")

_F32 = struct.Struct("<f")
_F32_MIN_NORMAL = 1.1754943508222875e-38


class BadPayload(ValueError):
    """A payload that is not a complete, valid message of its feed."""


def decode(feed: Feed, payload: bytes) -> dict[str, str]:
    """Decode a payload into the message's entry fields, by proto field name.

    Raises BadPayload naming what is wrong: not protobuf, missing required fields,
    a string that is not UTF-8 or holds NUL, a float that is not finite.
    """
    msg = feed.message()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise BadPayload(f"not a valid protobuf `{feed.message.DESCRIPTOR.name}` message: {exc}") from None
    # The Python runtime parses a message that lacks required fields without raising.
    missing = msg.FindInitializationErrors()  # type: ignore[attr-defined]
    if missing:
        raise BadPayload(f"missing required field(s): {', '.join(missing)}")
    out: dict[str, str] = {}
    for name, kind, enum_names in _plan(feed):
        value = getattr(msg, name)
        if kind == _STRING:
            # upb hands back bytes for a proto2 string that is not valid UTF-8.
            if not isinstance(value, str):
                raise BadPayload(f"field {name} is not valid UTF-8")
            if "\x00" in value:
                raise BadPayload(f"field {name} contains a NUL character")
            out[name] = value
        elif kind == _FLOAT:
            if not math.isfinite(value):
                raise BadPayload(f"field {name} is not a finite number: {value}")
            out[name] = float32_text(value)
        elif enum_names is not None:
            out[name] = enum_names[value]
        else:
            out[name] = str(value)
    return out


_STRING = FieldDescriptor.TYPE_STRING
_FLOAT = FieldDescriptor.TYPE_FLOAT


@cache
def _plan(feed: Feed) -> tuple[tuple[str, int, dict[int, str] | None], ...]:
    """Per field of a feed's message: name, type, and enum value names (read once: the
    descriptor lookups cost more than the parse itself)."""
    plan = []
    for f in feed.message.DESCRIPTOR.fields:
        enum_names = None
        if f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
            enum_names = {v.number: str(v.name) for v in f.enum_type.values}
        plan.append((str(f.name), int(f.type), enum_names))
    return tuple(plan)


def float32_text(value: float) -> str:
    """The shortest decimal text that parses back to the same 32-bit float."""
    # Six significant digits always round-trip for a normal float32 (FLT_DIG), and the
    # 6-digit rounding of one whose shortest form has fewer digits is that form; a
    # subnormal has fewer bits of precision, so it may need fewer than six.
    first = 1 if 0 < abs(value) < _F32_MIN_NORMAL else 6
    for digits in range(first, 10):
        text = f"{value:.{digits}g}"
        if _F32.unpack(_F32.pack(float(text)))[0] == value:
            return text
    return repr(value)  # unreachable: 9 significant digits always round-trip


def iso_ms(when: datetime) -> str:
    """UTC ISO 8601 with millisecond precision and a `Z`: 2026-11-28T09:13:32.123Z."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def iso_ms_from_ns(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{rest // 1_000_000:03d}Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def entry_fields(message_id: str, fields: Mapping[str, str], broker_time: str, ingest_time: str) -> list[str]:
    """The flat field/value list the Lua script appends (it prepends `seq`)."""
    out = ["message_id", message_id]
    for name, value in fields.items():
        out += (name, value)
    out += ("broker_time", broker_time, "ingest_time", ingest_time)
    return out


def malformed_fields(
    message_id: str, error: str, payload: bytes, broker_time: str, ingest_time: str
) -> list[str]:
    """The entry of a payload that is not a valid message of its feed: it keeps its seq
    in the feed's stream (so a reader sees no gap) and carries the error and the raw bytes."""
    return [
        "message_id",
        message_id,
        "error",
        error,
        "payload_b64",
        base64.b64encode(payload).decode("ascii"),
        "broker_time",
        broker_time,
        "ingest_time",
        ingest_time,
    ]


def is_malformed(entry: Mapping[str, str]) -> bool:
    """An entry `malformed_fields` made (sent as `event: malformed`, archived as a dead letter)."""
    return "error" in entry


def typed_message(feed: Feed, entry: Mapping[str, str]) -> dict[str, Any]:
    """An entry's fields with their proto types restored, for JSON and Postgres:
    the message's fields, then message_id, seq, broker_time and ingest_time."""
    out: dict[str, Any] = {}
    for name, cast in field_casts(feed):
        out[name] = entry[name] if cast is None else cast(entry[name])
    out["message_id"] = entry["message_id"]
    out["seq"] = int(entry["seq"])
    out["broker_time"] = entry["broker_time"]
    out["ingest_time"] = entry["ingest_time"]
    return out


_INT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SINT32,
    }
)


@cache
def field_casts(feed: Feed) -> tuple[tuple[str, Callable[[str], Any] | None], ...]:
    """Per field of a feed's message, in order: its name and how its entry text becomes
    its typed value (`float`, `int`, or None: the text as it is). Worked out once."""
    return tuple(
        (
            str(f.name),
            float if f.type == FieldDescriptor.TYPE_FLOAT else int if f.type in _INT_TYPES else None,
        )
        for f in feed.message.DESCRIPTOR.fields
    )


def str_entry(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A stream entry as redis-py returns it (bytes unless decode_responses) as str."""
    return {text(k): text(v) for k, v in raw.items()}


def text(value: bytes | str | int | float | None) -> str:
    """A value of a Redis reply as text: redis-py hands back bytes (unless
    decode_responses), numbers for some replies. The one bytes-to-text helper: a missing
    value (None) is the caller's to handle (TypeError here), never the text "None"."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected bytes, str or a number from Redis, got {value!r}")


def feed_of(name: str) -> Feed:
    try:
        return FEEDS[name]
    except KeyError:
        raise KeyError(f"unknown feed {name!r}; known feeds: {', '.join(FEEDS)}") from None
