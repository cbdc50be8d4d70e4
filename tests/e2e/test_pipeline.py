"""End to end: the feed simulator -> NATS JetStream -> the ingestor -> Redis -> the
archiver -> PostgreSQL. Every published message is catalogued exactly once: as a row of
its feed, or (malformed) as an ingestor dead letter."""

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

        async def stream_exists() -> bool:
            try:
                await js.stream_info(base_settings.js_stream)
            except NotFoundError:
                return False
            return True

        await eventually(stream_exists, what="the ingestor to create the JetStream stream")
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
            info = await js.stream_info(base_settings.js_stream)
            published = info.state.messages
            assert published == 2 * PER_FEED  # JetStream captured every published message

            schema = base_settings.db_schema

            async def all_catalogued() -> bool:
                counts = [
                    await count_rows(pg, schema, t) for t in ("execution", "sport_event", "dead_letter")
                ]
                return sum(counts) >= published

            await eventually(all_catalogued, within=120, what=f"{published} messages catalogued")
        ids = [
            r[0]
            for r in await pg.fetch(
                f'SELECT message_id FROM "{schema}".execution UNION ALL '
                f'SELECT message_id FROM "{schema}".sport_event UNION ALL '
                f'SELECT message_id FROM "{schema}".dead_letter'
            )
        ]
        assert len(ids) == len(set(ids)) == published  # no message twice, across every table
        seqs = sorted(int(i.rsplit(".", 1)[1]) for i in ids)
        assert seqs == list(range(info.state.first_seq, info.state.last_seq + 1))  # none missing
        dead = await pg.fetch(f'SELECT source, feed, error, payload FROM "{schema}".dead_letter')
        assert dead, "the malformed share should have produced dead letters"
        assert {d["source"] for d in dead} == {"ingestor"}
        assert all(d["error"] and d["payload"] is not None for d in dead)

        values = {f.name: getattr(base_settings, f.name) for f in fields(Settings)}
        report = await collect(StatusSettings(**values))
        assert report["unreachable"] == {}
        assert report["jetstream"]["messages"] == published
        assert report["jetstream"]["consumer"]["ack_floor"] == info.state.last_seq
        rows = sum(report["feeds"][f]["rows"] for f in ("execution", "sport_event"))
        assert rows + report["dead_letters"]["rows"]["ingestor"] == published
    finally:
        ingestor.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(ingestor.communicate(), 30)
        assert ingestor.returncode == 0, err.decode()[-2000:]
