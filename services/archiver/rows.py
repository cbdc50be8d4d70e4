"""Stream entries -> catalogue rows (pure functions, no I/O).

A feed entry (id `<seq>-0`, contract v2) becomes one row of its feed's table: the common
columns, the message's fields as typed columns, and the whole typed message as jsonb
(`codec.typed_message`, the same dict the SSE gateway sends). Its epoch is the prefix
of its message id (`<epoch>.<seq>`). A malformed entry (the ingestor could not decode
the payload: fields `error`, `payload_b64`) becomes a `dead_letter` row (source
`ingestor`) at the same epoch and seq. An entry that cannot be converted raises
`BadEntry` naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from json.encoder import encode_basestring
from typing import Any, Final

from shared import codec
from shared.codec import parse_iso
from shared.feeds import EXECUTION, FEEDS, SPORT_EVENT, Feed, id_key, seq_of_entry_id

Row = tuple[Any, ...]

COMMON_COLUMNS: Final = (
    "message_id",
    "epoch",
    "seq",
    "stream_id",
    "entry_ms",
    "entry_n",
    "broker_time",
    "ingest_time",
)
# Per feed: table column -> proto field name.
FEED_COLUMNS: Final[dict[str, dict[str, str]]] = {
    EXECUTION.name: {
        "symbol": "symbol",
        "market": "market",
        "price": "price",
        "quantity": "quantity",
        "execution_epoch": "executionEpoch",
        "state_symbol": "stateSymbol",
    },
    SPORT_EVENT.name: {"sport": "sport", "match_title": "match_title", "data_event": "data_event"},
}


def columns(feed: str) -> tuple[str, ...]:
    """The columns a feed row fills, in row order (archived_at is the table's default)."""
    return (*COMMON_COLUMNS, *FEED_COLUMNS[feed], "message")


DEAD_LETTER_COLUMNS: Final = (
    "source",
    "feed",
    "message_id",
    "subject",
    "broker_seq",
    "stream_id",
    "error",
    "payload",
    "fields",
    "broker_time",
    "ingest_time",
    "epoch",
    "seq",
)


class DeadLetterRow(tuple[Any, ...]):
    """A row of `dead_letter` (in `DEAD_LETTER_COLUMNS` order) among a feed's rows."""

    __slots__ = ()


class BadEntry(ValueError):
    """A stream entry that cannot become a row."""


def epoch_of(message_id: str) -> str:
    """The epoch of a message id `<epoch>.<seq>`: everything before the last dot."""
    epoch, dot, _ = message_id.rpartition(".")
    if not dot or not epoch:
        raise BadEntry(f"message_id {message_id!r} is not <epoch>.<seq>")
    return epoch


def _time(entry: Mapping[str, str], name: str) -> datetime:
    try:
        when = parse_iso(entry[name])
    except KeyError:
        raise BadEntry(f"missing field {name}") from None
    except ValueError:
        raise BadEntry(f"field {name} is not an ISO 8601 time: {entry[name]!r}") from None
    if when.tzinfo is None:
        raise BadEntry(f"field {name} has no time zone: {entry[name]!r}")
    return when


def _kinds(feed: Feed) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The feed's proto field names by the checks their values need: (text, float, int)."""
    text: list[str] = []
    floats: list[str] = []
    ints: list[str] = []
    for name, cast in codec.field_casts(feed):
        (floats if cast is float else ints if cast is int else text).append(name)
    return (*text, "message_id"), tuple(floats), tuple(ints)


_KINDS: Final = {name: _kinds(feed) for name, feed in FEEDS.items()}


_INT64: Final = range(-(2**63), 2**63)


def feed_row(feed: Feed, stream_id: str, entry: Mapping[str, str]) -> Row:
    """One row of `feed`'s table, in `columns(feed.name)` order. `entry_ms`/`entry_n` are
    the two halves of the stream id (`<seq>`, 0 in contract v2)."""
    try:
        message = codec.typed_message(feed, entry)
    except KeyError as exc:
        raise BadEntry(f"missing field {exc.args[0]}") from None
    except ValueError as exc:
        raise BadEntry(f"bad field value: {exc}") from None
    text, floats, ints = _KINDS[feed.name]
    for name in text:
        if "\x00" in message[name]:
            raise BadEntry(f"field {name} contains a NUL character or is not UTF-8")
    for name in floats:
        if not math.isfinite(message[name]):
            raise BadEntry(f"field {name} is not a finite number")
    for name in ints:
        if message[name] not in _INT64:
            raise BadEntry(f"field {name} does not fit in 64 bits: {message[name]}")
    if not message["message_id"]:
        raise BadEntry("empty message_id")
    epoch = epoch_of(message["message_id"])
    ms, n = id_key(stream_id)
    return (
        message["message_id"],
        epoch,
        message["seq"],
        stream_id,
        ms,
        n,
        _time(entry, "broker_time"),
        _time(entry, "ingest_time"),
        *[message[field] for field in FEED_COLUMNS[feed.name].values()],
        _json(feed, message),
    )


def _json_plan(feed: Feed) -> tuple[tuple[str, str, Callable[[Any], str]], ...]:
    """Per key of typed_message, in order: (key, `"key":`, how json.dumps writes its value)."""
    plan: list[tuple[str, str, Callable[[Any], str]]] = []
    for name, cast in (*codec.field_casts(feed), ("message_id", None), ("seq", int), ("broker_time", None)):
        plan.append((name, encode_basestring(name) + ":", _JSON_VALUE[cast]))
    plan.append(("ingest_time", '"ingest_time":', encode_basestring))
    return tuple(plan)


# What json.dumps(..., ensure_ascii=False) writes for each kind of value (floats are
# finite, checked before): the same text, without walking a dict generically.
_JSON_VALUE: Final[dict[Any, Callable[[Any], str]]] = {
    None: encode_basestring,
    float: float.__repr__,
    int: int.__repr__,
}
_JSON_PLANS: Final = {name: _json_plan(feed) for name, feed in FEEDS.items()}


def _json(feed: Feed, message: Mapping[str, Any]) -> str:
    """`json.dumps(message, ensure_ascii=False, separators=(",", ":"))`, ~2.5x faster."""
    return "{" + ",".join([key + write(message[name]) for name, key, write in _JSON_PLANS[feed.name]]) + "}"


def malformed_row(feed: str, subject: str, stream_id: str, entry: Mapping[str, str]) -> DeadLetterRow:
    """A row of `dead_letter` (source `ingestor`) from a feed entry the ingestor made for
    a payload it could not decode (`codec.malformed_fields`): at its epoch and seq."""
    try:
        message_id, error = entry["message_id"], entry["error"]
        seq = int(entry["seq"])
        payload = base64.b64decode(entry["payload_b64"], validate=True)
    except KeyError as exc:
        raise BadEntry(f"missing field {exc.args[0]}") from None
    except (ValueError, binascii.Error) as exc:
        raise BadEntry(f"bad field value: {exc}") from None
    if "\x00" in message_id + error:
        raise BadEntry("a text field contains a NUL character")
    if seq not in _INT64:
        raise BadEntry(f"field seq does not fit in 64 bits: {seq}")
    return DeadLetterRow(
        (
            "ingestor",
            feed,
            message_id,
            subject,
            seq,
            stream_id,
            error,
            payload,
            None,
            _time(entry, "broker_time"),
            _time(entry, "ingest_time"),
            epoch_of(message_id),
            seq,
        )
    )


def _seq_of_id(stream_id: str) -> int | None:
    try:
        seq = seq_of_entry_id(stream_id)
    except ValueError:
        return None
    return seq if seq in _INT64 else None


def poison_row(feed: str, stream_id: str, entry: Mapping[str, str], error: str) -> Row:
    """A row of `dead_letter` for an entry the archiver could not store: the error and
    the raw fields, as they were, so nothing is lost; at its epoch (from the message id,
    if it has one) and seq (its position: the stream id `<seq>-0`, else its seq field)."""

    def clean(text: str) -> str:  # Postgres text and jsonb refuse NUL
        return text.replace("\x00", "\\u0000")

    def maybe_time(name: str) -> datetime | None:
        try:
            return _time(entry, name)
        except BadEntry:
            return None

    def maybe_int(name: str) -> int | None:
        try:
            value = int(entry.get(name, ""))
        except ValueError:
            return None
        return value if -(2**63) <= value < 2**63 else None

    message_id = entry.get("message_id") or None
    epoch, dot, _ = (message_id or "").rpartition(".")
    seq = _seq_of_id(stream_id)
    return (
        "archiver",
        feed,
        clean(message_id) if message_id else None,
        clean(entry["subject"]) if "subject" in entry else None,
        maybe_int("broker_seq"),
        stream_id,
        clean(error),
        None,
        json.dumps({clean(k): clean(v) for k, v in entry.items()}, ensure_ascii=False),
        maybe_time("broker_time"),
        maybe_time("ingest_time"),
        clean(epoch) if dot and epoch else None,
        seq if seq is not None else maybe_int("seq"),
    )
