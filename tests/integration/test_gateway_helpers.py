"""Helpers for the gateway tests (no tests here): write entries the way the ingestor
does, write catalogue rows the way the archiver does (contract v2, plain SQL), run the
gateway on a free port, and read its event stream with raw asyncio."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from shared import codec, scripts
from shared.feeds import FEED_NAMES, FEEDS, message_id
from shared.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
SYMBOLS = ("AAPL", "MSFT", "TSLA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def execution_fields(i: int) -> dict[str, str]:
    return {
        "symbol": SYMBOLS[i % len(SYMBOLS)],
        "market": "NASDAQ" if i % 2 else "NYSE",
        "price": codec.float32_text(100.0 + i % 50),
        "quantity": "10",
        "executionEpoch": str(1_700_000_000_000 + i),
        "stateSymbol": "CA",
    }


def sport_fields(i: int) -> dict[str, str]:
    return {"sport": ("FOOTBALL", "TENNIS")[i % 2], "match_title": f"match {i}", "data_event": f"goal {i}"}


EPOCH = "1795862595094"  # a JetStream stream's creation time in ms


class Writer:
    """Appends entries as the ingestor does (contract v2): with shared/lua/ingest_append.lua
    through `scripts.ingest_append_call`, at the seqs JetStream would give them (contiguous
    per feed from 1), message id `<epoch>.<seq>`. It keeps what it appended, per feed and
    seq: the independent record tests compare subscribers with, and what `refill` writes
    again after Redis lost it (the same ids, as the ingestor refills from JetStream)."""

    def __init__(self, redis: Redis, prefix: str, epoch: str = EPOCH, ttl: int = 3600) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.epoch = epoch
        self.ttl = ttl
        self.script = scripts.register(redis, "ingest_append")
        self.top: dict[str, int] = dict.fromkeys(FEED_NAMES, 0)
        self.written: dict[str, dict[int, list[str]]] = {f: {} for f in FEED_NAMES}

    async def append(
        self, feed: str, n: int, *, broker_time: str | None = None, **fields: str
    ) -> list[str]:
        """`n` new messages (fields as `execution_fields`/`sport_fields` make them for their
        seq, overridden by `fields`); their entry ids."""
        now = codec.iso_ms(datetime.now(UTC))
        messages: list[tuple[int, str, list[str]]] = []
        for _ in range(n):
            self.top[feed] += 1
            seq = self.top[feed]
            made = execution_fields(seq) if feed == "execution" else sport_fields(seq)
            made.update(fields)
            mid = message_id(self.epoch, seq)
            flat = codec.entry_fields(mid, made, broker_time or now, now)
            self.written[feed][seq] = flat
            messages.append((seq, mid, flat))
        return await self._call(feed, messages)

    async def append_malformed(self, feed: str, error: str = "not a valid protobuf message") -> str:
        """A payload the ingestor could not decode: it keeps its seq (`codec.malformed_fields`)."""
        now = codec.iso_ms(datetime.now(UTC))
        self.top[feed] += 1
        seq = self.top[feed]
        mid = message_id(self.epoch, seq)
        flat = codec.malformed_fields(mid, error, b"\x0a\x02no", now, now)
        self.written[feed][seq] = flat
        [entry] = await self._call(feed, [(seq, mid, flat)])
        return entry

    async def refill(self, feed: str, first: int, last: int | None = None, chunk: int = 500) -> None:
        """What the ingestor does once Redis lost the stream: seqs `first`..`last` (default:
        the top) again, with the same ids, the stream starting at `first`."""
        last = self.top[feed] if last is None else last
        for low in range(first, last + 1, chunk):
            seqs = range(low, min(last, low + chunk - 1) + 1)
            messages = [(s, message_id(self.epoch, s), self.written[feed][s]) for s in seqs]
            await self._call(feed, messages, start=first)

    def expected(self, feed: str) -> list[str]:
        """The message ids appended to `feed`, by seq."""
        return [message_id(self.epoch, s) for s in sorted(self.written[feed])]

    async def _call(
        self, feed: str, messages: Sequence[tuple[int, str, Sequence[str]]], start: int = 0
    ) -> list[str]:
        keys, argv = scripts.ingest_append_call(self.keys, feed, self.epoch, messages, self.ttl, start)
        result = await self.script(keys=keys, args=argv)
        ids = [r[0].decode() if isinstance(r[0], bytes) else str(r[0]) for r in result]
        holes = [m[0] for m, r in zip(messages, result, strict=True) if int(r[1]) < 0]
        assert not holes, f"{feed}: seqs {holes} not appended: the stream's top is below them"
        return ids


async def xrange_all(redis: Redis, prefix: str, feed: str) -> list[tuple[str, dict[str, str]]]:
    raw: Any = await redis.xrange(Keys(prefix).stream(feed))
    return [(i.decode() if isinstance(i, bytes) else str(i), codec.str_entry(f)) for i, f in raw]


# -- the catalogue (contract v2, section 3), written by plain SQL as the archiver would --

_COMMON = """message_id text PRIMARY KEY, epoch text NOT NULL, seq bigint NOT NULL,
    stream_id text NOT NULL, entry_ms bigint NOT NULL, entry_n bigint NOT NULL,
    broker_time timestamptz NOT NULL, ingest_time timestamptz NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now()"""
_TYPED = {
    "execution": "symbol text NOT NULL, market text NOT NULL, price real NOT NULL, quantity real NOT NULL, "
    "execution_epoch bigint NOT NULL, state_symbol text NOT NULL",
    "sport_event": "sport text NOT NULL, match_title text NOT NULL, data_event text NOT NULL",
}
_COLUMNS = {
    "execution": (
        ("symbol", "symbol"), ("market", "market"), ("price", "price"), ("quantity", "quantity"),
        ("execution_epoch", "executionEpoch"), ("state_symbol", "stateSymbol"),
    ),
    "sport_event": (("sport", "sport"), ("match_title", "match_title"), ("data_event", "data_event")),
}


async def create_catalogue(pg: Any, schema: str) -> None:
    """The catalogue tables as contract v2 says (the archiver owns the real migration):
    feed tables unique on (epoch, seq), `dead_letter` with `epoch` and `seq`."""
    await pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    for feed, typed in _TYPED.items():
        await pg.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".{feed} ({_COMMON}, {typed}, message jsonb NOT NULL,'
            " UNIQUE (epoch, seq))"
        )
        index = f"CREATE INDEX IF NOT EXISTS {feed}_broker_time_idx"
        await pg.execute(f'{index} ON "{schema}".{feed} (broker_time)')
    await pg.execute(
        f"""CREATE TABLE IF NOT EXISTS "{schema}".dead_letter (id bigserial PRIMARY KEY,
        source text NOT NULL, feed text, message_id text, subject text, broker_seq bigint,
        stream_id text, error text NOT NULL, payload bytea, fields jsonb, broker_time timestamptz,
        ingest_time timestamptz, archived_at timestamptz NOT NULL DEFAULT now(), epoch text, seq bigint,
        UNIQUE (source, message_id))"""
    )


async def archive(pg: Any, schema: str, feed: str, entries: Sequence[tuple[str, Mapping[str, str]]]) -> None:
    """Catalogue rows of stream entries `(entry id, fields)`, as the archiver writes them:
    a valid message in the feed's table, a malformed one (an `error` field) in
    `dead_letter` with its feed, epoch and seq (source 'ingestor')."""
    await create_catalogue(pg, schema)
    for entry_id, fields in entries:
        epoch, _, seq_text = fields["message_id"].rpartition(".")
        seq = int(seq_text)
        assert entry_id == f"{seq}-0" and fields["seq"] == seq_text, (entry_id, fields)
        times = [codec.parse_iso(fields["broker_time"]), codec.parse_iso(fields["ingest_time"])]
        if codec.is_malformed(fields):
            await pg.execute(
                f'INSERT INTO "{schema}".dead_letter (source, feed, message_id, stream_id, error,'
                " payload, broker_time, ingest_time, epoch, seq)"
                " VALUES ('ingestor', $1, $2, $3, $4, $5, $6, $7, $8, $9)",
                feed, fields["message_id"], entry_id, fields["error"],
                base64.b64decode(fields["payload_b64"]), *times, epoch, seq,
            )
            continue
        message = codec.typed_message(FEEDS[feed], fields)
        typed = [message[key] for _, key in _COLUMNS[feed]]
        names = ", ".join(column for column, _ in _COLUMNS[feed])
        marks = ", ".join(f"${i}" for i in range(9, 9 + len(typed) + 1))
        await pg.execute(
            f'INSERT INTO "{schema}".{feed} (message_id, epoch, seq, stream_id, entry_ms, entry_n,'
            f" broker_time, ingest_time, {names}, message) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {marks})",
            fields["message_id"], epoch, seq, entry_id, seq, 0, *times, *typed, json.dumps(message),
        )


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    has_id: bool = False

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Stream:
    """One SSE connection read with raw asyncio streams."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    body: bytes = b""
    last_id: str | None = None
    events: list[Event] = field(default_factory=list)
    _buf: bytes = b""
    _chunked: bool = False
    _pending: list[Event] = field(default_factory=list)

    async def next(self, within: float = 20.0) -> Event:
        """The next dispatched frame: a feed event, a notice, or an id-only frame (event '')."""
        async with asyncio.timeout(within):
            while not self._pending:
                data = await self._read_body()
                if not data:
                    raise EOFError("stream ended")
                self._buf += data
                self._parse()
        ev = self._pending.pop(0)
        self.events.append(ev)
        if ev.has_id:
            self.last_id = ev.id  # what the client saw: frames read but not consumed are lost on close
        return ev

    async def collect(
        self, count: int, within: float = 30.0, feeds: Sequence[str] | None = None
    ) -> list[Event]:
        """The next `count` feed events (notices, `malformed` and id-only frames are kept in
        `events`)."""
        out: list[Event] = []
        async with asyncio.timeout(within):
            while len(out) < count:
                ev = await self.next(within)
                if ev.event in (feeds or FEED_NAMES):
                    out.append(ev)
        return out

    async def _read_body(self) -> bytes:
        if not self._chunked:
            return await self.reader.read(65536)
        line = await self.reader.readline()
        if not line:
            return b""
        size = int(line.strip() or b"0", 16)
        if size == 0:
            return b""
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    def _parse(self) -> None:
        while True:
            idx = self._buf.find(b"\n\n")
            if idx < 0:
                return
            block, self._buf = self._buf[:idx], self._buf[idx + 2 :]
            ev = Event(event="")
            data: list[str] = []
            for line in block.decode().split("\n"):
                if not line or line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    ev.event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    ev.id, ev.has_id = value, True
            ev.data = "\n".join(data)
            if data and not ev.event:
                ev.event = "message"
            if ev.has_id or data or ev.event:
                self._pending.append(ev)

    async def rest(self, within: float = 20.0) -> bytes:
        """The body from here to its end (for a stream the server ends); then closes."""
        out = b""
        try:
            async with asyncio.timeout(within):
                while chunk := await self._read_body():
                    out += chunk
        finally:
            self.close()
        return self._buf + out

    def close(self) -> None:
        self.writer.transport.abort()


