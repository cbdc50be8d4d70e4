"""The archiver when PostgreSQL goes away mid-conversation, made deterministic.

A server shutting down (or pg_terminate_backend) sends each backend's client a FATAL
ErrorResponse, then closes the socket. asyncpg reads the FATAL first: on an idle pooled
connection it puts the protocol in an error state, and until the close is read the pool
still hands the connection out; its next statement raises
`InternalClientError: cannot switch to state 15; another operation (2) is in progress`
(found by the fault suite after `restart Redis + restart Postgres`: both archivers died).

`PgProxy` sits between the archiver and the shared PostgreSQL and writes such a FATAL to
the clients itself, leaving the sockets open: the race window, held open on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from services.archiver.rows import feed_row
from services.archiver.service import Archiver
from services.archiver.store import TRANSIENT_ERRORS, Store, is_data_error
from shared import codec
from shared.feeds import EXECUTION, SPORT_EVENT
from shared.settings import Settings
from tests.integration.test_archiver import (
    append_feed,
    archiver_settings,
    assert_exactly_once,
    count_rows,
    execution_fields,
    message_id,
    rows_reach,
    running,
    times,
)


def _fatal_frame() -> bytes:
    """An ErrorResponse as a backend sends it when the server shuts down (57P01)."""
    body = b"".join(
        code + text.encode() + b"\x00"
        for code, text in (
            (b"S", "FATAL"),
            (b"V", "FATAL"),
            (b"C", "57P01"),
            (b"M", "terminating connection due to administrator command"),
        )
    )
    body += b"\x00"
    return b"E" + struct.pack("!i", len(body) + 4) + body


FATAL = _fatal_frame()


class PgProxy:
    """A TCP proxy to PostgreSQL that can say FATAL to its clients without closing them."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._url = parts
        self._server: asyncio.Server | None = None
        self._clients: list[asyncio.StreamWriter] = []
        self._upstream: list[asyncio.StreamWriter] = []  # our sockets to the server
        self._tasks: set[asyncio.Task[None]] = set()
        self.fatal_after_commit = False  # append a FATAL to the next COMMIT's reply
        self.injected = 0

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._url.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        return urlunsplit(self._url._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._clients:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def client_ports(self) -> list[int]:
        """The local ports of our connections to the server: `client_port` in
        pg_stat_activity, so that a test can terminate these backends and no others."""
        return [w.get_extra_info("sockname")[1] for w in self._upstream if not w.is_closing()]

    def say_fatal(self) -> int:
        """Write a FATAL to every open client connection; returns how many."""
        n = 0
        for writer in self._clients:
            if not writer.is_closing():
                writer.write(FATAL)
                n += 1
        self.injected += n
        return n

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        self._clients.append(client_w)
        self._upstream.append(server_w)
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, from_server=False),
                self._pump(server_r, client_w, from_server=True),
                return_exceptions=True,
            )
        finally:
            self._clients.remove(client_w)
            self._upstream.remove(server_w)
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_server: bool) -> None:
        try:
            while data := await src.read(65536):
                # CommandComplete "COMMIT" and its ReadyForQuery arrive in one read.
                if from_server and self.fatal_after_commit and b"C\x00\x00\x00\x0bCOMMIT\x00" in data:
                    self.fatal_after_commit = False
                    data += FATAL
                    self.injected += 1
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()


@pytest.fixture
async def proxy(base_settings: Settings) -> AsyncIterator[PgProxy]:
    p = PgProxy(base_settings.database_url)
    await p.start()
    yield p
    await p.close()


@contextlib.asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _rows(start: int, count: int) -> list[tuple[object, ...]]:
    rows = []
    for i in range(start, start + count):
        entry = codec.entry_fields(message_id(i), execution_fields(i), *times(i))
        fields = dict(zip(entry[::2], entry[1::2], strict=True)) | {"seq": str(i)}
        rows.append(feed_row(EXECUTION, f"{i}-0", fields))
    return rows


