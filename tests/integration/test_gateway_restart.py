"""The gateway as a process: killed with SIGKILL while 50 clients listen and restarted,
every client resumes with no gap and no duplicate; SIGTERM ends every stream and exits 0."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from services.sse_gateway.settings import GatewaySettings
from shared.settings import Settings
from tests.integration.test_gateway_helpers import GatewayProcess, Writer, cancel, open_stream, xrange_all

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CLIENTS = 50


@pytest.fixture
def settings(base_settings: Settings) -> GatewaySettings:
    return GatewaySettings.from_env(
        os.environ, key_prefix=base_settings.key_prefix, db_schema=base_settings.db_schema, tokens=""
    )


class Client:
    """Reconnects like EventSource: after a drop, again with the last id it saw."""

    def __init__(self, port: int, progress: asyncio.Condition) -> None:
        self.port = port
        self.progress = progress
        self.seen: dict[str, list[str]] = {"execution": [], "sport_event": []}
        self.seqs: dict[str, list[int]] = {"execution": [], "sport_event": []}
        self.last_id: str | None = None
        self.connects = 0

    def count(self) -> int:
        return sum(len(v) for v in self.seqs.values())

    async def run(self, done: asyncio.Event) -> None:
        while not done.is_set():
            try:
                stream = await open_stream(
                    self.port, "from=earliest", {"Last-Event-ID": self.last_id} if self.last_id else {}
                )
            except OSError:
                await asyncio.sleep(0.1)  # the gateway is down: retry, as EventSource does after `retry:`
                continue
            if stream.status != 200:
                await asyncio.sleep(0.1)
                continue
            self.connects += 1
            try:
                while not done.is_set():
                    event = await stream.next(within=60)
                    if event.has_id:
                        self.last_id = event.id
                    if event.event in self.seqs:
                        data = event.json()
                        self.seqs[event.event].append(data["seq"])
                        self.seen[event.event].append(data["message_id"])
                        async with self.progress:
                            self.progress.notify_all()
            except (EOFError, ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                stream.close()


async def test_sigkill_with_50_clients_then_restart_every_client_resumes_exactly(
    settings: GatewaySettings, redis: Any
) -> None:
    writer = Writer(redis, settings.key_prefix)
    await writer.append("execution", 30)
    await writer.append("sport_event", 20)
    gateway = GatewayProcess(settings)
    await gateway.start()
    progress = asyncio.Condition()
    done = asyncio.Event()
    clients = [Client(gateway.port, progress) for _ in range(CLIENTS)]
    tasks = [asyncio.create_task(c.run(done)) for c in clients]
    try:

        async def all_have(n: int) -> None:
            async with asyncio.timeout(60), progress:
                await progress.wait_for(lambda: all(c.count() >= n for c in clients))

        await all_have(50)
        for _ in range(4):
            await writer.append("execution", 5)
            await writer.append("sport_event", 5)
        await all_have(60)  # some of the later ones in flight
        gateway.kill()
        for _ in range(3):  # written while the gateway is down
            await writer.append("execution", 5)
            await writer.append("sport_event", 5)
        await gateway.start()
        for _ in range(3):
            await writer.append("execution", 5)
            await writer.append("sport_event", 5)
        total = 30 + 20 + 10 * 10
        await all_have(total)
        assert "Traceback" not in gateway.stderr()
    finally:
        done.set()
        await cancel(tasks)
        gateway.close()
    expected = {
        f: [e["message_id"] for _, e in await xrange_all(redis, settings.key_prefix, f)]
        for f in clients[0].seen
    }
    assert {f: len(v) for f, v in expected.items()} == {"execution": 30 + 50, "sport_event": 20 + 50}
    for client in clients:
        assert client.connects >= 2
        for feed, ids in expected.items():
            assert client.seen[feed] == ids, f"client with last id {client.last_id}"
            assert client.seqs[feed] == list(range(1, len(ids) + 1))


async def test_sigterm_ends_every_stream_and_exits_0(settings: GatewaySettings, redis: Any) -> None:
    writer = Writer(redis, settings.key_prefix)
    await writer.append("execution", 3)
    gateway = GatewayProcess(settings)
    await gateway.start()
    try:
        streams = [await open_stream(gateway.port, "from=earliest") for _ in range(3)]
        for s in streams:
            await s.collect(3)
        code = await asyncio.to_thread(gateway.terminate, 30)
        assert code == 0
        for s in streams:
            with pytest.raises(EOFError):
                await s.next(within=10)
            s.close()
        log = gateway.stderr()
        assert "gateway stopped" in log
        assert "Traceback" not in log
    finally:
        gateway.close()
