"""The ingestor as a process (`python -m fanout.cli ingest`): SIGKILL under load, SIGTERM,
a server without JetStream, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from fanout.servers import NatsServer, RedisServer
from services.ingestor.consumer import Ingestor
from shared.feeds import epoch_of
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_ingestor import (
    event,
    execution,
    ingestor_settings,
    read_entries,
    read_stream,
    stream_of,
    until,
)

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(settings: Settings, http_port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        NATS_URL=settings.nats_url,
        REDIS_URL=settings.redis_url,
        FANOUT_KEY_PREFIX=settings.key_prefix,
        FANOUT_SUBJECT_PREFIX=settings.subject_prefix,
        FANOUT_JS_STREAM=settings.js_stream,
        FANOUT_JS_ACK_WAIT="1s",
        FANOUT_INGEST_HTTP=f"127.0.0.1:{http_port}",
        FANOUT_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


async def start_ingestor(settings: Settings, **extra: str) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fanout.cli",
        "ingest",
        env=_env(settings, port, **extra),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return proc, port


async def wait_ready(proc: asyncio.subprocess.Process, port: int) -> None:
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            assert proc.returncode is None, "the ingestor exited"
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await until(ready, what="/readyz")


async def test_sigkill_under_load_then_restart_leaves_every_message_exactly_once(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    keys = Keys(base_settings.key_prefix)
    n = 12_000
    proc, port = await start_ingestor(base_settings, FANOUT_INGEST_BATCH="500")
    await wait_ready(proc, port)

    killed = asyncio.Event()

    async def publish_steadily() -> None:
        for start in range(0, n, 100):
            if start == n // 2:
                await killed.wait()  # the rest goes out while the ingestor is dead
            for i in range(start, start + 100):
                if i % 3:
                    await nats.publish(base_settings.subject("execution"), execution(i).SerializeToString())
                else:
                    await nats.publish(base_settings.subject("sport_event"), event(i).SerializeToString())
            await nats.flush()
            await asyncio.sleep(0.005)  # a steady rate (not synchronisation): the stream keeps growing

    publisher = asyncio.create_task(publish_steadily())
    try:
        # Kill it while the stream is growing and the ingestor is busy writing batches.
        await until(lambda: _at_least(redis, keys.stream("execution"), 1_500), what="ingestion to start")
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        killed.set()
        await publisher
    finally:
        publisher.cancel()

    proc, port = await start_ingestor(base_settings, FANOUT_INGEST_BATCH="500")
    try:
        n_exec = sum(1 for i in range(n) if i % 3)
        executions = await read_entries(redis, keys.stream("execution"), n_exec, within=90)
        events = await read_entries(redis, keys.stream("sport_event"), n - n_exec, within=90)
        js = nats.jetstream()

        async def all_acked() -> bool:
            for feed in ("execution", "sport_event"):
                info = await js.consumer_info(stream_of(base_settings, feed), "ingestor")
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await until(all_acked, within=60, what="every message acked")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b'"msg": "ingestor stopped"' in stderr

    # Exactly once: per feed every JetStream seq 1..n_feed once, at entry id <seq>-0.
    assert await redis.xlen(keys.stream("execution")) == n_exec
    assert await redis.xlen(keys.stream("sport_event")) == n - n_exec
    for feed, entries, count in (("execution", executions, n_exec), ("sport_event", events, n - n_exec)):
        created = (await js.stream_info(stream_of(base_settings, feed))).created
        assert created is not None
        epoch = epoch_of(created)
        assert [i for i, _ in entries] == [f"{s}-0" for s in range(1, count + 1)], feed
        assert [e["message_id"] for _, e in entries] == [f"{epoch}.{s}" for s in range(1, count + 1)], feed
    assert [e["symbol"] for _, e in executions] == [execution(i).symbol for i in range(n) if i % 3]
    assert [e["match_title"] for _, e in events] == [f"Match {i}" for i in range(n) if not i % 3]


async def _at_least(redis: Redis, key: str, count: int) -> bool:
    return int(await redis.xlen(key)) >= count


async def test_sigterm_when_idle_exits_zero_with_a_summary(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    proc, port = await start_ingestor(base_settings)
    await wait_ready(proc, port)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    for name in (
        "fanout_ingestor_batch_seconds",
        "fanout_ingestor_messages_total",
        "fanout_ingestor_dead_letters_total",
        "fanout_ingestor_consumer_pending_messages",
    ):
        assert name in text
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert b"Traceback" not in stderr
    assert b'"msg": "ingestor stopped"' in stderr


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_an_idle_ingestor_does_not_spin(base_settings: Settings, redis: Redis, nats: Any) -> None:
    """Issue 10: an idle pull loop once woke without end (41% of a core). Idle, it wakes once
    per expired pull request; over a few seconds that is a few milliseconds of CPU."""
    proc, port = await start_ingestor(base_settings)
    try:
        await wait_ready(proc, port)
        await publish_executions(nats, base_settings.subject("execution"), range(5))  # it has worked once
        await read_stream(redis, Keys(base_settings.key_prefix).stream("execution"), 5)
        before = _cpu_seconds(proc.pid)
        await asyncio.sleep(3.0)  # measuring idle time (not synchronisation)
        used = _cpu_seconds(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert used < 0.3, f"the idle ingestor used {used:.2f} s of CPU in 3 s"


async def test_a_legacy_stream_with_pending_messages_exits_1_with_one_clear_line(
    base_settings: Settings, nats: Any
) -> None:
    js = nats.jetstream()
    subjects = [base_settings.subject(f) for f in ("execution", "sport_event")]
    await js.add_stream(name=base_settings.js_stream, subjects=subjects)
    await js.add_consumer(base_settings.js_stream, durable_name="ingestor")
    await publish_executions(nats, base_settings.subject("execution"), range(2))
    proc, _ = await start_ingestor(base_settings, FANOUT_LOG_FORMAT="text")
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    text = stderr.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    [line] = [ln for ln in text.splitlines() if "ERROR" in ln]
    assert base_settings.js_stream in line and "not yet delivered" in line and "nats consumer info" in line


@contextmanager
def private_server(args: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the private server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


async def test_a_server_without_jetstream_is_a_clear_one_line_error(base_settings: Settings) -> None:
    port = free_port()
    with private_server([NatsServer(".").executable(), "-a", "127.0.0.1", "-p", str(port)], port):
        settings = ingestor_settings(base_settings, nats_url=f"nats://127.0.0.1:{port}")
        proc, _ = await start_ingestor(settings, FANOUT_LOG_FORMAT="text")
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    text = stderr.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    [line] = [ln for ln in text.splitlines() if "ERROR" in ln]
    assert "nats-server -js" in line


@asynccontextmanager
async def private_redis(port: int, data: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    args = [
        RedisServer(".").executable(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        data,
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]
    with private_server(args, port) as proc:
        yield proc


async def test_redis_going_away_and_back_loses_nothing_and_repeats_nothing(
    base_settings: Settings, nats: Any
) -> None:
    port = free_port()
    settings = ingestor_settings(base_settings, redis_url=f"redis://127.0.0.1:{port}/0")
    keys = Keys(settings.key_prefix)
    subject = settings.subject("execution")
    with tempfile.TemporaryDirectory() as data:
        async with private_redis(port, data) as server:
            redis = Redis.from_url(settings.redis_url)
            stop = asyncio.Event()
            ingestor = Ingestor(settings, redis, stop)
            task = asyncio.create_task(ingestor.run())
            await until(ingestor.nats_ready)
            for i in range(100):
                await nats.publish(subject, execution(i).SerializeToString())
            await nats.flush()
            await read_stream(redis, keys.stream("execution"), 100)
            server.terminate()
            server.wait(10)
            # Published while Redis is down: they wait in JetStream, nothing is acked.
            for i in range(100, 300):
                await nats.publish(subject, execution(i).SerializeToString())
            await nats.flush()
            await until(lambda: _retrying(ingestor), what="the ingestor to hit the outage")
        async with private_redis(port, data):
            reader = Redis.from_url(settings.redis_url)  # the old pool's connections died with the server
            entries = await read_stream(reader, keys.stream("execution"), 300, within=60)
            stop.set()
            await asyncio.wait_for(task, 30)
            assert await reader.xlen(keys.stream("execution")) == 300
            await reader.aclose()
            await redis.aclose()
    assert [int(e["seq"]) for e in entries] == list(range(1, 301))
    assert [e["symbol"] for e in entries] == [execution(i).symbol for i in range(300)]
    assert sum(ingestor.stats.appended.values()) + sum(ingestor.stats.refilled.values()) == 300


async def _retrying(ingestor: Ingestor) -> bool:
    return ingestor.stats.redis_outages > 0


def _nats_args(port: int, store: str) -> list[str]:
    return [NatsServer(".").executable(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store]


async def test_nats_killed_and_restarted_loses_nothing_and_repeats_nothing(
    base_settings: Settings, redis: Redis
) -> None:
    import nats as nats_py

    port = free_port()
    settings = ingestor_settings(base_settings, nats_url=f"nats://127.0.0.1:{port}")
    keys = Keys(settings.key_prefix)
    subject = settings.subject("sport_event")
    with tempfile.TemporaryDirectory() as store:
        with private_server(_nats_args(port, store), port) as server:
            stop = asyncio.Event()
            ingestor = Ingestor(settings, redis, stop)
            task = asyncio.create_task(ingestor.run())
            await until(ingestor.nats_ready)
            reconnected = asyncio.Event()

            async def on_reconnected() -> None:
                reconnected.set()

            nc = await nats_py.connect(
                settings.nats_url,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                reconnected_cb=on_reconnected,
            )
            for i in range(100):
                await nc.publish(subject, event(i).SerializeToString())
            await nc.flush()
            await read_stream(redis, keys.stream("sport_event"), 100)
            server.kill()
            server.wait(10)
        with private_server(_nats_args(port, store), port):
            await asyncio.wait_for(reconnected.wait(), 30)
            await until(lambda: _reconnected(ingestor), what="the ingestor to reconnect")
            for i in range(100, 300):
                await nc.publish(subject, event(i).SerializeToString())
            await nc.flush()
            entries = await read_stream(redis, keys.stream("sport_event"), 300, within=60)
            await nc.close()
            stop.set()
            await asyncio.wait_for(task, 30)
    assert await redis.xlen(keys.stream("sport_event")) == 300
    assert [e["match_title"] for e in entries] == [f"Match {i}" for i in range(300)]
    assert [int(e["seq"]) for e in entries] == list(range(1, 301))


async def _reconnected(ingestor: Ingestor) -> bool:
    return ingestor.stats.nats_reconnects > 0


async def test_the_ingestor_waits_for_nats_that_is_not_up_yet(base_settings: Settings, redis: Redis) -> None:
    port = free_port()
    settings = ingestor_settings(base_settings, nats_url=f"nats://127.0.0.1:{port}")
    stop = asyncio.Event()
    ingestor = Ingestor(settings, redis, stop)
    task = asyncio.create_task(ingestor.run())
    with tempfile.TemporaryDirectory() as store:
        await asyncio.sleep(0.3)  # the ingestor is retrying meanwhile (not synchronisation)
        assert not task.done()
        with private_server(_nats_args(port, store), port):
            await until(ingestor.nats_ready, what="the ingestor to connect once NATS is up")
            stop.set()
            await asyncio.wait_for(task, 30)


async def test_redis_restarted_empty_is_noticed_by_its_run_id_and_refilled_with_the_same_ids(
    base_settings: Settings, nats: Any
) -> None:
    port = free_port()
    settings = ingestor_settings(base_settings, redis_url=f"redis://127.0.0.1:{port}/0")
    keys = Keys(settings.key_prefix)
    subject = settings.subject("execution")
    no_persistence = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    with private_server(no_persistence, port) as server:
        redis = Redis.from_url(settings.redis_url)
        stop = asyncio.Event()
        ingestor = Ingestor(settings, redis, stop)
        task = asyncio.create_task(ingestor.run())
        await until(ingestor.nats_ready)
        await publish_executions(nats, subject, range(150))
        before = await read_entries(redis, keys.stream("execution"), 150)
        old_epoch = await redis.hget(keys.meta("execution"), "epoch")
        server.kill()  # everything acked so far is gone with it
        server.wait(10)
    with private_server(no_persistence, port):
        await publish_executions(nats, subject, range(150, 200))
        reader = Redis.from_url(settings.redis_url)  # the ingestor's client is its own business
        after = await read_entries(reader, keys.stream("execution"), 200, within=60)
        stop.set()
        await asyncio.wait_for(task, 30)
        assert await reader.xlen(keys.stream("execution")) == 200
        new_epoch = await reader.hget(keys.meta("execution"), "epoch")
        await reader.aclose()
        await redis.aclose()
    # Every message once, at the same ids and seqs as before the loss, in the same epoch
    # (the catalogue has nothing: rebuilt from what JetStream retains).
    assert [i for i, _ in after] == [f"{s}-0" for s in range(1, 201)]
    assert [e["message_id"] for _, e in after[:150]] == [e["message_id"] for _, e in before]
    assert [e["symbol"] for _, e in after] == [execution(i).symbol for i in range(200)]
    assert new_epoch == old_epoch
    assert ingestor.watch.restarts == 1 and ingestor.stats.redis_restarts == 1
    assert (
        ingestor.stats.refilled["execution"] >= 150 - 1
    )  # the lost ones (the batch in hand is not a refill)


async def publish_executions(nc: Any, subject: str, numbers: range) -> None:
    for i in numbers:
        await nc.publish(subject, execution(i).SerializeToString())
    await nc.flush()


async def test_sigterm_under_load_finishes_and_acks_what_it_took_then_a_restart_completes(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    keys = Keys(base_settings.key_prefix)
    n = 5_000
    proc, port = await start_ingestor(base_settings, FANOUT_INGEST_BATCH="200", FANOUT_JS_ACK_WAIT="30s")
    await wait_ready(proc, port)
    await publish_executions(nats, base_settings.subject("execution"), range(n))
    await until(lambda: _at_least(redis, keys.stream("execution"), 400), what="ingestion to start")
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    # Everything it was handed is written and acked: nothing waits for an ack timeout.
    info = await nats.jetstream().consumer_info(stream_of(base_settings, "execution"), "ingestor")
    assert info.num_ack_pending == 0
    written = int(await redis.xlen(keys.stream("execution")))
    assert info.ack_floor.stream_seq == written

    proc, port = await start_ingestor(base_settings, FANOUT_INGEST_BATCH="500")
    try:
        entries = await read_stream(redis, keys.stream("execution"), n, within=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    assert [int(e["seq"]) for e in entries] == list(range(1, n + 1))
    assert await redis.xlen(keys.stream("execution")) == n


async def test_readyz_names_the_failing_server(base_settings: Settings, nats: Any) -> None:
    from shared.monitoring import OpsServer

    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    ingestor = Ingestor(ingestor_settings(base_settings), dead, asyncio.Event())
    ops = OpsServer("127.0.0.1", 0, {"nats": ingestor.nats_ready, "redis": ingestor.redis_ready})
    await ops.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{ops.port}/readyz") as resp:
                body = await resp.json()
                assert resp.status == 503
            async with http.get(f"http://127.0.0.1:{ops.port}/healthz") as resp:
                assert resp.status == 200
    finally:
        await ops.stop()
        await dead.aclose()
    assert body["status"] == "not ready"
    assert body["checks"]["nats"] == "failing"  # not connected yet
    assert body["checks"]["redis"].startswith("failing: ")


async def test_a_readiness_check_that_hangs_fails_in_bounded_time() -> None:
    from shared.monitoring import OpsServer

    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    async def fine() -> bool:
        return True

    ops = OpsServer("127.0.0.1", 0, {"paused": hangs, "fine": fine}, check_timeout=0.2)
    await ops.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{ops.port}/readyz") as resp:
                assert resp.status == 503
                body = await resp.json()
    finally:
        await ops.stop()
    assert body["checks"] == {"paused": "failing: no answer within 0.2s", "fine": "ok"}
