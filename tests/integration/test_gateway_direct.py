"""The gateway's own HTTP protocol (`protocol.StreamProtocol`, what `fanout gateway`
runs): live chunks are written by the hub straight to each subscriber's socket, with no
task woken per subscriber (issue 10). Every guarantee of the ASGI path holds there too:
exact order, filters, the byte bound of a live subscriber (its socket's write buffer)
with the drop to catch-up and back, heartbeats on a quiet live stream, a disconnect
noticed without a task waiting for it, a client that stops reading cut off and resuming
exactly."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from services.sse_gateway.protocol import StreamProtocol
from tests.integration.test_gateway import feed_events, metric, seqs
from tests.integration.test_gateway_helpers import Writer, inprocess_gateway, open_stream

pytestmark = pytest.mark.timeout(120)


async def test_live_subscribers_are_written_directly_and_get_every_event_once_in_order(
    make_settings: Any, writer: Writer
) -> None:
    await writer.append("execution", 1)
    async with inprocess_gateway(make_settings(), http=StreamProtocol) as app:
        streams = [await open_stream(app.state.port, "feeds=execution") for _ in range(20)]
        filtered = await open_stream(app.state.port, "feeds=execution&symbol=AAPL")
        for s in [*streams, filtered]:
            await s.next()  # the start frame: then it joins the live set
        subs = list(app.state.subscribers)
        async with asyncio.timeout(20):
            while not all(sub.live for sub in subs):  # noqa: ASYNC110 - another task's state, no event
                await asyncio.sleep(0.01)
        assert all(sub.conn is not None for sub in subs)  # the direct path, not the ASGI one
        for _ in range(30):
            await writer.append("execution", 10)
            assert all(not sub.buffer and sub.pending == 0 for sub in subs)  # nothing queued
        for s in streams:
            await s.collect(300)
        async with asyncio.timeout(30):  # events and id-only frames: every seq moves the cursor
            while not (filtered.last_id or "").endswith(".301"):
                await filtered.next()
        for s in [*streams, filtered]:
            s.close()
    for s in streams:
        assert seqs(feed_events(s), "execution") == list(range(2, 302))
    aapl = feed_events(filtered)
    assert aapl and all(e.json()["symbol"] == "AAPL" for e in aapl)
    assert len([e for e in filtered.events if e.has_id]) == 301  # the start frame + one per seq


async def test_a_live_subscriber_is_bounded_by_its_socket_buffer_in_bytes(
    make_settings: Any, writer: Writer
) -> None:
    settings = make_settings(client_buffer_bytes=8192, catchup_batch=50)
    overflows = metric("fanout_gateway_buffer_overflows_total")
    async with inprocess_gateway(settings, http=StreamProtocol) as app:
        s = await open_stream(app.state.port, "feeds=execution", receive_buffer=4096)
        await s.next()
        [sub] = list(app.state.subscribers)
        for _ in range(40):  # not reading meanwhile: far more than 8 KB
            await writer.append("execution", 100)
            assert sub.conn is not None and (not sub.live or sub.conn.buffered() <= 8192 + 4096)
        await s.collect(4000, within=60)
        s.close()
    assert metric("fanout_gateway_buffer_overflows_total") > overflows
    assert [e.json()["message_id"] for e in feed_events(s)] == writer.expected("execution")


async def test_a_quiet_live_stream_gets_heartbeats(make_settings: Any, writer: Writer) -> None:
    await writer.append("execution", 1)
    async with inprocess_gateway(make_settings(heartbeat=0.2), http=StreamProtocol) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        await s.next()
        [sub] = list(app.state.subscribers)
        raw = b""
        async with asyncio.timeout(20):
            while raw.count(b": heartbeat") < 2:
                raw += await s._read_body()
        assert sub.live and sub.conn is not None
        s.close()


async def test_a_disconnect_is_noticed_without_a_task_waiting_for_it(
    make_settings: Any, writer: Writer
) -> None:
    await writer.append("execution", 1)
    async with inprocess_gateway(make_settings(), http=StreamProtocol) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        await s.next()
        assert len(app.state.subscribers) == 1
        s.close()
        async with asyncio.timeout(20):
            await app.state.subscribers.empty.wait()


async def test_a_client_that_stops_reading_is_cut_off_and_resumes_exactly(
    make_settings: Any, writer: Writer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(slow_client_timeout=0.5)
    disconnects = metric("fanout_gateway_slow_disconnects_total")
    caplog.set_level(logging.INFO)
    async with inprocess_gateway(settings, http=StreamProtocol) as app:
        s = await open_stream(app.state.port, "feeds=execution", receive_buffer=4096)
        await s.next()
        for _ in range(20):  # ~13 MB, far more than the socket buffers hold; the client reads nothing
            await writer.append("execution", 500, stateSymbol="CA" + "x" * 1000)
        async with asyncio.timeout(60):
            await app.state.subscribers.empty.wait()  # the server gave up on it
        with pytest.raises(EOFError):
            while True:
                await s.next(within=60)
        s.close()
        assert metric("fanout_gateway_slow_disconnects_total") == disconnects + 1
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        t = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": s.last_id or ""})
        await t.collect(10_000 - len(feed_events(s)), within=60)
        t.close()
    assert seqs(feed_events(s) + feed_events(t), "execution") == list(range(1, 10_001))


async def _read_responses(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """`count` whole HTTP/1.1 responses with a Content-Length body: their bodies."""
    bodies = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        bodies.append(await reader.readexactly(length))
    return bodies


async def test_the_request_parser_is_dropped_between_requests_and_made_anew(
    make_settings: Any, writer: Writer
) -> None:
    """An idle stream holds no parser (memory per subscriber); a keep-alive connection
    whose parser was dropped still parses what comes next: a request split in bytes, then
    two pipelined in one write, each answered once and in order."""
    await writer.append("execution", 1)
    async with inprocess_gateway(make_settings(), http=StreamProtocol) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        await s.next()
        streaming = [p for p in app.state.server.server_state.connections if p.cycle is not None]
        assert len(streaming) == 1 and streaming[0].parser is None

        reader, w = await asyncio.open_connection("127.0.0.1", app.state.port)
        try:
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            [first] = await _read_responses(reader, 1)
            [conn] = [p for p in app.state.server.server_state.connections if p is not streaming[0]]
            assert conn.parser is None  # between requests
            for byte in b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n":  # one byte a segment
                w.write(bytes([byte]))
                await w.drain()
            [second] = await _read_responses(reader, 1)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            third, fourth = await _read_responses(reader, 2)
        finally:
            w.close()
        s.close()
    assert first == third and second == fourth and first != second  # /healthz and /readyz, in order