async def test_a_connection_that_read_a_fatal_is_discarded_and_the_error_is_transient(
    base_settings: Settings, proxy: PgProxy, pg: asyncpg.Connection
) -> None:
    async with opened(Store(proxy.url, base_settings.db_schema, pool_size=1)) as store:
        assert await store.insert_feed("execution", _rows(1, 10)) == 10
        assert proxy.say_fatal() == 1  # the pool's one connection, idle
        with pytest.raises(TRANSIENT_ERRORS) as caught:  # not a crash: back off and retry
            await store.insert_feed("execution", _rows(11, 10))
        assert not is_data_error(caught.value)
        # The broken connection was not given back: the retry gets a fresh one.
        assert await store.insert_feed("execution", _rows(11, 10)) == 10
        assert await store.ping()
    await assert_exactly_once(pg, base_settings.db_schema, "execution", {message_id(i) for i in range(1, 21)})


@pytest.mark.parametrize("method", ["copy", "staged"])
async def test_a_fatal_read_right_after_the_commit_does_not_fail_the_stored_batch(
    base_settings: Settings, proxy: PgProxy, pg: asyncpg.Connection, method: str
) -> None:
    async with opened(Store(proxy.url, base_settings.db_schema, method=method, pool_size=1)) as store:
        proxy.fatal_after_commit = True
        # Committed, then the pool cannot reset the connection on release: the batch is
        # stored all the same, and the connection is discarded, not reused.
        assert await store.insert_feed("execution", _rows(1, 10)) == 10
        assert proxy.injected == 1
        assert await store.insert_feed("execution", _rows(11, 10)) == 10
    await assert_exactly_once(pg, base_settings.db_schema, "execution", {message_id(i) for i in range(1, 21)})


async def test_archiver_survives_fatals_on_its_idle_connections_and_stores_each_message_once(
    base_settings: Settings, proxy: PgProxy, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, database_url=proxy.url, workers=2)
    schema = settings.db_schema
    archiver = Archiver(settings)
    expected_exec: set[str] = set()
    expected_sport: set[str] = set()
    async with running(archiver):
        for round_ in range(3):
            start = round_ * 50 + 1
            await append_feed(redis, settings, EXECUTION, start, 50)
            await append_feed(redis, settings, SPORT_EVENT, 10_000 + start, 50)
            expected_exec |= {message_id(i) for i in range(start, start + 50)}
            expected_sport |= {message_id(i) for i in range(10_000 + start, 10_000 + start + 50)}
            await rows_reach(pg, schema, "execution", len(expected_exec))
            await rows_reach(pg, schema, "sport_event", len(expected_sport))
            # Every pooled connection now holds a FATAL it has read; the next batches
            # meet them (the `running` helper fails the test if the archiver dies).
            assert proxy.say_fatal() >= 1
            proxy.fatal_after_commit = True
    assert proxy.injected >= 4
    await assert_exactly_once(pg, schema, "execution", expected_exec)
    await assert_exactly_once(pg, schema, "sport_event", expected_sport)


async def test_archiver_backends_terminated_while_storing_lose_and_repeat_nothing(
    base_settings: Settings, proxy: PgProxy, redis: Redis, pg: asyncpg.Connection
) -> None:
    """pg_terminate_backend on the archiver's own backends, again and again while it
    stores (mid-COPY, mid-commit, idle): the real FATAL-then-close, at random points."""
    settings = archiver_settings(base_settings, database_url=proxy.url, workers=2, batch=200)
    schema = settings.db_schema
    n = 3000
    terminated = 0
    async with running(Archiver(settings)):
        await append_feed(redis, settings, EXECUTION, 1, n)
        stored = 0
        for _ in range(10):  # after each new commit, terminate every backend of the archiver
            await rows_reach(pg, schema, "execution", min(stored + 1, n))  # fails if the archiver died
            stored = await count_rows(pg, schema, "execution")
            if stored >= n:
                break
            terminated += int(
                await pg.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE client_port = ANY($1::int[]) AND client_addr = '127.0.0.1'",
                    proxy.client_ports(),
                )
            )
        await rows_reach(pg, schema, "execution", n, within=120)
    assert terminated >= 1, terminated
    await assert_exactly_once(pg, schema, "execution", {message_id(i) for i in range(1, n + 1)})
