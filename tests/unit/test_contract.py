"""The published contract (services/sse_gateway/contract.py): the event schemas are valid
JSON Schema, openapi.json carries the same ones, and they accept what the gateway's own
frame builders produce and refuse what it never sends. The cursor schema agrees with
cursor.parse. (The app's routes against openapi.json, and the live gateway against it:
tests/integration/test_contract.py.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest

from services.sse_gateway import contract, cursor, frames
from services.sse_gateway.contract import EventSchemaError, validate_event
from services.sse_gateway.cursor import Position
from shared import codec
from shared.feeds import FEEDS


def _entry(feed: str, seq: int) -> dict[str, str]:
    now = codec.iso_ms(datetime.now(UTC))
    fields = (
        {"symbol": "AAPL", "market": "NASDAQ", "price": "101.5", "quantity": "10",
         "executionEpoch": "1700000000000", "stateSymbol": "CA"}
        if feed == "execution"
        else {"sport": "TENNIS", "match_title": "a - b", "data_event": "ace"}
    )
    flat = codec.entry_fields(f"1795862595094.{seq}", fields, now, now)
    return dict(zip(flat[::2], flat[1::2], strict=True)) | {"seq": str(seq)}


def _data(feed: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(frames.entry_data(feed, _entry(feed, 1)))
    return parsed


def test_every_schema_is_valid_and_openapi_carries_the_same() -> None:
    components = contract.openapi()["components"]["schemas"]
    for name, component in contract.COMPONENT.items():
        found = contract.schema(name)
        jsonschema.Draft202012Validator.check_schema(found)
        assert found["$id"].endswith(f"/{name}.json")
        trimmed = {k: v for k, v in found.items() if k not in ("$schema", "$id")}
        assert components[component] == trimmed, f"openapi.json's {component} differs from {name}.json"
    assert set(contract.EVENT_TYPES) | {"cursor"} == set(contract.COMPONENT)


@pytest.mark.parametrize("feed", ["execution", "sport_event"])
def test_the_data_the_gateway_sends_matches_its_schema(feed: str) -> None:
    data = frames.entry_data(feed, _entry(feed, 7))
    validate_event(feed, data)
    validate_event(feed, json.loads(data))
    name, bad = frames.entry_payload(feed, feed.encode(), {**_entry(feed, 8), "error": "not protobuf"})
    assert name == frames.MALFORMED
    validate_event("malformed", bad)
    validate_event("malformed", frames.malformed_data(feed, None, None, "no seq"))


def test_notices_match_their_schemas() -> None:
    def data(frame: bytes) -> str:
        return next(line[6:] for line in frame.decode().splitlines() if line.startswith("data: "))

    gap = frames.notice("gap", {"feed": "execution", "asked_after": 4, "resumed_at": 9, "missed": 4})
    validate_event("gap", data(gap))
    epoch = {"feed": "execution", "reason": "epoch", "asked_epoch": "1", "current_epoch": "2",
             "asked_after": 3, "resumes_at": "the first entry of the current epoch"}
    validate_event("reset", epoch)
    legacy = {"feed": "sport_event", "reason": "cursor_version", "asked": "v1:x", "resumes_at": "x.1.0"}
    validate_event("reset", legacy)
    validate_event("expired", {"reason": "token_expired", "expired_at": "2026-11-28T10:43:18.503Z"})


@pytest.mark.parametrize(
    ("event", "data", "message"),
    [
        ("execution", {"symbol": "AAPL"}, "is a required property"),
        ("sport_event", {**_data("sport_event"), "sport": "CHESS"}, "sport"),
        ("execution", {**_data("execution"), "extra": 1},
         "Additional properties"),
        ("gap", {"feed": "execution", "asked_after": 1, "resumed_at": 3, "missed": 0}, "missed"),
        ("reset", {"feed": "execution", "reason": "whim"}, "(the data)"),
        ("expired", {"reason": "token_expired", "expired_at": "yesterday"}, "expired_at"),
        ("nonsense", {}, "unknown event type"),
        ("gap", "{not json", "not JSON"),
    ],
)
def test_what_the_gateway_never_sends_is_refused(event: str, data: Any, message: str) -> None:
    with pytest.raises(EventSchemaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_event(event, data)


def test_the_cursor_schema_agrees_with_the_parser() -> None:
    check = jsonschema.Draft202012Validator(contract.schema("cursor"))
    made = [
        cursor.format({"execution": Position("1795862595094", 42)}, ["execution"]),
        cursor.format(
            {"execution": Position("1795862595094", 42), "sport_event": Position("-", 0)},
            ["execution", "sport_event"],
        ),
    ]
    for text in made:
        assert check.is_valid(text), text
        cursor.parse(text)
    wrong = ("v1:execution.bf6c20b3.1795862598012-0.3", "v2:execution.12", "v2:crypto.1.1", "v3:x.1.1")
    for text in wrong:
        assert not check.is_valid(text), text
    assert set(FEEDS) == {"execution", "sport_event"}  # the pattern names both feeds
