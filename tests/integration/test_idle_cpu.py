"""Idle costs nothing (issue 10): at the upstream rate (the simulator's default, a few
messages a second per feed) every long-running service stays far below a core. A busy
loop (a wait that never blocks, a poll without a sleep) shows up as CPU time while
nothing happens, so each service's CPU time over a few seconds of upstream traffic is
held to a generous bound: 0.1 s of CPU per second (10% of a core; a spinning loop takes
40-100%, a healthy service well under 1%).

All four run as the processes a user starts (`fanout feeds`, `fanout ingest`,
`fanout archive`, `fanout gateway`), against the real NATS, Redis and PostgreSQL, with
one SSE subscriber listening to both feeds. CPU is read from /proc for each process and
its children (the gateway's workers). The figures are printed (`-s`) for the README.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from shared.settings import Settings
from tests.integration.test_archiver import count_rows, eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
IDLE_SECONDS = 3.0
BOUND_CPU_PER_S = 0.1
SERVICES = ("feeds", "ingest", "archive", "gateway")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far."""
    ticks = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _env(settings: Settings, gateway_port: int) -> dict[str, str]:
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
        "FANOUT_ARCHIVE_HTTP": "127.0.0.1:0",
        "FANOUT_FEEDS_HTTP": "127.0.0.1:0",
        "FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{gateway_port}",
        "FANOUT_TOKENS": "",
        "FANOUT_LOG_FORMAT": "json",
        "FANOUT_LOG_LEVEL": "WARNING",
    }


@asynccontextmanager
async def service(command: str, env: Mapping[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """`fanout <command>` until the block ends, then SIGTERM (it must exit cleanly)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fanout.cli",
        command,
        env=dict(env),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode in (0, -signal.SIGTERM), f"fanout {command}: {err.decode()[-2000:]}"


class Subscriber:
    """One SSE client on both feeds, counting the events it receives."""

    def __init__(self) -> None:
        self.events = 0
        self.got = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, port: int, proc: asyncio.subprocess.Process) -> None:
        while True:  # the gateway may not listen yet: nothing to await but its port
            if proc.returncode is not None:
                raise AssertionError("fanout gateway exited")
            try:
                reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        self.writer.write(
            b"GET /v1/stream?feeds=execution,sport_event HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )
        while line := await reader.readline():
            if line.startswith(b"data:"):
                self.events += 1
                self.got.set()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


async def test_every_service_stays_idle_at_the_upstream_rate(
    base_settings: Settings, redis: Redis, nats: NATS, pg: asyncpg.Connection
) -> None:
    port = _free_port()
    env = _env(base_settings, port)
    subscriber = Subscriber()
    async with AsyncExitStack() as stack:
        procs = {}
        for command in ("ingest", "archive", "gateway"):
            procs[command] = await stack.enter_async_context(service(command, env))
        listening = asyncio.create_task(subscriber.run(port, procs["gateway"]))
        stack.callback(listening.cancel)
        stack.callback(subscriber.close)
        procs["feeds"] = await stack.enter_async_context(service("feeds", env))  # 3 msg/s per feed

        async def flowing() -> bool:
            for command, proc in procs.items():
                if proc.returncode is not None:
                    raise AssertionError(f"fanout {command} exited with {proc.returncode}")
            if listening.done():
                listening.result()
            schema = base_settings.db_schema
            archived = [await count_rows(pg, schema, t) for t in ("execution", "sport_event")]
            return min(archived) > 0 and subscriber.got.is_set()

        # Every service has done its work at least once: published, ingested, archived, served.
        await eventually(flowing, within=60, what="messages to be archived and served")
        before = {command: cpu_seconds(proc.pid) for command, proc in procs.items()}
        events_before = subscriber.events
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(IDLE_SECONDS)  # measuring CPU over a span of time (not synchronisation)
        elapsed = asyncio.get_running_loop().time() - started
        used = {command: cpu_seconds(proc.pid) - before[command] for command, proc in procs.items()}
        served = subscriber.events - events_before

    per_s = {command: used[command] / elapsed for command in SERVICES}
    figures = ", ".join(f"{c} {v:.4f}" for c, v in per_s.items())
    print(f"\nidle CPU at the upstream rate (CPU s per s): {figures}")
    assert served > 0, "the subscriber got nothing while measuring: the traffic was not flowing"
    spinning = {c: round(v, 3) for c, v in per_s.items() if v >= BOUND_CPU_PER_S}
    assert not spinning, f"busy at the upstream rate (CPU s per s, bound {BOUND_CPU_PER_S}): {spinning}"
