"""Lean publishers at a fixed rate, each stamping the publish time (ns since the Unix
epoch) into the message, where the load client reads it back as `executionEpoch`.

- `NchanPublisher`: one HTTP POST per message to nchan's publisher location, pipelined on
  one keep-alive connection (nchan has no batch publish). The body is the same JSON an
  execution event of the gateway carries, so both servers move events of the same size.
- `StreamPublisher`: what the ingestor does, minus NATS: appends execution entries to the
  feed's Redis stream with shared/lua/ingest_append.lua, one call per tick.
- `NatsPublisher` (bench/e2e_latency.py): protobuf executions on the NATS subject.

`pace()` drives any of them: every tick it publishes the messages due by then, so the
rate holds on average even when a tick runs late.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bench.harness import BenchError
from shared import codec, scripts
from shared.connections import redis_client
from shared.feeds import EXECUTION
from shared.keys import Keys

TICK_S = 0.005
DEDUP_TTL_S = 600


def execution_fields(publish_ns: int, n: int) -> dict[str, str]:
    """An execution's entry fields (by proto name), its executionEpoch the publish time."""
    return {
        "symbol": "BENCH",
        "market": "XBENCH",
        "price": codec.float32_text(100.0 + (n % 100) / 4),
        "quantity": "3.5",
        "executionEpoch": str(publish_ns),
        "stateSymbol": "OK",
    }


async def pace(publish: Callable[[int], Awaitable[None]], rate: float, duration: float) -> tuple[int, float]:
    """Call publish(k) each tick with the k messages due; returns (published, seconds)."""
    loop = asyncio.get_running_loop()
    total = max(1, round(rate * duration))
    start = loop.time()
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        if due > sent:
            await publish(due - sent)
            sent = due
        await asyncio.sleep(TICK_S)  # pacing a rate, not waiting for anything
    return sent, loop.time() - start


class PublishError(BenchError):
    """The server under test did not accept a published message."""


class NchanPublisher:
    """POST /pub/<channel> per message, pipelined on one connection; seq 1, 2, 3, ..."""

    def __init__(self, port: int, channel: str) -> None:
        self.port = port
        self.channel = channel
        self.seq = 0
        self.sent = 0
        self.answered = 0
        self.errors: list[str] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._created_ms = int(time.time() * 1000)
        self._answered_all = asyncio.Event()

    async def __aenter__(self) -> NchanPublisher:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._task = asyncio.create_task(self._responses())

    async def disconnect(self) -> None:
        """Close the connection (nginx is about to restart); `connect()` opens a new one."""
        if self._task is not None:  # first, so closing is no error of nchan's
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = self._task = None

    @property
    def last_seq(self) -> int:
        return self.seq

    async def publish(self, count: int) -> None:
        if self._task is not None and self._task.done() and not self.errors:
            await self.disconnect()  # nginx closed it while idle (keepalive_timeout): a new one
            await self.connect()
        assert self._writer is not None
        parts = []
        now = datetime.now(UTC)
        iso = codec.iso_ms(now)
        for _ in range(count):
            self.seq += 1
            publish_ns = time.time_ns()
            message: dict[str, Any] = {
                "symbol": "BENCH",
                "market": "XBENCH",
                "price": 100.0 + (self.seq % 100) / 4,
                "quantity": 3.5,
                "executionEpoch": publish_ns,
                "stateSymbol": "OK",
                "message_id": f"{self._created_ms}.{self.seq}",
                "seq": self.seq,
                "broker_time": iso,
                "ingest_time": iso,
            }
            body = json.dumps(message, separators=(",", ":")).encode()
            parts.append(
                b"POST /pub/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (self.channel.encode(), len(body), body)
            )
        self._writer.write(b"".join(parts))
        self.sent += count
        self._answered_all.clear()
        await self._writer.drain()

    async def _responses(self) -> None:
        """Read the pipelined responses: count them, keep the first few errors."""
        assert self._reader is not None
        while True:
            try:
                head = await self._reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await self._reader.readexactly(length) if length else b""
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                    ValueError, IndexError) as exc:  # fmt: skip
                idle = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                if idle and self.answered >= self.sent:  # closed between requests: not an error
                    self._answered_all.set()
                    return
                self.errors.append(f"publisher connection to nchan failed: {exc!r}")
                self._answered_all.set()
                return
            self.answered += 1
            if status not in (b"201", b"202") and len(self.errors) < 5:
                self.errors.append(f"{status.decode()} {body[:200]!r}")
            if self.answered >= self.sent or self.errors:
                self._answered_all.set()

    async def settle(self, wait_s: float = 60.0) -> None:
        """Wait until every POST has been answered; raise if nchan refused any."""
        if self.answered < self.sent:
            try:
                await asyncio.wait_for(self._answered_all.wait(), wait_s)
            except TimeoutError:
                pass
        if self.errors or self.answered < self.sent:
            raise PublishError(
                f"nchan answered {self.answered} of {self.sent} POSTs; errors: {self.errors or 'none'}"
            )


class StreamPublisher:
    """Appends execution entries to one feed stream with the ingestor's Lua script."""

    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self.redis = redis_client(redis_url)
        self.keys = Keys(key_prefix)
        self.script = scripts.register(self.redis, "ingest_append")
        self.stream = self.keys.stream(EXECUTION.name)
        self.meta = self.keys.meta(EXECUTION.name)
        self._created_ms = int(time.time() * 1000)
        self._broker_seq = 0
        self.sent = 0

    async def __aenter__(self) -> StreamPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.aclose()

    async def last_seq(self) -> int:
        """The feed's seq counter: the next entry appended gets this + 1."""
        raw = await self.redis.hget(self.meta, "seq")
        return int(raw) if raw else 0

    async def publish(self, count: int) -> None:
        iso = codec.iso_ms(datetime.now(UTC))
        messages = []
        for _ in range(count):
            self._broker_seq += 1
            message_id = f"{self._created_ms}.{self._broker_seq}"
            fields = codec.entry_fields(
                message_id, execution_fields(time.time_ns(), self._broker_seq), iso, iso
            )
            messages.append((self._broker_seq, message_id, fields))
        keys, argv = scripts.ingest_append_call(
            self.keys, EXECUTION.name, str(self._created_ms), messages, DEDUP_TTL_S
        )
        await self.script(keys=keys, args=argv)
        self.sent += count


class NatsPublisher:
    """Protobuf executions on the feed's NATS subject (core publish, as the simulator and
    upstreams do; JetStream captures the subject), executionEpoch = publish time in ns."""

    def __init__(self, nats_url: str, subject: str) -> None:
        self.nats_url = nats_url
        self.subject = subject
        self.sent = 0
        self._nc: Any = None

    async def __aenter__(self) -> NatsPublisher:
        import nats

        self._nc = await nats.connect(self.nats_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.drain()

    async def publish(self, count: int) -> None:
        from shared.proto import execution_pb2

        for _ in range(count):
            self.sent += 1
            msg = execution_pb2.execution(
                symbol="BENCH",
                market="XBENCH",
                price=100.0 + (self.sent % 100) / 4,
                quantity=3.5,
                executionEpoch=time.time_ns(),
                stateSymbol="OK",
            )
            await self._nc.publish(self.subject, msg.SerializeToString())
        await self._nc.flush()

    async def stream_exists(self, stream: str) -> bool:
        from nats.js.errors import NotFoundError

        try:
            await self._nc.jetstream().stream_info(stream)
        except NotFoundError:
            return False
        return True