async def open_stream(
    port: int,
    query: str = "",
    headers: Mapping[str, str] | None = None,
    receive_buffer: int | None = None,
    accept: str = "text/event-stream",
) -> Stream:
    """A GET /v1/stream. `accept`: text/event-stream as EventSource sends it (a refusal
    503 then comes in-band, as a 200 that ends), or e.g. */* as curl sends it (a 503)."""
    if receive_buffer is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:  # a small window: a client that does not read soon stalls the server's writes
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=receive_buffer)
    target = "/v1/stream" + ("?" + query if query else "")
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    writer.write((head + "\r\n").encode())
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    hdrs: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        hdrs[k.strip().lower()] = v.strip()
    stream = Stream(status, hdrs, reader, writer, _chunked=hdrs.get("transfer-encoding") == "chunked")
    if status != 200:
        length = int(hdrs.get("content-length", "0"))
        stream.body = await reader.readexactly(length) if length else b""
        writer.close()
    return stream


def gateway_env(settings: Any, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "FANOUT_KEY_PREFIX": settings.key_prefix,
            "FANOUT_DB_SCHEMA": settings.db_schema,
            "FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{port}",
            "FANOUT_LOG_FORMAT": "json",
            "FANOUT_TOKENS": "",
            # One process, as these tests expect (test_gateway_workers.py runs several).
            "FANOUT_GATEWAY_WORKERS": "1",
        }
    )
    env.update(extra)
    return env


