"""GET /v1/feeds and GET /v1/messages/{id} against the real Redis and PostgreSQL: entries
written with the ingest Lua script, catalogue rows per the contract, driven via ASGI."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette

from services.sse_gateway import cursor
from services.sse_gateway.history import Archive
from shared import codec, scripts
from shared.connections import redis_client
from shared.feeds import FEEDS
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_gateway_access import TOKENS, bearer, call, gateway_settings, small_app

EPOCH = "e1764321000"


def execution(i: int) -> dict[str, str]:
    return {
        "symbol": "AAPL" if i % 2 else "MSFT",
        "market": "NASDAQ",
        "price": codec.float32_text(100.5 + i),
        "quantity": "10",
        "executionEpoch": str(1764321000 + i),
        "stateSymbol": "CA",
    }


def sport_event(i: int) -> dict[str, str]:
    return {"sport": "TENNIS", "match_title": f"Match {i}", "data_event": "point"}


async def append(
    redis: Any, prefix: str, feed: str, messages: list[tuple[str, dict[str, str]]], epoch: str = EPOCH
) -> list[str]:
    """Append (message_id, fields) pairs once each with shared/lua/ingest_append.lua; entry ids."""
    keys = Keys(prefix)
    script = scripts.register(redis, "ingest_append")
    args: list[Any] = [3600, epoch]
    for n, (message_id, fields) in enumerate(messages, start=1):
        flat = codec.entry_fields(message_id, fields, "2026-11-28T09:00:00.000Z", "2026-11-28T09:00:00.005Z")
        args += [n, len(flat), *flat]
    result = await script(
        keys=[keys.stream(feed), keys.meta(feed), *(keys.dedup(feed, m) for m, _ in messages)], args=args
    )
    return [r[0].decode() if isinstance(r[0], bytes) else r[0] for r in result]


async def create_catalogue(pg: Any, schema: str) -> None:
    """The catalogue tables per the contract (the archiver owns the real migration)."""
    common = """message_id text PRIMARY KEY, epoch text NOT NULL, seq bigint NOT NULL,
        stream_id text NOT NULL, entry_ms bigint NOT NULL, entry_n bigint NOT NULL,
        broker_time timestamptz NOT NULL, ingest_time timestamptz NOT NULL,
        archived_at timestamptz NOT NULL DEFAULT now()"""
    await pg.execute(f'CREATE SCHEMA "{schema}"')
    await pg.execute(
        f"""CREATE TABLE "{schema}".execution ({common}, symbol text NOT NULL, market text NOT NULL,
        price real NOT NULL, quantity real NOT NULL, execution_epoch bigint NOT NULL,
        state_symbol text NOT NULL, message jsonb NOT NULL)"""
    )
    await pg.execute(
        f"""CREATE TABLE "{schema}".sport_event ({common}, sport text NOT NULL, match_title text NOT NULL,
        data_event text NOT NULL, message jsonb NOT NULL)"""
    )
    await pg.execute(
        f"""CREATE TABLE "{schema}".dead_letter (id bigserial PRIMARY KEY, source text NOT NULL,
        feed text, message_id text, subject text, broker_seq bigint, stream_id text, error text NOT NULL,
        payload bytea, fields jsonb, broker_time timestamptz, ingest_time timestamptz,
        archived_at timestamptz NOT NULL DEFAULT now(), UNIQUE (source, message_id))"""
    )


async def archive_entry(pg: Any, schema: str, redis: Any, prefix: str, feed: str, stream_id: str) -> None:
    """Copy one stream entry into the catalogue as the archiver would."""
    [(_, raw)] = await redis.xrange(Keys(prefix).stream(feed), min=stream_id, max=stream_id)
    entry = codec.str_entry(raw)
    message = codec.typed_message(FEEDS[feed], entry)
    ms, n = (int(x) for x in stream_id.split("-"))
    common = [
        entry["message_id"], EPOCH, int(entry["seq"]), stream_id, ms, n,
        codec.parse_iso(entry["broker_time"]), codec.parse_iso(entry["ingest_time"]),
    ]
    if feed == "execution":
        await pg.execute(
            f'INSERT INTO "{schema}".execution (message_id, epoch, seq, stream_id, entry_ms, entry_n, '
            "broker_time, ingest_time, symbol, market, price, quantity, execution_epoch, state_symbol, "
            "message) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15)",
            *common, message["symbol"], message["market"], message["price"], message["quantity"],
            message["executionEpoch"], message["stateSymbol"], json.dumps(message),
        )
    else:
        await pg.execute(
            f'INSERT INTO "{schema}".sport_event (message_id, epoch, seq, stream_id, entry_ms, entry_n, '
            "broker_time, ingest_time, sport, match_title, data_event, message) "
            "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
            *common, message["sport"], message["match_title"], message["data_event"], json.dumps(message),
        )


@pytest.fixture
async def archive(base_settings: Settings, pg: Any) -> AsyncIterator[Archive]:
    archive = Archive(base_settings.database_url, base_settings.db_schema, 2)
    yield archive
    await archive.close()


@pytest.fixture
async def str_redis(base_settings: Settings) -> AsyncIterator[Any]:
    """A client like the gateway's own (decode_responses=True)."""
    client = redis_client(base_settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def app(base_settings: Settings, str_redis: Any, archive: Archive) -> Starlette:
    return small_app(gateway_settings(base_settings, tokens=TOKENS), str_redis, archive)


@pytest.fixture
async def no_catalogue(base_settings: Settings) -> AsyncIterator[Archive]:
    """A catalogue nobody listens for (port 1): every read raises ArchiveUnavailable."""
    archive = Archive("postgresql://127.0.0.1:1/none", base_settings.db_schema, 1)
    yield archive
    await archive.close()


def mid(n: int) -> str:
    return f"1764321000123.{n}"


# --- /v1/feeds ------------------------------------------------------------------------------


async def test_feeds_before_anything_was_ingested(app: Starlette) -> None:
    reply = await call(app, "GET", "/v1/feeds", headers=bearer("tok-all"))
    assert reply.status == 200
    feeds = reply.json()["feeds"]
    assert [f["name"] for f in feeds] == ["execution", "sport_event"]
    for f in feeds:
        state = (f["epoch"], f["last_id"], f["last_seq"], f["length"], f["first_id"])
        assert state == (None, None, 0, 0, None)
        assert f["resume_latest"] is None
    assert reply.json()["resume_latest"] is None


async def test_feeds_show_epoch_ids_seqs_length_and_archive(
    app: Starlette, redis: Any, pg: Any, base_settings: Settings
) -> None:
    prefix, schema = base_settings.key_prefix, base_settings.db_schema
    ids = await append(redis, prefix, "execution", [(mid(i), execution(i)) for i in range(1, 6)])
    await append(redis, prefix, "sport_event", [(mid(100), sport_event(1))])
    # Redis trimmed the oldest two: first id/seq move, the last ones do not
    await redis.xdel(Keys(prefix).stream("execution"), ids[0], ids[1])
    await create_catalogue(pg, schema)
    for stream_id in ids[2:4]:
        await archive_entry(pg, schema, redis, prefix, "execution", stream_id)

    reply = await call(app, "GET", "/v1/feeds", headers=bearer("tok-all"))
    assert reply.status == 200
    execution_feed, sport_feed = reply.json()["feeds"]
    assert execution_feed["name"] == "execution"
    assert execution_feed["epoch"] == EPOCH
    assert execution_feed["last_id"] == ids[-1]
    assert execution_feed["last_seq"] == 5
    assert execution_feed["length"] == 3
    assert execution_feed["first_id"] == ids[2] and execution_feed["first_seq"] == 3
    assert execution_feed["archive"] == {"available": True, "last_seq": 4, "last_id": ids[3]}
    # the cursor that resumes after the latest entry, as /v1/stream reads it
    assert cursor.parse(execution_feed["resume_latest"]) == {
        "execution": cursor.Position(EPOCH, ids[-1], 5)
    }
    assert (sport_feed["last_seq"], sport_feed["length"]) == (1, 1)
    assert cursor.parse(reply.json()["resume_latest"]) == {
        "execution": cursor.Position(EPOCH, ids[-1], 5),
        "sport_event": cursor.Position(EPOCH, sport_feed["last_id"], 1),
    }
    assert sport_feed["archive"]["last_seq"] is None  # nothing of it archived yet


async def test_feeds_show_only_the_tokens_feeds(app: Starlette) -> None:
    reply = await call(app, "GET", "/v1/feeds", {"access_token": "tok-exec"})
    assert [f["name"] for f in reply.json()["feeds"]] == ["execution"]
    reply = await call(app, "GET", "/v1/feeds")
    assert reply.status == 401 and reply.json()["error"] == "unauthorized"


async def test_feeds_without_the_catalogue_still_answer(
    base_settings: Settings, redis: Any, no_catalogue: Archive
) -> None:
    app = small_app(gateway_settings(base_settings, tokens=""), redis, no_catalogue)
    await append(redis, base_settings.key_prefix, "execution", [(mid(1), execution(1))])
    reply = await call(app, "GET", "/v1/feeds")
    assert reply.status == 200
    feed = reply.json()["feeds"][0]
    assert feed["last_seq"] == 1
    assert feed["archive"]["available"] is False
    assert "unreachable" in feed["archive"]["detail"]


# --- /v1/messages/{id} ---------------------------------------------------------------------


async def test_message_in_redis_not_yet_archived(
    app: Starlette, redis: Any, pg: Any, base_settings: Settings
) -> None:
    [stream_id] = await append(redis, base_settings.key_prefix, "sport_event", [(mid(7), sport_event(7))])
    reply = await call(app, "GET", f"/v1/messages/{mid(7)}", headers=bearer("tok-both"))
    assert reply.status == 200
    body = reply.json()
    assert body["feed"] == "sport_event" and body["stream_id"] == stream_id
    assert body["in_redis"] is True
    assert body["entry"]["id"] == stream_id
    assert body["entry"]["fields"] == {
        "seq": "1",
        "message_id": mid(7),
        **sport_event(7),
        "broker_time": "2026-11-28T09:00:00.000Z",
        "ingest_time": "2026-11-28T09:00:00.005Z",
    }
    # the catalogue schema does not exist yet: not archived, not an error
    assert (body["archived"], body["row"]) == (False, None)


async def test_message_archived_and_trimmed_from_redis(
    app: Starlette, redis: Any, pg: Any, base_settings: Settings
) -> None:
    prefix, schema = base_settings.key_prefix, base_settings.db_schema
    ids = await append(redis, prefix, "execution", [(mid(i), execution(i)) for i in (1, 2)])
    await create_catalogue(pg, schema)
    await archive_entry(pg, schema, redis, prefix, "execution", ids[0])
    await redis.xdel(Keys(prefix).stream("execution"), ids[0])

    body = (await call(app, "GET", f"/v1/messages/{mid(1)}", headers=bearer("tok-exec"))).json()
    assert body["feed"] == "execution" and body["stream_id"] == ids[0]
    assert (body["in_redis"], body["entry"], body["archived"]) == (False, None, True)
    row = body["row"]
    assert row["seq"] == 1 and row["epoch"] == EPOCH and row["stream_id"] == ids[0]
    assert row["message"] == codec.typed_message(
        FEEDS["execution"],
        {"seq": "1", "message_id": mid(1), **execution(1),
         "broker_time": "2026-11-28T09:00:00.000Z", "ingest_time": "2026-11-28T09:00:00.005Z"},
    )
    assert row["broker_time"] == "2026-11-28T09:00:00Z"

    # dedup key expired too: found through the catalogue alone
    await redis.delete(Keys(prefix).dedup("execution", mid(1)))
    body = (await call(app, "GET", f"/v1/messages/{mid(1)}", headers=bearer("tok-exec"))).json()
    assert (body["feed"], body["stream_id"], body["archived"]) == ("execution", ids[0], True)


async def test_dead_lettered_message_is_found_for_all_feed_tokens(
    app: Starlette, redis: Any, pg: Any, base_settings: Settings
) -> None:
    schema = base_settings.db_schema
    await create_catalogue(pg, schema)
    await pg.execute(
        f'INSERT INTO "{schema}".dead_letter (source, message_id, subject, broker_seq, error, payload) '
        "VALUES ('ingestor', $1, 'execution', 9, 'missing required field(s): price', $2)",
        mid(9), b"\x0a\x04AAPL",
    )
    body = (await call(app, "GET", f"/v1/messages/{mid(9)}", headers=bearer("tok-all"))).json()
    assert body["feed"] == "dead_letter" and body["archived"] is True
    assert body["row"]["error"] == "missing required field(s): price"
    assert base64.b64decode(body["row"]["payload_b64"]) == b"\x0a\x04AAPL"
    # a token for one feed does not see dead letters
    assert (await call(app, "GET", f"/v1/messages/{mid(9)}", headers=bearer("tok-exec"))).status == 404


async def test_unknown_message_is_404_and_malformed_is_400(app: Starlette, pg: Any) -> None:
    reply = await call(app, "GET", f"/v1/messages/{mid(404)}", headers=bearer("tok-all"))
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"
    assert "searched: execution, sport_event, dead_letter" in reply.json()["detail"]
    bad_ids = ("abc", "123", "1.2.3", "1764321000123-4", "-1.2", "1." + "9" * 30)
    unicode_digits = ("1764321000123.\u0664", "\uff11.2", "1.2%0A")  # Arabic-Indic 4, fullwidth 1, "1.2\n"
    for bad in bad_ids + unicode_digits:
        reply = await call(app, "GET", f"/v1/messages/{bad}", headers=bearer("tok-all"))
        assert reply.status == 400, bad
        assert reply.json()["error"] == "bad_message_id"
        assert "expected <stream created unix ms>.<stream seq>" in reply.json()["detail"]


async def test_message_of_a_feed_outside_the_token_is_not_revealed(
    app: Starlette, redis: Any, base_settings: Settings
) -> None:
    await append(redis, base_settings.key_prefix, "sport_event", [(mid(5), sport_event(5))])
    reply = await call(app, "GET", f"/v1/messages/{mid(5)}", headers=bearer("tok-exec"))
    assert reply.status == 404 and "searched: execution)" in reply.json()["detail"]
    assert (await call(app, "GET", f"/v1/messages/{mid(5)}")).status == 401


async def test_message_not_in_redis_with_catalogue_down_is_503(
    base_settings: Settings, redis: Any, no_catalogue: Archive
) -> None:
    app = small_app(gateway_settings(base_settings, tokens=""), redis, no_catalogue)
    reply = await call(app, "GET", f"/v1/messages/{mid(1)}")
    assert reply.status == 503 and reply.headers["retry-after"] == "5"
    assert "catalogue cannot be searched" in reply.json()["detail"]
    # in Redis: answered, saying the archive state is unknown
    await append(redis, base_settings.key_prefix, "execution", [(mid(1), execution(1))])
    body = (await call(app, "GET", f"/v1/messages/{mid(1)}")).json()
    assert body["in_redis"] is True and body["archived"] is False
    assert "unreachable" in body["archive_detail"]


async def test_resume_latest_cursor_resumes_a_real_stream_right_after_the_latest_entries(
    base_settings: Settings, redis: Any
) -> None:
    import aiohttp

    from tests.integration.test_gateway_helpers import inprocess_gateway, open_stream

    prefix = base_settings.key_prefix
    await append(redis, prefix, "execution", [(mid(i), execution(i)) for i in range(1, 4)])
    await append(redis, prefix, "sport_event", [(mid(i), sport_event(i)) for i in range(10, 12)])
    async with inprocess_gateway(gateway_settings(base_settings, tokens="")) as app:
        port = app.state.port
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/v1/feeds") as reply:
            resume = (await reply.json())["resume_latest"]
        stream = await open_stream(port, "feeds=execution,sport_event", {"Last-Event-ID": resume})
        try:
            assert stream.status == 200
            await append(redis, prefix, "sport_event", [(mid(12), sport_event(12))])
            await append(redis, prefix, "execution", [(mid(4), execution(4))])
            first, second = await stream.collect(2)
            assert (first.event, first.json()["seq"]) == ("sport_event", 3)
            assert (second.event, second.json()["seq"]) == ("execution", 4)
        finally:
            stream.close()
