"""The ingestor's check of Redis against JetStream is skipped when Redis has not restarted
since a completed check (`replay.check_redis`: Redis's INFO run_id against the marker
`Keys.ingest_run_id()`), and runs whenever Redis may have lost acked writes: a new or
emptied Redis (no marker), a restarted one or a promoted replica (another run_id), a
restart during the replay, a crash during the replay."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from typing import Any

import pytest
from redis.asyncio import Redis

from services.ingestor import jetstream, replay
from services.ingestor.jetstream import StreamHandle, parse_ack_subject
from services.ingestor.settings import IngestorSettings
from services.ingestor.writer import Delivery, Writer
from shared import codec
from shared.feeds import EXECUTION
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_ingestor import execution, ingestor_settings, publish, read_stream, running
from tests.integration.test_ingestor_process import free_port, private_server

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def no_persistence(port: int) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


async def acked_in_jetstream(
    nats: Any, redis: Redis, settings: IngestorSettings, count: int, written: slice
) -> tuple[StreamHandle, Writer]:
    """`count` executions delivered and acked, of which only `written` reached Redis
    (as if Redis had lost the others after answering for them)."""
    handle = await jetstream.setup(nats, settings)
    payloads = [execution(i).SerializeToString() for i in range(count)]
    await publish(nats, settings.subject(EXECUTION.name), payloads)
    sub = await nats.jetstream().pull_subscribe_bind(settings.js_consumer, stream=settings.js_stream)
    msgs = await sub.fetch(count, timeout=5)
    assert len(msgs) == count
    deliveries = [
        Delivery(m.subject, m.data, m.metadata.sequence.stream, 1, parse_ack_subject(m.reply)[2], m.reply)
        for m in msgs
    ]
    writer = Writer(redis, settings)
    await writer.write(deliveries[written], handle.created_ms)
    for m in msgs:
        await m.ack()
    await nats.flush()
    await sub.unsubscribe()
    return handle, writer


async def message_ids(redis: Redis, keys: Keys) -> list[str]:
    raw: Any = await redis.xrange(keys.stream(EXECUTION.name))
    return [codec.str_entry(f)["message_id"] for _, f in raw]


async def marker(redis: Redis, keys: Keys) -> str | None:
    value = await redis.get(keys.ingest_run_id())
    return value.decode() if isinstance(value, bytes) else value


async def run_id(redis: Redis) -> str:
    return str((await redis.info("server"))["run_id"])


async def test_a_plain_restart_with_redis_intact_does_not_replay(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    subject = settings.subject(EXECUTION.name)
    async with running(settings, redis) as first:
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(50)])
        await read_stream(redis, keys.stream(EXECUTION.name), 50)
    # A new key prefix has no marker: like a new Redis, checked once, then marked.
    assert (first.stats.redis_checks, first.stats.replays) == (1, 1)
    assert await marker(redis, keys) == await run_id(redis)

    async with running(settings, redis) as second:
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(50, 70)])
        entries = await read_stream(redis, keys.stream(EXECUTION.name), 70)
    # Without the marker this start would have read the last 60 s of JetStream again.
    assert (second.stats.redis_checks, second.stats.replays, second.stats.replayed) == (1, 0, 0)
    assert [int(e["seq"]) for e in entries] == list(range(1, 71))
    assert await redis.xlen(keys.stream(EXECUTION.name)) == 70


async def test_no_marker_or_another_run_id_replays_then_marks_and_the_same_run_id_skips(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings, batch=10)
    keys = Keys(settings.key_prefix)
    handle, writer = await acked_in_jetstream(nats, redis, settings, 30, slice(0, 30))

    async def check() -> replay.CheckResult:
        return await replay.check_redis(nats, redis, writer, handle, keys, settings.batch)

    fresh = await check()  # no marker: a new or emptied Redis
    assert not fresh.skipped and len(fresh.replays) == 1
    assert (fresh.read, fresh.appended) == (30, 0)  # all within the margin, all still there
    assert await marker(redis, keys) == fresh.run_id == await run_id(redis)

    again = await check()
    assert again.skipped and again.replays == () and again.read == 0

    # A Redis restarted from a snapshot, or a promoted replica, still holds the marker of
    # the process that wrote it, under its own new run_id.
    await redis.set(keys.ingest_run_id(), "the run_id of a Redis before its restart")
    restarted = await check()
    assert not restarted.skipped and restarted.read == 30
    assert await marker(redis, keys) == await run_id(redis)
    assert len(await message_ids(redis, keys)) == 30


async def test_a_crash_during_the_replay_leaves_no_marker_so_the_next_check_replays(
    base_settings: Settings, redis: Redis, nats: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ingestor_settings(base_settings, batch=10)
    keys = Keys(settings.key_prefix)
    handle, writer = await acked_in_jetstream(nats, redis, settings, 40, slice(0, 20))
    # Redis lost the 20 last acked ones, and their marker with them (a real loss is a
    # restart; a test cannot restart the shared Redis, so no marker stands for it).
    real_replay = replay._replay

    async def crash(*args: Any) -> tuple[int, int]:
        raise ConnectionError("the ingestor dies during the replay")

    monkeypatch.setattr(replay, "_replay", crash)
    with pytest.raises(ConnectionError):
        await replay.check_redis(nats, redis, writer, handle, keys, settings.batch)
    assert await redis.get(keys.ingest_run_id()) is None

    monkeypatch.setattr(replay, "_replay", real_replay)
    result = await replay.check_redis(nats, redis, writer, handle, keys, settings.batch)
    assert not result.skipped and result.appended == 20
    assert sorted(await message_ids(redis, keys)) == sorted(f"{handle.created_ms}.{s}" for s in range(1, 41))
    assert await marker(redis, keys) == await run_id(redis)


@needs_redis_server
async def test_redis_restarted_during_the_replay_is_checked_again_under_its_new_run_id(
    base_settings: Settings, nats: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    settings = ingestor_settings(base_settings, batch=10, redis_url=f"redis://127.0.0.1:{port}/0")
    keys = Keys(settings.key_prefix)
    with contextlib.ExitStack() as servers:
        server: subprocess.Popen[bytes] = servers.enter_context(private_server(no_persistence(port), port))
        redis = Redis.from_url(settings.redis_url)
        try:
            handle, writer = await acked_in_jetstream(nats, redis, settings, 30, slice(0, 0))
            first_run_id = await run_id(redis)
            real_replay = replay.replay_if_behind
            calls = 0

            async def replay_then_restart(*args: Any, **kwargs: Any) -> replay.ReplayResult:
                nonlocal calls
                calls += 1
                result = await real_replay(*args, **kwargs)
                if calls == 1:  # Redis restarts empty right after the replay wrote everything
                    server.kill()
                    server.wait(10)
                    servers.enter_context(private_server(no_persistence(port), port))
                    # Connections to the old process fail once, and a failed check is
                    # retried by the ingestor; here they are dropped so that this check
                    # itself reads the new run_id.
                    await redis.connection_pool.disconnect()
                return result

            monkeypatch.setattr(replay, "replay_if_behind", replay_then_restart)
            result = await replay.check_redis(nats, redis, writer, handle, keys, settings.batch)

            second_run_id = await run_id(redis)
            assert second_run_id != first_run_id
            assert [r.appended for r in result.replays] == [30, 30]  # all of it, twice
            assert result.run_id == second_run_id
            # Marked with the run_id of the Redis that holds the replayed messages, never
            # with the one whose replay was lost.
            assert await marker(redis, keys) == second_run_id
            assert sorted(await message_ids(redis, keys)) == sorted(
                f"{handle.created_ms}.{s}" for s in range(1, 31)
            )
        finally:
            await redis.aclose()


@needs_redis_server
async def test_a_dropped_connection_to_a_running_redis_is_checked_without_a_replay(
    base_settings: Settings, nats: Any
) -> None:
    """The ingestor checks after every Redis reconnect; a connection dropped by a Redis
    that kept running (here CLIENT KILL, on a private Redis) lost nothing: no replay."""
    port = free_port()
    settings = ingestor_settings(base_settings, redis_url=f"redis://127.0.0.1:{port}/0")
    keys = Keys(settings.key_prefix)
    subject = settings.subject(EXECUTION.name)
    with private_server(no_persistence(port), port):
        redis = Redis.from_url(settings.redis_url)
        admin = Redis.from_url(settings.redis_url)
        try:
            async with running(settings, redis) as ingestor:
                await publish(nats, subject, [execution(i).SerializeToString() for i in range(30)])
                await read_stream(admin, keys.stream(EXECUTION.name), 30)
                killed = await admin.client_kill_filter(_type="normal", skipme=True)
                assert killed >= 1
                await publish(nats, subject, [execution(i).SerializeToString() for i in range(30, 60)])
                entries = await read_stream(admin, keys.stream(EXECUTION.name), 60)
            assert ingestor.stats.redis_checks >= 2  # at start, and after the reconnect
            assert (ingestor.stats.replays, ingestor.stats.replayed) == (1, 0)  # at start only
            assert [int(e["seq"]) for e in entries] == list(range(1, 61))
        finally:
            await admin.aclose()
            await redis.aclose()
