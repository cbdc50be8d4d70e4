"""`fanout status` against the real servers, and with a server down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import asyncpg
from redis.asyncio import Redis

from fanout.status import StatusSettings, collect, render
from services.archiver.service import Archiver
from shared.feeds import DEAD_LETTER, EXECUTION, SPORT_EVENT
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_archiver import append_feed, archiver_settings, rows_reach, running


def _status_settings(base: Settings, **overrides: object) -> StatusSettings:
    values = {f.name: getattr(base, f.name) for f in fields(Settings)} | overrides
    return StatusSettings(**values)


async def test_status_reports_streams_lag_rows_and_dead_letters(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    await append_feed(redis, base_settings, EXECUTION, 0, 30)
    async with running(Archiver(archiver_settings(base_settings))):
        await rows_reach(pg, base_settings.db_schema, "execution", 30)
    ids = await append_feed(redis, base_settings, SPORT_EVENT, 100, 5)  # after the archiver stopped

    report = await collect(_status_settings(base_settings))
    assert set(report["unreachable"]) <= {"nats"}  # the JetStream stream need not exist
    execution, sport = report["feeds"]["execution"], report["feeds"]["sport_event"]
    assert execution["length"] == 30 and execution["last_seq"] == 30 and execution["epoch"] == "ep1"
    assert execution["rows"] == 30 and execution["archive_lag_entries"] == 0
    assert execution["archive_lag_seconds"] == 0
    assert sport["length"] == 5 and sport["first_id"] == ids[0] and sport["last_id"] == ids[-1]
    assert sport["archive_lag_entries"] == 5 and sport["archive_lag_seconds"] > 0 and sport["rows"] == 0
    assert report["dead_letters"]["length"] == 0 and report["dead_letters"]["rows"] == {}
    assert report["jetstream"] == {
        "stream": base_settings.js_stream,
        "error": "stream not found (the ingestor creates it)",
    }
    text = render(report)
    assert "execution" in text and "dead letters: stream 0 entries" in text
    assert await redis.exists(Keys(base_settings.key_prefix).stream(DEAD_LETTER))


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
