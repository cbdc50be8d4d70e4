"""Several workers of one kind on one host with default settings: the second finds the
ops port taken, listens on a free one and says which."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from shared.settings import Settings
from tests.integration.test_archiver_process import _ops_url, spawn

pytestmark = pytest.mark.slow

__all__ = ["spawn"]  # the fixture, shared with test_archiver_process


async def test_two_archivers_with_default_settings_both_run_and_serve_healthz(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection, spawn: object
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FANOUT_ARCHIVE_HTTP"}  # the default, 127.0.0.1:9102
    env |= {
        "FANOUT_KEY_PREFIX": base_settings.key_prefix,
        "FANOUT_DB_SCHEMA": base_settings.db_schema,
        "FANOUT_SUBJECT_PREFIX": base_settings.subject_prefix,
        "FANOUT_LOG_FORMAT": "json",
    }
    procs, logs, urls = [], [], []
    for _ in range(2):
        proc = await spawn(env)  # type: ignore[operator]
        log: list[bytes] = []
        urls.append(await _ops_url(proc, log))
        procs.append(proc)
        logs.append(log)
    assert urls[0] != urls[1]
    second = [json.loads(line) for line in logs[1]]
    taken = [r for r in second if r["msg"].startswith("ops port taken")]
    assert taken and taken[0]["level"] == "warning" and taken[0]["taken"] == "127.0.0.1:9102", logs[1]
    async with aiohttp.ClientSession() as http:
        for url in urls:
            async with http.get(f"{url}/healthz") as health:
                assert health.status == 200
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