class GatewayProcess:
    """`python -m fanout.cli gateway` on a free port."""

    def __init__(self, settings: Any, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.env = gateway_env(settings, self.port, **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Any = None

    async def start(self) -> None:
        if self.log is not None:
            self.log.close()
        self.log = tempfile.TemporaryFile()
        self.proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "fanout.cli", "gateway"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # nothing to await but the port: poll with a deadline
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.stderr()[-2000:]}")
            with contextlib.suppress(OSError):
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = await r.read()
                w.close()
                if b" 200 " in reply.split(b"\r\n", 1)[0]:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("gateway did not become ready")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill it if it still runs, and drop its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    def stderr(self) -> str:
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace"))


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Any, env: Mapping[str, str] | None = None
) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(settings, None, **(env or {}))
    await gw.start()
    try:
        yield gw
    finally:
        gw.close()


@contextlib.asynccontextmanager
async def inprocess_gateway(settings: Any, http: Any = "h11") -> AsyncIterator[Any]:
    """The app under uvicorn in this event loop, on a free port; yields the app (port on
    `app.state.port`). `http`: uvicorn's protocol (h11: the ASGI path only; the gateway's
    own `protocol.StreamProtocol`: live chunks written straight to the sockets)."""
    import uvicorn

    from services.sse_gateway.app import create_app

    port = free_port()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="none",
        http=http,
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(20):
        while not server.started:  # uvicorn offers no event to await
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
    app.state.port = port
    app.state.server = server
    try:
        yield app
    finally:
        app.state.stop.set()
        server.should_exit = True
        async with asyncio.timeout(30):
            await task


async def cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until each has ended (a task's other exception is raised)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
