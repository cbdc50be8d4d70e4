"""The benchmark's SSE load client counts exactly: every event once, lost and duplicated
seqs, across HTTP chunk boundaries and socket reads split anywhere."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.loadclient import BUCKET_NS, LoadClients, SSEConnection, Stats, Worker


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _event(seq: int, publish_ns: int, event: str = "execution") -> bytes:
    data = f'{{"symbol":"B","executionEpoch":{publish_ns},"message_id":"1.{seq}","seq":{seq}}}'
    return f"event: {event}\ndata: {data}\nid: v1:execution.e.1-{seq}.{seq}\n\n".encode()


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)


HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
HEAD_PLAIN = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"


def _connection(lo: int, hi: int) -> tuple[SSEConnection, Stats, asyncio.Future[None]]:
    connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stats = Stats()
    stats.lo, stats.hi = lo, hi
    conn = SSEConnection(stats, connected)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.next = lo
    return conn, stats, connected


def _feed(conn: SSEConnection, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        conn.data_received(data[i : i + step])


@pytest.mark.parametrize("step", [1, 7, 64, 100_000])
@pytest.mark.parametrize("chunked", [True, False])
async def test_counts_every_event_once_whatever_the_read_boundaries(step: int, chunked: bool) -> None:
    now = time.time_ns()
    events = [_event(seq, now) for seq in range(1, 51)]
    # Chunks that split events mid-JSON, plus heartbeats and an id-only frame.
    body = b"retry: 2000\n\n" + b"".join(events[:20]) + b": ping\n\n" + b"id: x\n\n" + b"".join(events[20:])
    parts = [body[i : i + 97] for i in range(0, len(body), 97)]
    conn, stats, connected = _connection(1, 50)
    _feed(conn, (HEAD_CHUNKED + _chunked(parts)) if chunked else (HEAD_PLAIN + body), step)
    assert connected.done() and connected.exception() is None
    assert (stats.delivered, stats.lost, stats.duplicated, stats.unparsed) == (50, 0, 0, 0)
    assert conn.next == 51 and conn.is_done and stats.done == 1
    assert sum(stats.hist) == 50


async def test_lost_and_duplicated_seqs() -> None:
    now = time.time_ns()
    seqs = [1, 2, 2, 5, 6, 3, 7]  # 3 and 4 skipped (3 arrives late: a duplicate by then)
    conn, stats, _ = _connection(1, 8)
    _feed(conn, HEAD_PLAIN + b"".join(_event(s, now) for s in seqs), 1000)
    assert stats.delivered == 7
    assert stats.lost == 2  # 3, 4
    assert stats.duplicated == 2  # the second 2, the late 3
    assert not conn.is_done  # 8 never came: the report counts it as missing
    assert stats.hi + 1 - conn.next == 1


async def test_events_outside_the_window_are_not_counted() -> None:
    now = time.time_ns()
    conn, stats, _ = _connection(10, 12)
    _feed(conn, HEAD_PLAIN + b"".join(_event(s, now) for s in range(5, 15)), 1000)
    assert (stats.delivered, stats.lost, stats.duplicated) == (3, 0, 0)
    assert conn.is_done


async def test_latency_goes_into_the_histogram() -> None:
    published = time.time_ns() - 250_000_000  # 250 ms ago
    conn, stats, _ = _connection(1, 1)
    _feed(conn, HEAD_PLAIN + _event(1, published), 1000)
    bucket = next(i for i, n in enumerate(stats.hist) if n)
    assert 250 <= bucket * BUCKET_NS / 1e6 < 300  # the read came after the publish, soon after


async def test_a_refused_subscription_fails_the_connect() -> None:
    conn, _, connected = _connection(1, 1)
    conn.data_received(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
    exc: Any = connected.exception()
    assert isinstance(exc, ConnectionError) and "503" in str(exc)
    assert conn.transport is not None and conn.transport.closed  # type: ignore[attr-defined]


async def test_the_end_of_the_response_closes_the_connection() -> None:
    conn, _, _ = _connection(1, 1)
    conn.data_received(HEAD_CHUNKED + _chunked([b": hi\n\n"]) + b"0\r\n\r\n")
    assert conn.transport is not None and conn.transport.closed  # type: ignore[attr-defined]


async def test_the_last_id_and_the_retry_are_kept_for_a_reconnect() -> None:
    now = time.time_ns()
    conn, _, _ = _connection(1, 10)
    _feed(
        conn, HEAD_PLAIN + b"retry: 2345\n\n" + b"".join(_event(s, now) for s in (1, 2)) + b": ping\n\n", 1000
    )
    assert conn.retry_ms == 2345
    assert conn.last_id == b"v1:execution.e.1-2.2"  # the last complete event's id, not the ping's


async def test_a_dropped_connection_that_comes_back_goes_on_counting_where_it_was() -> None:
    now = time.time_ns()
    lost: list[SSEConnection] = []
    connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stats = Stats()
    stats.lo, stats.hi = 1, 6
    conn = SSEConnection(stats, connected, _recorder(lost))
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.next = 1
    _feed(conn, HEAD_PLAIN + b"".join(_event(s, now) for s in (1, 2, 3)), 1000)
    conn.connection_lost(None)
    assert lost == [conn] and not conn.is_done and stats.done == 0  # it will come back: not done

    conn.reset(asyncio.get_running_loop().create_future())
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    _feed(conn, HEAD_PLAIN + b"".join(_event(s, now) for s in (3, 4, 6)), 1000)
    assert (stats.delivered, stats.duplicated, stats.lost) == (6, 1, 1)  # 3 again, 5 skipped
    assert conn.is_done and stats.done == 1


async def test_a_failed_reconnect_is_no_drop() -> None:
    lost: list[SSEConnection] = []
    conn = SSEConnection(Stats(), asyncio.get_running_loop().create_future(), _recorder(lost))
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
    conn.connection_lost(None)
    assert lost == []  # the reconnect loop sees the failed connect and tries again itself


def _recorder(lost: list[SSEConnection]) -> Any:
    """An on_lost callback that records the connection and says it will come back."""

    def on_lost(conn: SSEConnection) -> bool:
        lost.append(conn)
        return True

    return on_lost


class _Worker:
    """A load client process as the controller sees it: a pid and its stdout."""

    def __init__(self, *lines: str) -> None:
        self.pid = 4242
        self.stdout = asyncio.StreamReader()
        for line in lines:
            self.stdout.feed_data(line.encode() + b"\n")


async def test_a_worker_saying_done_before_back_is_heard_by_both_waits() -> None:
    """A subscriber that comes back after the window's last seq gets it with the response
    headers: its worker says "done" before "back". Waiting for "back" must not swallow
    the "done" that the wait after it needs."""
    pool = LoadClients("http://127.0.0.1:9/v1/stream", 1, procs=1)
    pool.window_id = 7
    pool.workers = [_Worker('{"event": "done", "id": 7}', '{"event": "back", "dropped": 1}')]  # type: ignore[list-item]
    assert await pool.all_back(5)
    assert await pool.wait_done(5)


@pytest.mark.parametrize("chunked", [True, False])
async def test_counts_every_event_once_when_each_read_is_one_whole_chunk(chunked: bool) -> None:
    # What a server's one write per event looks like to the client: the fast path of _dechunk.
    now = time.time_ns()
    events = [_event(seq, now) for seq in range(1, 31)]
    conn, stats, _ = _connection(1, 30)
    conn.data_received(HEAD_CHUNKED if chunked else HEAD_PLAIN)
    for event in events:
        conn.data_received(_chunked([event]) if chunked else event)
    assert (stats.delivered, stats.lost, stats.duplicated, stats.unparsed) == (30, 0, 0, 0)
    assert conn.next == 31 and conn.is_done


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
    extension=st.booleans(),
)
def test_dechunk_gives_back_exactly_the_chunk_data_however_the_reads_fall(
    parts: list[bytes], cuts: list[int], extension: bool
) -> None:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=1" if extension else b"", p) for p in parts)
    bounds = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    conn = SSEConnection(Stats(), connected=None)  # type: ignore[arg-type]  # not read by _dechunk
    conn.transport = _Transport()  # type: ignore[assignment]
    out = b"".join(conn._dechunk(body[a:b]) for a, b in itertools.pairwise(bounds))
    assert out == b"".join(parts)
    assert conn.raw == b"" and conn.chunk_left == 0


async def test_a_storm_counts_the_attempts_to_come_back_that_failed() -> None:
    """Each failed attempt costs its subscriber another `retry:`: the storm reports them."""
    worker = Worker("http://127.0.0.1:9/v1/stream", 1)
    worker.reconnect = True
    conn = SSEConnection(worker.stats, asyncio.get_running_loop().create_future(), worker._lost)
    conn.retry_ms = 0
    worker.conns.append(conn)
    outcomes: list[BaseException | None] = [
        ConnectionRefusedError(),
        TimeoutError(),
        ConnectionRefusedError(),
        None,
    ]

    async def connect(c: SSEConnection, source: str) -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    worker._connect = connect  # type: ignore[method-assign,assignment]
    worker.emit = lambda **msg: None  # type: ignore[method-assign]
    assert worker._lost(conn)
    await asyncio.gather(*worker._reconnects)
    assert outcomes == []
    assert (worker.dropped, worker.back) == (1, 1)
    assert worker.failed == {"ConnectionRefusedError": 2, "TimeoutError": 1}
    assert len(worker.back_ns) == 1 and worker.back_ns[0] >= worker.first_drop_ns > 0
