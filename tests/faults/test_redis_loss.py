"""Redis comes back empty (it ran without persistence): nothing silently lost or repeated.

- the ingestor notices that Redis is behind what it already acked to JetStream and
  replays the missing span from JetStream: every message is in the feed stream again,
  exactly once, under a new epoch;
- the gateway tells a subscriber whose cursor names the old epoch with an
  `event: reset` (asked epoch, current epoch, where it resumes), then streams on.

A private Redis without persistence on a free port; NATS is the machine's (isolated
stream and subjects); the ingestor and the gateway run as subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fanout.servers import RedisServer, free_port
from shared import codec
from shared.keys import Keys
from shared.proto import execution_pb2
from shared.settings import Settings
from tests.faults.harness import Service, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def payload(i: int) -> bytes:
    return execution_pb2.execution(
        symbol="AAPL", market="NASDAQ", price=100 + i, quantity=1, executionEpoch=i, stateSymbol="CA"
    ).SerializeToString()


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    root = Path(tempfile.mkdtemp(prefix="fanout-redis-loss-"))
    # No AOF, no RDB: a restart loses everything.
    server = RedisServer(root / "redis", extra_args=["--appendonly", "no", "--save", ""])
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


async def stream_entries(redis: Any, key: str) -> list[dict[str, str]]:
    return [codec.str_entry(raw) for _, raw in await redis.xrange(key)]


async def read_events(resp: aiohttp.ClientResponse, until_seq: int, feed: str) -> list[dict[str, Any]]:
    """SSE events (event name, data, id) until an event of `feed` with seq >= until_seq."""
    out: list[dict[str, Any]] = []
    buf = b""
    event: dict[str, str] = {}
    while True:
        chunk = await resp.content.readany()
        assert chunk, f"the stream ended early after {out[-3:]}"
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode()
            if line == "":
                if "data" in event:
                    e = {
                        "event": event.get("event", "message"),
                        "data": json.loads(event["data"]),
                        "id": event.get("id"),
                    }
                    out.append(e)
                    if e["event"] == feed and e["data"]["seq"] >= until_seq:
                        return out
                event = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                event[name] = value.removeprefix(" ")


async def test_redis_back_empty_is_replayed_and_subscribers_are_told(
    base_settings: Settings, nats: Any, private_redis: RedisServer, tmp_path: Path
) -> None:
    from redis.asyncio import Redis

    s = base_settings
    keys = Keys(s.key_prefix)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")},
        "NATS_URL": s.nats_url,
        "REDIS_URL": private_redis.url,
        "DATABASE_URL": s.database_url,
        "FANOUT_KEY_PREFIX": s.key_prefix,
        "FANOUT_SUBJECT_PREFIX": s.subject_prefix,
        "FANOUT_JS_STREAM": s.js_stream,
        "FANOUT_DB_SCHEMA": s.db_schema,
        "FANOUT_LOG_FORMAT": "json",
        "FANOUT_HEARTBEAT": "1s",
    }
    ingest_port, gw_port = free_port(), free_port()
    ingestor = Service(
        "ingestor",
        ["ingest"],
        {**env, "FANOUT_INGEST_HTTP": f"127.0.0.1:{ingest_port}"},
        tmp_path,
        f"http://127.0.0.1:{ingest_port}",
    )
    gateway = Service(
        "gateway",
        ["gateway"],
        {**env, "FANOUT_GATEWAY_PORT": str(gw_port)},
        tmp_path,
        f"http://127.0.0.1:{gw_port}",
    )
    redis: Any = Redis.from_url(private_redis.url)
    try:
        ingestor.start()
        gateway.start()
        await asyncio.gather(ingestor.ready(), gateway.ready())
        js = nats.jetstream()
        subject = s.subject("execution")

        async def ingested(n: int) -> bool:
            return int(await redis.xlen(keys.stream("execution"))) >= n

        async with aiohttp.ClientSession() as http:
            # A subscriber from the latest point (nothing yet), that sees the first 40 events.
            async with http.get(f"{gateway.ops}/v1/stream?feeds=execution") as resp:
                assert resp.status == 200, await resp.text()
                for i in range(100):
                    await js.publish(subject, payload(i))
                events = await read_events(resp, 40, "execution")
            cursor = events[-1]["id"]
            await until("100 entries in Redis", lambda: ingested(100), 60)
            before = await stream_entries(redis, keys.stream("execution"))
            old_epoch = (await redis.hget(keys.meta("execution"), "epoch")).decode()
            assert [int(e["seq"]) for e in before] == list(range(1, 101))
            assert f".{old_epoch}." in cursor

            # Redis dies and comes back empty.
            await asyncio.to_thread(private_redis.kill)
            await asyncio.to_thread(private_redis.start)

            # The ingestor notices before its next write (it checks on reconnect, not on a
            # timer) and replays the 100 it had acked from JetStream, then the new ones.
            for i in range(100, 120):
                await js.publish(subject, payload(i))
            await until("the replay and the 20 new messages", lambda: ingested(120), 60)
            after = await stream_entries(redis, keys.stream("execution"))
            new_epoch = (await redis.hget(keys.meta("execution"), "epoch")).decode()
            ids = [e["message_id"] for e in after]
            assert len(ids) == len(set(ids)) == 120, "a message twice, or one missing, after the replay"
            assert ids[:100] == [e["message_id"] for e in before], (
                "the replay is not the same messages in order"
            )
            assert [int(e["seq"]) for e in after] == list(range(1, 121))
            assert new_epoch != old_epoch, "the stream restarted without a new epoch: readers cannot tell"

            # The subscriber resumes with its old cursor: told explicitly, then streamed on.
            # (A 503 right after the Redis restart is retried after its Retry-After.)
            events = []
            unavailable = 0
            for _ in range(20):
                async with http.get(
                    f"{gateway.ops}/v1/stream?feeds=execution", headers={"Last-Event-ID": cursor}
                ) as resp:
                    if resp.status == 503:
                        unavailable += 1
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    assert resp.status == 200, await resp.text()
                    events = await read_events(resp, 1, "execution")
                    break
            print(f"\nresume after the Redis restart: {unavailable} x 503 before the stream")
            kinds = [e["event"] for e in events]
            assert "reset" in kinds, f"no reset event before {kinds}"
            reset = events[kinds.index("reset")]["data"]
            assert reset["feed"] == "execution"
            assert reset.get("asked_epoch") == old_epoch and reset.get("current_epoch") == new_epoch, reset
            assert kinds.index("reset") < kinds.index("execution")
        assert "replay" in ingestor.log_path.read_text()
    finally:
        await redis.aclose()
        codes = [ingestor.stop(), gateway.stop()]
        assert codes == [0, 0], f"exit codes {codes}\n{ingestor.log_tail()}\n{gateway.log_tail()}"
