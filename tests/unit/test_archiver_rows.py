"""The archiver's pure parts: entry -> row conversion, progress arithmetic, settings."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest

from services.archiver.progress import Progress, broker_time, min_id, next_id
from services.archiver.rows import (
    DEAD_LETTER_COLUMNS,
    BadEntry,
    DeadLetterRow,
    columns,
    feed_row,
    malformed_row,
    poison_row,
)
from services.archiver.settings import ArchiverSettings
from services.archiver.store import STORE_ERRORS, TRANSIENT_ERRORS, is_data_error, leaves_connection_clean
from shared import codec
from shared.connections import MAX_BLOCK_MS
from shared.feeds import EXECUTION, SPORT_EVENT
from shared.settings import SettingsError

BROKER, INGEST = "2026-11-28T09:13:32.123Z", "2026-11-28T09:13:32.130Z"


def _entry(fields: dict[str, str], seq: int = 7, message_id: str = "1795000000000.42") -> dict[str, str]:
    flat = codec.entry_fields(message_id, fields, BROKER, INGEST)
    return {"seq": str(seq), **dict(zip(flat[::2], flat[1::2], strict=True))}


EXEC = {
    "symbol": "AAPL",
    "market": "NASDAQ",
    "price": "101.125",
    "quantity": "0.1",
    "executionEpoch": "1700000000123",
    "stateSymbol": "FILLED",
}
SPORT = {"sport": "GOLF", "match_title": "Open — round 2", "data_event": "birdie"}


def test_execution_row_has_typed_columns_in_order() -> None:
    row = feed_row(EXECUTION, "42-0", _entry(EXEC, seq=42))
    values = dict(zip(columns("execution"), row, strict=True))
    # The epoch is the message id's prefix (`<epoch>.<seq>`), never read from elsewhere.
    assert values["message_id"] == "1795000000000.42" and values["epoch"] == "1795000000000"
    assert values["seq"] == 42
    assert (values["stream_id"], values["entry_ms"], values["entry_n"]) == ("42-0", 42, 0)
    assert values["broker_time"] == datetime(2026, 11, 28, 9, 13, 32, 123000, tzinfo=UTC)
    assert values["ingest_time"] == datetime(2026, 11, 28, 9, 13, 32, 130000, tzinfo=UTC)
    assert (values["symbol"], values["market"], values["state_symbol"]) == ("AAPL", "NASDAQ", "FILLED")
    assert (
        values["price"] == 101.125
        and values["quantity"] == 0.1
        and values["execution_epoch"] == 1700000000123
    )
    assert json.loads(values["message"]) == codec.typed_message(EXECUTION, _entry(EXEC, seq=42))


def test_sport_row_keeps_unicode() -> None:
    row = feed_row(SPORT_EVENT, "1-0", _entry(SPORT))
    values = dict(zip(columns("sport_event"), row, strict=True))
    assert values["match_title"] == "Open — round 2"
    assert json.loads(values["message"])["match_title"] == "Open — round 2"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"price": "12,5"}, "bad field value"),
        ({"price": "nan"}, "not a finite number"),
        ({"price": "inf"}, "not a finite number"),
        ({"executionEpoch": str(2**63)}, "does not fit in 64 bits"),
        ({"executionEpoch": "soon"}, "bad field value"),
        ({"symbol": "A\x00B"}, "NUL"),
        ({"seq": "x"}, "bad field value"),
        ({"broker_time": "yesterday"}, "not an ISO 8601 time"),
        ({"broker_time": "2026-11-28T09:13:32"}, "no time zone"),
        ({"message_id": ""}, "empty message_id"),
        ({"message_id": "42"}, "is not <epoch>.<seq>"),
        ({"message_id": ".42"}, "is not <epoch>.<seq>"),
    ],
)
def test_bad_entries_are_named(change: dict[str, str], error: str) -> None:
    with pytest.raises(BadEntry, match=error):
        feed_row(EXECUTION, "1-0", _entry(EXEC) | change)


def test_missing_field_is_named() -> None:
    entry = _entry(EXEC)
    del entry["market"]
    with pytest.raises(BadEntry, match="missing field market"):
        feed_row(EXECUTION, "1-0", entry)


def test_malformed_entry_row() -> None:
    flat = codec.malformed_fields("1795000000000.9", "not a valid protobuf", b"\xff\x00", BROKER, INGEST)
    entry = {"seq": "9", **dict(zip(flat[::2], flat[1::2], strict=True))}
    assert codec.is_malformed(entry)
    row = malformed_row("execution", "pfx.execution", "9-0", entry)
    assert isinstance(row, DeadLetterRow)
    values = dict(zip(DEAD_LETTER_COLUMNS, row, strict=True))
    assert values == {
        "source": "ingestor",
        "feed": "execution",
        "message_id": "1795000000000.9",
        "subject": "pfx.execution",
        "broker_seq": 9,
        "stream_id": "9-0",
        "error": "not a valid protobuf",
        "payload": b"\xff\x00",
        "fields": None,
        "broker_time": datetime(2026, 11, 28, 9, 13, 32, 123000, tzinfo=UTC),
        "ingest_time": datetime(2026, 11, 28, 9, 13, 32, 130000, tzinfo=UTC),
        "epoch": "1795000000000",
        "seq": 9,
    }
    with pytest.raises(BadEntry, match="bad field value"):
        malformed_row("execution", "s", "9-0", entry | {"payload_b64": "!!"})
    with pytest.raises(BadEntry, match="missing field error"):
        malformed_row("execution", "s", "9-0", {k: v for k, v in entry.items() if k != "error"})
    with pytest.raises(BadEntry, match="bad field value"):
        malformed_row("execution", "s", "9-0", entry | {"seq": "nine"})


def test_poison_row_keeps_every_field_and_survives_nul() -> None:
    entry = {"seq": "3", "message_id": "m.1", "price": "1\x002", "broker_time": "bad"}
    row = poison_row("execution", "9-1", entry, "bad field value: x")
    assert row[:3] == ("archiver", "execution", "m.1") and row[5] == "9-1"
    assert row[6] == "bad field value: x"
    assert json.loads(row[8]) == {"seq": "3", "message_id": "m.1", "price": "1\\u00002", "broker_time": "bad"}
    assert row[9] is None and row[10] is None  # unparseable times are left out, not guessed
    assert row[11:] == ("m", 3)  # epoch from the message id; seq from the field (the id is not <seq>-0)
    deleted = poison_row("execution", "9-0", {}, "deleted")
    assert deleted[2] is None and deleted[11:] == (None, 9)  # seq from the stream id
    v2 = poison_row("execution", "5-0", {"seq": "5", "message_id": "1795000000000.5"}, "e")
    assert v2[11:] == ("1795000000000", 5)


def test_progress_floor_is_below_pending_and_at_most_last_delivered() -> None:
    assert next_id("5-9") == "5-10" and min_id("10-0", "9-99") == "9-99"
    none = Progress(length=3, first_id="1-0", last_id="3-0", group_exists=False)
    assert none.archived_below == "0-0" and none.lag_entries == 3 and none.oldest_unarchived == "1-0"
    caught_up = Progress(
        length=3, first_id="1-0", last_id="3-0", group_exists=True, last_delivered="3-0", undelivered=0
    )
    assert caught_up.archived_below == "3-1" and caught_up.lag_entries == 0 and caught_up.lag_seconds() == 0
    behind = Progress(
        length=5,
        first_id="1-0",
        last_id="5-0",
        group_exists=True,
        last_delivered="4-0",
        pending=2,
        oldest_pending="2-0",
        undelivered=1,
        oldest_undelivered="5-0",
    )
    assert behind.archived_below == "2-0" and behind.lag_entries == 3 and behind.oldest_unarchived == "2-0"
    # Ids are seqs: the lag in seconds comes from the oldest unarchived entry's broker_time.
    assert behind.lag_seconds(now=10.0) == 0.0  # its broker_time unknown
    assert replace(behind, oldest_unarchived_time=4.5).lag_seconds(now=10.0) == 5.5
    assert replace(caught_up, oldest_unarchived_time=4.5).lag_seconds(now=10.0) == 0  # nothing unarchived


def test_broker_time_of_an_entry() -> None:
    assert (
        broker_time({b"broker_time": BROKER.encode()})
        == datetime(2026, 11, 28, 9, 13, 32, 123000, tzinfo=UTC).timestamp()
    )
    assert broker_time({"broker_time": BROKER}) is not None
    assert broker_time({b"broker_time": b"yesterday"}) is None
    assert broker_time({b"broker_time": b"2026-11-28T09:13:32"}) is None  # no time zone
    assert broker_time({}) is None and broker_time(None) is None


def test_settings_validate_and_name_the_variable() -> None:
    defaults = ArchiverSettings.from_env({})
    assert (defaults.retention, defaults.maxlen) == (900.0, 1_000_000)  # the hot window
    settings = ArchiverSettings.from_env(
        {"FANOUT_ARCHIVE_CLAIM_IDLE": "90s", "FANOUT_RETENTION": "2h", "FANOUT_ARCHIVE_HTTP": "0.0.0.0:0"}
    )
    assert (settings.claim_idle, settings.retention, settings.http) == (90.0, 7200.0, ("0.0.0.0", 0))
    assert settings.consumer_name  # hostname-pid by default
    with pytest.raises(SettingsError, match="FANOUT_ARCHIVE_BLOCK_MS"):
        ArchiverSettings.from_env({"FANOUT_ARCHIVE_BLOCK_MS": str(MAX_BLOCK_MS + 1)})
    with pytest.raises(SettingsError, match="FANOUT_ARCHIVE_WORKERS"):
        ArchiverSettings.from_env({"FANOUT_ARCHIVE_WORKERS": "0"})
    with pytest.raises(SettingsError, match="FANOUT_RETENTION"):
        ArchiverSettings.from_env({"FANOUT_RETENTION": "a while"})


def test_the_linger_is_bounded_and_never_outlasts_the_claim_idle() -> None:
    assert ArchiverSettings.from_env({}).linger == 1.0
    assert ArchiverSettings.from_env({"FANOUT_ARCHIVE_LINGER": "0"}).linger == 0  # store each read at once
    with pytest.raises(SettingsError, match=r"^FANOUT_ARCHIVE_LINGER=6s: expected 0s to 5s$"):
        ArchiverSettings.from_env({"FANOUT_ARCHIVE_LINGER": "6s"})
    short_claim = {"FANOUT_ARCHIVE_LINGER": "2s", "FANOUT_ARCHIVE_CLAIM_IDLE": "1s"}
    assert ArchiverSettings.from_env(short_claim).linger_s == 0.5  # held entries never look idle


def test_raw_entries_decode_in_one_pass_and_keep_odd_bytes() -> None:
    from services.archiver.consumer import _entries

    plain, with_nul, not_utf8 = (
        [b"1-0", [b"seq", b"1", b"symbol", "café".encode()]],
        [b"2-0", [b"seq", b"2", b"symbol", b"a\x00b"]],
        [b"3-0", [b"seq", b"3", b"symbol", b"\xff"]],
    )
    entries = _entries([plain, with_nul, not_utf8, [b"4-0", None]])
    assert [e.id for e in entries] == ["1-0", "2-0", "3-0", "4-0"]
    assert entries[0].fields == {"seq": "1", "symbol": "café"}
    assert entries[1].fields == {"seq": "2", "symbol": "a\x00b"}  # refused later (NUL), but kept
    assert entries[2].fields["symbol"].startswith("\x00")  # marked as not UTF-8, escaped
    assert entries[3].fields == {}  # deleted while pending
    assert _entries([(b"5-0", {b"seq": b"5"})])[0].fields == {"seq": "5"}  # redis-py's parsed shape


def _dumps(message: object) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


TITLES = ['say "hi"\\n', "tab\there\nnew line", "emoji 🎾 ünï", "\u2028 separators \u2029", "ctrl \x01\x1f"]


@pytest.mark.parametrize("title", TITLES)
def test_message_json_is_what_json_dumps_writes(title: str) -> None:
    entry = _entry(SPORT | {"match_title": title})
    row = dict(zip(columns("sport_event"), feed_row(SPORT_EVENT, "1-0", entry), strict=True))
    assert row["message"] == _dumps(codec.typed_message(SPORT_EVENT, entry))
    exec_entry = _entry(EXEC | {"price": "3.4028235e+38", "quantity": "1e-45"})
    row = dict(zip(columns("execution"), feed_row(EXECUTION, "1-0", exec_entry), strict=True))
    assert row["message"] == _dumps(codec.typed_message(EXECUTION, exec_entry))


@pytest.mark.parametrize(
    ("exc", "transient", "data", "clean"),
    [
        # asyncpg's client side after the server went away: retry, never a crash.
        (
            asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
            True,
            False,
            False,
        ),
        (asyncpg.exceptions.ProtocolError("unexpected message"), True, False, False),
        (asyncpg.InterfaceError("connection is closed"), True, False, False),
        (
            asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
            True,
            False,
            False,
        ),
        (
            asyncpg.AdminShutdownError("terminating connection due to administrator command"),
            True,
            False,
            False,
        ),
        (ConnectionResetError(), True, False, False),
        (TimeoutError(), True, False, False),
        # A row's data: the poison path; a server-reported one leaves the connection usable.
        (asyncpg.UniqueViolationError("duplicate key"), True, True, True),
        (asyncpg.exceptions.NumericValueOutOfRangeError("out of range"), True, True, True),
        (ValueError("cannot encode"), False, True, False),  # client-side, mid-COPY: discard it
        (asyncpg.exceptions._base.DataError("invalid input for query argument"), True, True, False),
    ],
)
def test_store_errors_are_classified(exc: BaseException, transient: bool, data: bool, clean: bool) -> None:
    assert isinstance(exc, TRANSIENT_ERRORS) == transient
    assert isinstance(exc, STORE_ERRORS)
    assert is_data_error(exc) == data
    assert leaves_connection_clean(exc) == clean
