"""GET /v1/feeds/{feed}/messages against the real Redis and PostgreSQL: keyset pages of
the catalogue by (epoch, seq), the stream's own event JSON and cursors (a malformed
payload at its seq as `malformed`), `before`/`since`/`until`/filters, and a cursor read
from a page that resumes the stream at exactly the next seq."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.sse_gateway import contract, cursor
from shared.settings import Settings
from tests.integration.test_gateway_access import call, gateway_settings
from tests.integration.test_gateway_helpers import (
    EPOCH,
    Writer,
    archive,
    create_catalogue,
    inprocess_gateway,
    open_stream,
    xrange_all,
)

PATH = "/v1/feeds/execution/messages"
TIMES = ("2026-11-28T10:00:00.000Z", "2026-11-28T11:00:00.000Z", "2026-11-28T12:00:00.000Z")


@pytest.fixture
async def gateway(base_settings: Settings) -> AsyncIterator[Any]:
    async with inprocess_gateway(gateway_settings(base_settings, tokens="")) as app:
        yield app


async def _fill(redis: Any, pg: Any, settings: Settings, archived: int | None = None) -> Writer:
    """12 executions (4 per hour of TIMES, symbols MSFT, TSLA, AAPL in turn) and a malformed
    payload at seq 6, all in Redis; the first `archived` (default all) in the catalogue."""
    writer = Writer(redis, settings.key_prefix)
    await writer.append("execution", 4, broker_time=TIMES[0])
    await writer.append("execution", 1, broker_time=TIMES[1])
    await writer.append_malformed("execution")
    await writer.append("execution", 2, broker_time=TIMES[1])
    await writer.append("execution", 4, broker_time=TIMES[2])
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    assert len(entries) == 12
    await archive(pg, settings.db_schema, "execution", entries[: archived or len(entries)])
    return writer


def _seqs(body: dict[str, Any]) -> list[int]:
    return [cursor.parse(e["id"])["execution"].seq for e in body["events"]]


async def test_paging_through_then_the_last_cursor_resumes_the_stream_at_the_next_seq(
    gateway: Any, redis: Any, pg: Any, base_settings: Settings
) -> None:
    writer = await _fill(redis, pg, base_settings, archived=10)
    seen: list[dict[str, Any]] = []
    query: dict[str, str] = {"limit": "4"}
    for _ in range(10):
        reply = await call(gateway, "GET", PATH, query)
        assert reply.status == 200, reply.body
        body = reply.json()
        seen += body["events"]
        if not body["has_more"]:
            assert body["next"] is None
            break
        assert body["next"] == body["events"][-1]["id"]
        query = {"limit": "4", "after": body["next"]}
    assert [cursor.parse(e["id"])["execution"] for e in seen] == [
        cursor.Position(EPOCH, s) for s in range(1, 11)
    ]
    for event in seen:  # the stream's own JSON, valid against the published schemas
        contract.validate_event(event["event"], event["data"])
    assert [e["event"] for e in seen].count("malformed") == 1 and seen[5]["event"] == "malformed"
    assert seen[5]["data"]["seq"] == 6 and seen[0]["data"]["message_id"] == f"{EPOCH}.1"
    assert seen[0]["data"]["symbol"] == "MSFT" and writer.top["execution"] == 12

    stream = await open_stream(
        gateway.state.port, "feeds=execution", headers={"Last-Event-ID": seen[-1]["id"]}
    )
    assert stream.status == 200
    events = await stream.collect(2, feeds=["execution"])
    assert [e.json()["seq"] for e in events] == [11, 12]  # exactly the next seq, nothing repeated
    stream.close()


async def test_before_time_bounds_and_filters(
    gateway: Any, redis: Any, pg: Any, base_settings: Settings
) -> None:
    await _fill(redis, pg, base_settings)
    at = {s: cursor.format({"execution": cursor.Position(EPOCH, s)}, ["execution"]) for s in range(13)}

    back = (await call(gateway, "GET", PATH, {"before": at[10], "limit": "3"})).json()
    assert _seqs(back) == [7, 8, 9] and back["has_more"] and back["next"] == at[7]  # oldest first
    older = (await call(gateway, "GET", PATH, {"before": back["next"], "limit": "10"})).json()
    assert _seqs(older) == [1, 2, 3, 4, 5, 6] and not older["has_more"]

    between = (await call(gateway, "GET", PATH, {"after": at[3], "before": at[8]})).json()
    assert _seqs(between) == [4, 5, 6, 7]

    hour = (await call(gateway, "GET", PATH, {"since": TIMES[1], "until": "2026-11-28T12:00:00Z"})).json()
    assert _seqs(hour) == [5, 7, 8]  # the malformed payload at 6 was stamped now

    apple = (await call(gateway, "GET", PATH, {"symbol": "AAPL"})).json()
    data = [e["data"] for e in apple["events"]]
    assert {d.get("symbol") for d in data if "symbol" in d} == {"AAPL"}
    assert _seqs(apple) == [3, 6, 9, 12]  # AAPL every third seq, and the malformed one, as on the stream

    empty = (await call(gateway, "GET", PATH, {"after": at[12]})).json()
    assert empty == {"feed": "execution", "events": [], "has_more": False, "next": None}
    assert (await call(gateway, "GET", PATH, {"before": "v2:execution.-.0"})).json()["events"] == []


@pytest.mark.parametrize(
    ("path", "query", "status", "words"),
    [
        (PATH, {"after": "v2:execution.1"}, 400, "bad cursor"),
        (PATH, {"after": "v2:sport_event.1795862595094.3"}, 400, "names no position in the execution feed"),
        (PATH, {"after": "v1:execution.bf6c20b3.1795862598012-0.3"}, 400, "version 1 cursor"),
        (PATH, {"limit": "0"}, 400, "bad limit"),
        (PATH, {"limit": "1001"}, 400, "bad limit"),
        (PATH, {"since": "yesterday"}, 400, "bad time"),
        (PATH, {"sport": "TENNIS"}, 400, "bad filter"),
        (PATH, {"colour": "red"}, 400, "unknown parameter"),
        ("/v1/feeds/trades/messages", {}, 404, "known feeds: execution, sport_event"),
    ],
)
async def test_bad_requests_are_explained(
    gateway: Any, path: str, query: dict[str, str], status: int, words: str
) -> None:
    reply = await call(gateway, "GET", path, query)
    assert reply.status == status
    assert words in reply.json()["error"] + " " + reply.json()["detail"]


async def test_no_catalogue_yet_is_an_empty_page_and_postgres_down_is_503(
    gateway: Any, pg: Any, base_settings: Settings
) -> None:
    reply = await call(gateway, "GET", "/v1/feeds/sport_event/messages")
    assert reply.status == 200 and reply.json()["events"] == []
    await create_catalogue(pg, base_settings.db_schema)
    assert (await call(gateway, "GET", "/v1/feeds/sport_event/messages")).json()["has_more"] is False

    down = gateway_settings(base_settings, tokens="", database_url="postgresql://127.0.0.1:1/none")
    async with inprocess_gateway(down) as app:
        reply = await call(app, "GET", PATH)
        assert reply.status == 503 and reply.headers["retry-after"] == "5"
        assert reply.json()["error"] == "history unavailable"
