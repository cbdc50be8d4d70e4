"""`fanout gateway --workers N`: several worker processes on one port under a supervisor.

A worker killed under load is replaced and its clients resume on the others with no gap
and no duplicate (judged by seq against what was appended); the counters and the
subscriber gauge add up across workers; the subscriber limit is shared; SIGTERM drains
every worker and the supervisor exits 0; a killed supervisor takes its workers along."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from services.sse_gateway.settings import GatewaySettings
from shared.settings import Settings
from tests.integration.test_gateway_helpers import GatewayProcess, Writer, cancel, free_port, open_stream
from tests.integration.test_gateway_restart import Client

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

CLIENTS = 40


@pytest.fixture
def settings(base_settings: Settings) -> GatewaySettings:
    return GatewaySettings.from_env(
        os.environ, key_prefix=base_settings.key_prefix, db_schema=base_settings.db_schema, tokens=""
    )


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid`, from /proc."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


async def until(check: Any, within: float, what: str) -> None:
    """Poll a state of other processes (nothing to await), with a deadline."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _metrics(port: int, within: float = 30) -> str:
    """/metrics on the ops port, once it answers (the first worker's replacement may
    still be starting: nothing to await but its port)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = await reader.read()
    writer.close()
    return reply.partition(b"\r\n\r\n")[2].decode()


def _value(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found[1])


async def test_a_worker_killed_under_load_is_replaced_and_every_client_stays_exact(
    settings: GatewaySettings, redis: Any
) -> None:
    writer = Writer(redis, settings.key_prefix)
    await writer.append("execution", 20)
    await writer.append("sport_event", 20)
    ops = free_port()  # the first worker's (and its replacement's); /metrics adds up every worker
    gateway = GatewayProcess(settings, FANOUT_GATEWAY_WORKERS="2", FANOUT_GATEWAY_OPS=f"127.0.0.1:{ops}")
    await gateway.start()
    assert gateway.proc is not None
    supervisor = gateway.proc.pid
    progress = asyncio.Condition()
    done = asyncio.Event()
    clients = [Client(gateway.port, progress) for _ in range(CLIENTS)]
    tasks: list[asyncio.Task[None]] = []
    loading = asyncio.Event()

    async def load() -> None:  # appends while the worker dies: the load, not a synchronisation
        while not loading.is_set():
            await writer.append("execution", 3)
            await writer.append("sport_event", 2)
            await asyncio.sleep(0.02)

    try:
        await until(lambda: gateway.stderr().count('"gateway ready"') == 2, 60, "both workers listening")
        workers = children(supervisor)
        assert len(workers) == 2
        tasks += [asyncio.create_task(c.run(done)) for c in clients]  # spread over both workers

        async def all_have(n: int) -> None:
            async with asyncio.timeout(90), progress:
                await progress.wait_for(lambda: all(c.count() >= n for c in clients))

        await all_have(40)
        appending = asyncio.create_task(load())
        await all_have(80)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        await until(lambda: gateway.stderr().count('"gateway ready"') == 3, 60, "the replacement worker")
        await all_have(200)
        loading.set()
        await appending
        total = writer.top["execution"] + writer.top["sport_event"]
        await all_have(total)
        log = gateway.stderr()
        text = await _metrics(ops)
    finally:
        loading.set()
        done.set()
        await cancel(tasks)
        gateway.close()
    for client in clients:
        for feed in ("execution", "sport_event"):
            assert client.seqs[feed] == list(range(1, writer.top[feed] + 1)), f"{feed}: {client.last_id}"
    assert sum(c.connects for c in clients) > CLIENTS, "the killed worker's clients reconnected"
    assert "gateway worker died; replacing it" in log
    # Counters add up across the workers, the dead one's included; the gauge is the live ones'.
    assert _value(text, "fanout_gateway_served_total") == sum(c.connects for c in clients)
    assert _value(text, "fanout_gateway_subscribers") == CLIENTS


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    settings: GatewaySettings, redis: Any
) -> None:
    writer = Writer(redis, settings.key_prefix)
    await writer.append("execution", 3)
    gateway = GatewayProcess(settings, FANOUT_GATEWAY_WORKERS="2")
    await gateway.start()
    try:
        streams = [await open_stream(gateway.port, "from=earliest") for _ in range(6)]
        for s in streams:
            await s.collect(3)
        assert gateway.proc is not None
        workers = children(gateway.proc.pid)
        assert len(workers) == 2
        code = await asyncio.to_thread(gateway.terminate, 60)
        assert code == 0, gateway.stderr()[-4000:]
        for s in streams:
            with pytest.raises(EOFError):
                await s.next(within=10)
            s.close()
        assert not any(alive(w) for w in workers)
        log = gateway.stderr()
        assert "gateway stopped" in log and "Traceback" not in log
    finally:
        gateway.close()


async def test_the_subscriber_limit_is_shared_by_the_workers(settings: GatewaySettings, redis: Any) -> None:
    writer = Writer(redis, settings.key_prefix)
    await writer.append("execution", 1)
    gateway = GatewayProcess(settings, FANOUT_GATEWAY_WORKERS="2", FANOUT_MAX_SUBSCRIBERS="4")
    await gateway.start()
    streams = []
    try:
        for _ in range(4):
            streams.append(await open_stream(gateway.port, "from=earliest"))
            assert streams[-1].status == 200
            await streams[-1].collect(1)
        refused = await open_stream(gateway.port, "from=earliest", accept="*/*")
        assert refused.status == 503 and b"too many subscribers" in refused.body
        streams.pop().close()

        async def admitted() -> bool:
            s = await open_stream(gateway.port, "from=earliest", accept="*/*")
            if s.status == 200:
                streams.append(s)
            return s.status == 200

        deadline = asyncio.get_running_loop().time() + 30
        while not await admitted():  # the closed stream's worker notices the disconnect
            assert asyncio.get_running_loop().time() < deadline, "a freed place was never given again"
            await asyncio.sleep(0.05)
    finally:
        for s in streams:
            s.close()
        gateway.close()


async def test_a_killed_supervisor_takes_its_workers_along(settings: GatewaySettings, redis: Any) -> None:
    gateway = GatewayProcess(settings, FANOUT_GATEWAY_WORKERS="2")
    await gateway.start()
    try:
        assert gateway.proc is not None
        workers = children(gateway.proc.pid)
        assert len(workers) == 2
        gateway.kill()
        await until(lambda: not any(alive(w) for w in workers), 10, "the workers to die")
        again = GatewayProcess(settings, port=gateway.port, FANOUT_GATEWAY_WORKERS="2")
        await again.start()  # the port is free again at once
        again.close()
    finally:
        gateway.close()
