"""`fanout status` against the real servers, and with a server down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import fields
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from fanout.status import StatusSettings, collect, render
from services.archiver.service import Archiver
from shared.feeds import DEAD_LETTER, EXECUTION, FEED_NAMES, SPORT_EVENT, js_stream_name
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_archiver import (
    append,
    append_feed,
    archiver_settings,
    broker_seconds,
    malformed_entry,
    rows_reach,
    running,
)


def _status_settings(base: Settings, **overrides: object) -> StatusSettings:
    values = {f.name: getattr(base, f.name) for f in fields(Settings)} | overrides
    return StatusSettings(**values)


@pytest.fixture
async def feed_streams(base_settings: Settings, nats: Any) -> AsyncIterator[dict[str, str]]:
    """The per-feed JetStream streams (contract v2), created here; {feed: epoch}."""
    from nats.js.errors import NotFoundError

    js = nats.jetstream()
    epochs = {}
    for feed in FEED_NAMES:
        name = js_stream_name(base_settings.js_stream, feed)
        info = await js.add_stream(name=name, subjects=[base_settings.subject(feed)])
        epochs[feed] = str(int(info.created.timestamp() * 1000))
    yield epochs
    for feed in FEED_NAMES:
        try:
            await js.delete_stream(js_stream_name(base_settings.js_stream, feed))
        except NotFoundError:
            pass


async def test_status_reports_positions_lag_rows_and_jetstream(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection, nats: Any, feed_streams: dict[str, str]
) -> None:
    s = base_settings
    js = nats.jetstream()
    for i in range(5):
        await js.publish(s.subject("execution"), f"m{i}".encode())
    sub = await js.pull_subscribe(
        s.subject("execution"), durable="ingestor", stream=js_stream_name(s.js_stream, "execution")
    )
    for msg in await sub.fetch(3, timeout=5):
        await msg.ack_sync()

    epoch = feed_streams["execution"]
    await append_feed(redis, s, EXECUTION, 1, 29, epoch=epoch)
    await append(redis, s, "execution", [(30, malformed_entry(30, epoch=epoch))], epoch=epoch)
    async with running(Archiver(archiver_settings(s))):
        await rows_reach(pg, s.db_schema, "execution", 29)
        await rows_reach(pg, s.db_schema, "dead_letter", 1)
    # A stream rebuilt from seq 100 after the archiver stopped: 5 entries not archived.
    ids = await append_feed(redis, s, SPORT_EVENT, 100, 5, epoch=feed_streams["sport_event"])

    report = await collect(_status_settings(s))
    assert report["unreachable"] == {}
    execution, sport = report["feeds"]["execution"], report["feeds"]["sport_event"]
    assert (execution["first_seq"], execution["last_seq"], execution["length"]) == (1, 30, 30)
    assert execution["epoch"] == epoch and execution["meta_first_seq"] == 1
    assert execution["rows"] == 29 and execution["archive_lag_entries"] == 0
    assert execution["archive_lag_seconds"] == 0
    assert (sport["first_seq"], sport["last_seq"], sport["meta_first_seq"]) == (100, 104, 100)
    assert ids == [f"{seq}-0" for seq in range(100, 105)]
    assert sport["archive_lag_entries"] == 5 and sport["archive_group"] and sport["rows"] == 0
    # The lag in seconds is the oldest unarchived entry's age by its broker_time.
    assert sport["archive_lag_seconds"] == pytest.approx(time.time() - broker_seconds(100), abs=60)
    assert report["dead_letters"]["rows"] == {"ingestor": 1}
    assert "legacy_stream" not in report["dead_letters"]
    jet = report["jetstream"]["execution"]
    assert jet["stream"] == js_stream_name(s.js_stream, "execution") and jet["epoch"] == epoch
    assert (jet["first_seq"], jet["last_seq"], jet["messages"]) == (1, 5, 5)
    assert jet["consumer"] == {"name": "ingestor", "pending": 2, "ack_pending": 0, "ack_floor": 3}
    assert report["jetstream"]["sport_event"]["consumer"]["error"] == "consumer not found"
    assert "legacy" not in report["jetstream"]
    text = render(report)
    assert f"execution    {epoch}" in text and "1..30" in text and "100..104" in text
    assert "2 pending, ack floor 3" in text and "dead letters: 1 rows (ingestor 1)" in text
    assert not await redis.exists(Keys(s.key_prefix).stream(DEAD_LETTER))


async def test_status_names_the_retired_stream_and_the_legacy_jetstream_stream(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    s = base_settings
    await redis.xadd(Keys(s.key_prefix).stream(DEAD_LETTER), {"message_id": "x.1", "error": "e"})
    await nats.jetstream().add_stream(name=s.js_stream, subjects=[s.subject(f) for f in FEED_NAMES])
    report = await collect(_status_settings(s))
    assert report["dead_letters"]["legacy_stream"]["length"] == 1
    assert report["jetstream"]["legacy"]["messages"] == 0
    assert report["jetstream"]["execution"]["error"] == "stream not found (the ingestor creates it)"
    text = render(report)
    assert "still holds 1 entries" in text and f"legacy jetstream stream {s.js_stream}" in text


def test_status_with_servers_down_says_so_without_a_traceback(base_settings: Settings) -> None:
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "DATABASE_URL": "postgresql://127.0.0.1:1/test",
        "NATS_URL": "nats://127.0.0.1:1",
        "FANOUT_KEY_PREFIX": base_settings.key_prefix,
    }
    for extra in ([], ["--json"]):
        done = subprocess.run(
            [sys.executable, "-m", "fanout.cli", "status", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert "Traceback" not in done.stdout + done.stderr
        if extra:
            assert set(json.loads(done.stdout)["unreachable"]) == {"redis", "postgres", "nats"}
        else:
            for server in ("redis", "postgres", "nats"):
                assert f"{server}: unreachable" in done.stdout
