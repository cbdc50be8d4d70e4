"""GET /v1/feeds and GET /v1/messages/{id} against the real Redis and PostgreSQL: entries
written with the ingest Lua script, catalogue rows per the contract, driven via ASGI."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette

from services.sse_gateway import cursor
from services.sse_gateway.history import Archive
from shared import codec, scripts
from shared.connections import redis_client
from shared.feeds import FEEDS, message_id
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_gateway_access import TOKENS, bearer, call, gateway_settings, small_app
from tests.integration.test_gateway_helpers import Writer, archive, create_catalogue

EPOCH = "1764321000123"  # the execution JetStream stream's creation ms
SPORT_EPOCH = "1764321000456"  # the sport_event one's
EPOCHS = {"execution": EPOCH, "sport_event": SPORT_EPOCH}
BROKER_TIME, INGEST_TIME = "2026-11-28T09:00:00.000Z", "2026-11-28T09:00:00.005Z"


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
    redis: Any, prefix: str, feed: str, messages: list[dict[str, str]], epoch: str | None = None
) -> list[str]:
    """Append messages (their fields) once each with shared/lua/ingest_append.lua at the
    next seqs of the feed in `epoch` (contiguous, as JetStream numbers them), message id
    `<epoch>.<seq>`; their entry ids."""
    epoch = epoch or EPOCHS[feed]
    keys = Keys(prefix)
    current, seq = await redis.hmget(keys.meta(feed), ["epoch", "seq"])
    same = current is not None and (current.decode() if isinstance(current, bytes) else current) == epoch
    top = int(seq or 0) if same else 0  # a new epoch (a recreated JetStream stream) starts at 1
    batch = []
    for seq, fields in enumerate(messages, start=top + 1):
        mid = message_id(epoch, seq)
        batch.append((seq, mid, codec.entry_fields(mid, fields, BROKER_TIME, INGEST_TIME)))
    call_keys, argv = scripts.ingest_append_call(keys, feed, epoch, batch, 3600)
    result = await scripts.register(redis, "ingest_append")(keys=call_keys, args=argv)
    assert all(int(r[1]) == 1 for r in result), result
    return [r[0].decode() if isinstance(r[0], bytes) else r[0] for r in result]


async def archive_entry(pg: Any, schema: str, redis: Any, prefix: str, feed: str, stream_id: str) -> None:
    """Copy one stream entry into the catalogue as the archiver would."""
    [(entry_id, raw)] = await redis.xrange(Keys(prefix).stream(feed), min=stream_id, max=stream_id)
    text_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    await archive(pg, schema, feed, [(text_id, codec.str_entry(raw))])


@pytest.fixture
async def catalogue(base_settings: Settings, pg: Any) -> AsyncIterator[Archive]:
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
async def app(base_settings: Settings, str_redis: Any, catalogue: Archive) -> Starlette:
    return small_app(gateway_settings(base_settings, tokens=TOKENS), str_redis, catalogue)


@pytest.fixture
async def no_catalogue(base_settings: Settings) -> AsyncIterator[Archive]:
    """A catalogue nobody listens for (port 1): every read raises ArchiveUnavailable."""
    archive = Archive("postgresql://127.0.0.1:1/none", base_settings.db_schema, 1)
    yield archive
    await archive.close()


def mid(n: int, epoch: str = EPOCH) -> str:
    return message_id(epoch, n)


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
    ids = await append(redis, prefix, "execution", [execution(i) for i in range(1, 6)])
    assert ids == ["1-0", "2-0", "3-0", "4-0", "5-0"]  # the entry id is the seq
    await append(redis, prefix, "sport_event", [sport_event(1)])
    # Redis trimmed the oldest two: first id/seq move, the last ones do not
    await redis.xdel(Keys(prefix).stream("execution"), ids[0], ids[1])
    for stream_id in ids[2:4]:
        await archive_entry(pg, schema, redis, prefix, "execution", stream_id)

    reply = await call(app, "GET", "/v1/feeds", headers=bearer("tok-all"))
    assert reply.status == 200
    execution_feed, sport_feed = reply.json()["feeds"]
    assert execution_feed["name"] == "execution"
    assert execution_feed["epoch"] == EPOCH
    assert execution_feed["last_id"] == "5-0"
    assert execution_feed["last_seq"] == 5
    assert execution_feed["length"] == 3
    assert execution_feed["first_id"] == "3-0" and execution_feed["first_seq"] == 3
    assert execution_feed["archive"] == {"available": True, "last_seq": 4, "last_id": "4-0"}
    # the cursor that resumes after the latest entry, as /v1/stream reads it
    assert execution_feed["resume_latest"] == f"v2:execution.{EPOCH}.5"
    assert (sport_feed["epoch"], sport_feed["last_seq"], sport_feed["length"]) == (SPORT_EPOCH, 1, 1)
    assert cursor.parse(reply.json()["resume_latest"]) == {
        "execution": cursor.Position(EPOCH, 5),
        "sport_event": cursor.Position(SPORT_EPOCH, 1),
    }
    assert sport_feed["archive"]["last_seq"] is None  # nothing of it archived yet


async def test_feeds_without_the_meta_hash_read_the_stream(
    app: Starlette, redis: Any, base_settings: Settings
) -> None:
    prefix = base_settings.key_prefix
    await append(redis, prefix, "execution", [execution(i) for i in range(1, 4)])
    await redis.delete(Keys(prefix).meta("execution"))  # evicted
    reply = await call(app, "GET", "/v1/feeds", headers=bearer("tok-all"))
    feed = reply.json()["feeds"][0]
    assert (feed["epoch"], feed["last_seq"], feed["last_id"]) == (EPOCH, 3, "3-0")
    assert feed["resume_latest"] == f"v2:execution.{EPOCH}.3"


async def test_feeds_show_only_the_tokens_feeds(app: Starlette) -> None:
    reply = await call(app, "GET", "/v1/feeds", {"access_token": "tok-exec"})
    assert [f["name"] for f in reply.json()["feeds"]] == ["execution"]
    reply = await call(app, "GET", "/v1/feeds")
    assert reply.status == 401 and reply.json()["error"] == "unauthorized"


async def test_feeds_without_the_catalogue_still_answer(
    base_settings: Settings, redis: Any, no_catalogue: Archive
) -> None:
    app = small_app(gateway_settings(base_settings, tokens=""), redis, no_catalogue)
    await append(redis, base_settings.key_prefix, "execution", [execution(1)])
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
    [stream_id] = await append(redis, base_settings.key_prefix, "sport_event", [sport_event(7)])
    reply = await call(app, "GET", f"/v1/messages/{mid(1, SPORT_EPOCH)}", headers=bearer("tok-both"))
    assert reply.status == 200
    body = reply.json()
    assert body["feed"] == "sport_event" and body["stream_id"] == stream_id == "1-0"
    assert body["in_redis"] is True and body["malformed"] is False
    assert body["entry"]["id"] == stream_id
    assert body["entry"]["fields"] == {
        "seq": "1",
        "message_id": mid(1, SPORT_EPOCH),
        **sport_event(7),
        "broker_time": BROKER_TIME,
        "ingest_time": INGEST_TIME,
    }
    # the catalogue schema does not exist yet: not archived, not an error
    assert (body["archived"], body["row"]) == (False, None)
    # the same seq in another epoch (another feed's, or an older one) is another message
    assert (await call(app, "GET", f"/v1/messages/{mid(1)}", headers=bearer("tok-both"))).status == 404


async def test_message_archived_and_trimmed_from_redis(
    app: Starlette, redis: Any, pg: Any, base_settings: Settings
) -> None:
    prefix, schema = base_settings.key_prefix, base_settings.db_schema
    ids = await append(redis, prefix, "execution", [execution(i) for i in (1, 2)])
    await archive_entry(pg, schema, redis, prefix, "execution", ids[0])
    await redis.xdel(Keys(prefix).stream("execution"), ids[0])

    body = (await call(app, "GET", f"/v1/messages/{mid(1)}", headers=bearer("tok-exec"))).json()
    assert body["feed"] == "execution" and body["stream_id"] == "1-0"
    where = (body["in_redis"], body["entry"], body["archived"], body["table"])
    assert where == (False, None, True, "execution")
    row = body["row"]
    assert row["seq"] == 1 and row["epoch"] == EPOCH and row["stream_id"] == "1-0"
    assert row["message"] == codec.typed_message(
        FEEDS["execution"],
        {"seq": "1", "message_id": mid(1), **execution(1), "broker_time": BROKER_TIME,
         "ingest_time": INGEST_TIME},
    )
    assert row["broker_time"] == "2026-11-28T09:00:00Z"


async def test_malformed_message_in_redis_and_as_a_dead_letter_row(
    app: Starlette, redis: Any, pg: Any, base_settings: Settings
) -> None:
    prefix, schema = base_settings.key_prefix, base_settings.db_schema
    writer = Writer(redis, prefix, EPOCH)
    await writer.append_malformed("execution", "missing required field(s): price")  # seq 1
    body = (await call(app, "GET", f"/v1/messages/{mid(1)}", headers=bearer("tok-exec"))).json()
    assert (body["feed"], body["in_redis"], body["malformed"]) == ("execution", True, True)
    assert body["entry"]["fields"]["error"] == "missing required field(s): price"
    await archive_entry(pg, schema, redis, prefix, "execution", "1-0")
    await redis.xdel(Keys(prefix).stream("execution"), "1-0")
    body = (await call(app, "GET", f"/v1/messages/{mid(1)}", headers=bearer("tok-exec"))).json()
    assert (body["feed"], body["in_redis"], body["malformed"], body["table"]) == (
        "execution", False, True, "dead_letter"
    )
    assert (body["row"]["epoch"], body["row"]["seq"], body["row"]["feed"]) == (EPOCH, 1, "execution")
    assert base64.b64decode(body["row"]["payload_b64"]) == b"\x0a\x02no"


async def test_dead_letter_of_the_old_layout_is_found_for_all_feed_tokens(
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
    assert body["feed"] == "dead_letter" and body["archived"] is True and body["malformed"] is True
    assert body["row"]["error"] == "missing required field(s): price"
    assert base64.b64decode(body["row"]["payload_b64"]) == b"\x0a\x04AAPL"
    # it names no feed: a token for one feed does not see it
    assert (await call(app, "GET", f"/v1/messages/{mid(9)}", headers=bearer("tok-exec"))).status == 404


async def test_unknown_message_is_404_and_malformed_is_400(app: Starlette, pg: Any) -> None:
    reply = await call(app, "GET", f"/v1/messages/{mid(404)}", headers=bearer("tok-all"))
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"
    assert "searched: execution, sport_event, dead_letter" in reply.json()["detail"]
    # A seq of 20 digits is past any stream entry id Redis reads (it was a 503 "Redis is
    # unreachable" when XRANGE refused it; found by schemathesis).
    bad_ids = ("abc", "123", "1.2.3", "1764321000123-4", "-1.2", "1." + "9" * 30, "1764321000123." + "9" * 20)
    unicode_digits = ("1764321000123.\u0664", "\uff11.2", "1.2%0A")  # Arabic-Indic 4, fullwidth 1, "1.2\n"
    for bad in bad_ids + unicode_digits:
        reply = await call(app, "GET", f"/v1/messages/{bad}", headers=bearer("tok-all"))
        assert reply.status == 400, bad
        assert reply.json()["error"] == "bad_message_id"
        assert "expected <stream created unix ms>.<stream seq>" in reply.json()["detail"]


async def test_message_of_a_feed_outside_the_token_is_not_revealed(
    app: Starlette, redis: Any, base_settings: Settings
) -> None:
    await append(redis, base_settings.key_prefix, "sport_event", [sport_event(5)])
    reply = await call(app, "GET", f"/v1/messages/{mid(1, SPORT_EPOCH)}", headers=bearer("tok-exec"))
    assert reply.status == 404 and "searched: execution)" in reply.json()["detail"]
    assert (await call(app, "GET", f"/v1/messages/{mid(1, SPORT_EPOCH)}")).status == 401


async def test_message_not_in_redis_with_catalogue_down_is_503(
    base_settings: Settings, redis: Any, no_catalogue: Archive
) -> None:
    app = small_app(gateway_settings(base_settings, tokens=""), redis, no_catalogue)
    reply = await call(app, "GET", f"/v1/messages/{mid(1)}")
    assert reply.status == 503 and reply.headers["retry-after"] == "5"
    assert "catalogue cannot be searched" in reply.json()["detail"]
    # in Redis: answered, saying the archive state is unknown
    await append(redis, base_settings.key_prefix, "execution", [execution(1)])
    body = (await call(app, "GET", f"/v1/messages/{mid(1)}")).json()
    assert body["in_redis"] is True and body["archived"] is False
    assert "unreachable" in body["archive_detail"]


async def test_resume_latest_cursor_resumes_a_real_stream_right_after_the_latest_entries(
    base_settings: Settings, redis: Any
) -> None:
    import aiohttp

    from tests.integration.test_gateway_helpers import inprocess_gateway, open_stream

    prefix = base_settings.key_prefix
    await append(redis, prefix, "execution", [execution(i) for i in range(1, 4)])
    await append(redis, prefix, "sport_event", [sport_event(i) for i in range(10, 12)])
    async with inprocess_gateway(gateway_settings(base_settings, tokens="")) as app:
        port = app.state.port
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/v1/feeds") as reply:
            resume = (await reply.json())["resume_latest"]
        stream = await open_stream(port, "feeds=execution,sport_event", {"Last-Event-ID": resume})
        try:
            assert stream.status == 200
            await append(redis, prefix, "sport_event", [sport_event(12)])
            await append(redis, prefix, "execution", [execution(4)])
            first, second = await stream.collect(2)
            assert (first.event, first.json()["seq"]) == ("sport_event", 3)
            assert (second.event, second.json()["seq"]) == ("execution", 4)
        finally:
            stream.close()
