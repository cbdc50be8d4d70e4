"""End to end: the feed simulator -> NATS JetStream -> the ingestor -> Redis -> the
archiver -> PostgreSQL. Every published message is catalogued exactly once, at its
JetStream (epoch, seq): as a row of its feed, or (malformed) as an ingestor dead letter."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import fields

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from redis.asyncio import Redis

from fanout.status import StatusSettings, collect
from services.archiver.service import Archiver
from shared.feeds import FEED_NAMES, epoch_of, js_stream_name
from shared.settings import Settings
from tests.integration.test_archiver import archiver_settings, count_rows, eventually, running

pytestmark = pytest.mark.slow

PER_FEED = 1500


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "FANOUT_KEY_PREFIX": settings.key_prefix,
        "FANOUT_SUBJECT_PREFIX": settings.subject_prefix,
        "FANOUT_JS_STREAM": settings.js_stream,
        "FANOUT_DB_SCHEMA": settings.db_schema,
        "FANOUT_INGEST_HTTP": "127.0.0.1:0",
        "FANOUT_FEEDS_HTTP": "",
        "FANOUT_LOG_FORMAT": "json",
    }


async def test_every_published_message_is_catalogued_exactly_once(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection, nats: NATS
) -> None:
    env = _env(base_settings)
    ingestor = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fanout.cli",
        "ingest",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        js = nats.jetstream()

        streams = {feed: js_stream_name(base_settings.js_stream, feed) for feed in FEED_NAMES}

        async def streams_exist() -> bool:
            try:
                for stream in streams.values():
                    await js.stream_info(stream)
            except NotFoundError:
                return False
            return True

        await eventually(streams_exist, what="the ingestor to create the JetStream streams")
        async with running(Archiver(archiver_settings(base_settings))):
            feeds = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fanout.cli",
                "feeds",
                "--rate",
                "0",
                "--count",
                str(PER_FEED),
                "--malformed-share",
                "0.05",
                "--seed",
                "7",
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(feeds.communicate(), 120)
            assert feeds.returncode == 0, err.decode()[-2000:]
            infos = {feed: await js.stream_info(stream) for feed, stream in streams.items()}
            assert all(i.state.messages == PER_FEED for i in infos.values())  # JetStream captured each
            published = 2 * PER_FEED

            schema = base_settings.db_schema

            async def all_catalogued() -> bool:
                counts = [
                    await count_rows(pg, schema, t) for t in ("execution", "sport_event", "dead_letter")
                ]
                return sum(counts) >= published

            await eventually(all_catalogued, within=120, what=f"{published} messages catalogued")
        for feed, info in infos.items():
            assert info.created is not None
            epoch = epoch_of(info.created)
            rows = await pg.fetch(
                f'SELECT message_id, epoch, seq FROM "{schema}"."{feed}" UNION ALL '
                f'SELECT message_id, epoch, seq FROM "{schema}".dead_letter WHERE feed = $1',
                feed,
            )
            # No message twice, none missing: every JetStream seq of the feed once, at its id.
            assert sorted(r["seq"] for r in rows) == list(
                range(info.state.first_seq, info.state.last_seq + 1)
            )
            assert all(r["epoch"] == epoch and r["message_id"] == f"{epoch}.{r['seq']}" for r in rows)
        dead = await pg.fetch(f'SELECT source, feed, error, payload FROM "{schema}".dead_letter')
        assert dead, "the malformed share should have produced dead letters"
        assert {d["source"] for d in dead} == {"ingestor"}
        assert all(d["error"] and d["payload"] is not None for d in dead)

        values = {f.name: getattr(base_settings, f.name) for f in fields(Settings)}
        report = await collect(StatusSettings(**values))
        assert report["unreachable"] == {}
        for feed, info in infos.items():
            assert report["jetstream"][feed]["messages"] == PER_FEED
            assert report["jetstream"][feed]["consumer"]["ack_floor"] == info.state.last_seq
        rows = sum(report["feeds"][f]["rows"] for f in ("execution", "sport_event"))
        assert rows + report["dead_letters"]["rows"]["ingestor"] == published
    finally:
        ingestor.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(ingestor.communicate(), 30)
        assert ingestor.returncode == 0, err.decode()[-2000:]
