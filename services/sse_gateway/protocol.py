"""uvicorn's HTTP protocol (httptools), giving the event stream its connection.

ASGI hands an app only `send`: every body chunk is a message through uvicorn's send
path, awaited by the task of the request. For a live subscriber that means one task
woken per subscriber per event, which dominated the gateway's cost when every event is
its own write (issue 10). With this protocol, a request's scope carries its connection
(`scope["extensions"]["fanout.connection"]`, a `Connection`), so once the response's
headers went out through ASGI (uvicorn set up chunked encoding), the hub writes each
live chunk, framed once per group, straight to the transport, and nothing wakes the
subscriber's task. Everything else (the headers, catch-up chunks, the final chunk)
still goes through ASGI `send`, so uvicorn's own state stays right.

Without this protocol (another server, h11, an in-process test client) there is no
`fanout.connection` and the stream works as before, through `send` only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

CONNECTION = "fanout.connection"


def frame(body: bytes) -> bytes:
    """`body` as one HTTP/1.1 chunk (what uvicorn writes for a body message)."""
    return b"%x\r\n%s\r\n" % (len(body), body)


class Connection:
    """The transport of one HTTP connection, for writes that bypass ASGI `send`.

    `send` is the hub's path, once per live subscriber per event: when the transport holds
    nothing unwritten it writes to the socket itself (one `write(2)`, what the transport's
    own fast path does, less about 1 µs of bookkeeping per call, measured on loopback), and
    leaves the transport whatever the kernel did not take. Order is kept: a direct write
    happens only while the transport has nothing queued, on the loop's one thread. The
    descriptor is never used once the transport is closing (it could name another
    connection after the close)."""

    __slots__ = ("_fd", "_on_lost", "lost", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.lost = False
        self._on_lost: Callable[[], None] | None = None
        sock = transport.get_extra_info("socket")
        tls = transport.get_extra_info("ssl_object") is not None  # never the raw socket then
        self._fd: int = sock.fileno() if sock is not None and not tls else -1

    def when_lost(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once the connection is gone (at once if it already is); None:
        no longer."""
        self._on_lost = callback
        if callback is not None and self.lost:
            self._gone()

    def _gone(self) -> None:
        self.lost = True
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    def write(self, framed: bytes) -> None:
        """One already framed chunk (`frame()`), now."""
        self.transport.write(framed)

    def send(self, framed: bytes, limit: int) -> bool:
        """Write one already framed chunk now, unless the bytes still unwritten plus it
        would pass `limit`: False then, and nothing written. A closing connection takes
        nothing and answers True (it is leaving; its stream ends on its own)."""
        transport = self.transport
        if transport.is_closing():
            return True
        queued = transport.get_write_buffer_size()
        if queued + len(framed) > limit:
            return False
        if queued or self._fd < 0:
            transport.write(framed)
            return True
        try:
            sent = os.write(self._fd, framed)
        except BlockingIOError:
            sent = 0
        except OSError:  # the connection broke: the transport meets the error and closes
            transport.write(framed)
            return True
        if sent < len(framed):
            transport.write(framed[sent:])
        return True

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return int(self.transport.get_write_buffer_size())

    @property
    def closing(self) -> bool:
        return bool(self.transport.is_closing())


class SmallEvent:
    """asyncio.Event's interface (set, clear, is_set, wait) without its deque (about
    600 bytes even when nobody waits): a connection has two, and thousands of idle
    connections make that count."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            waiters, self._waiters = self._waiters, None
            for fut in waiters or ():
                if not fut.done():
                    fut.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if self._waiters is not None and fut in self._waiters:
                self._waiters.remove(fut)
        return True


class _Pipeline:
    """The queue of pipelined requests (uvicorn's is a deque: about 600 bytes each)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Any] = []

    def appendleft(self, item: Any) -> None:
        self._items.insert(0, item)

    def pop(self) -> Any:
        return self._items.pop()

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)


class StreamProtocol(HttpToolsProtocol):
    """HttpToolsProtocol, plus the `fanout.connection` scope extension and a connection
    lost callback (no task per stream waiting on `receive` for the disconnect), and
    lighter per-connection state (SmallEvent, _Pipeline, and no request parser while the
    connection sits between requests).

    The parser (llhttp, with a bound method per callback: about 900 bytes) is needed only
    while a request arrives. An event stream's request is whole long before the stream
    ends, and nothing more comes from an `EventSource` for the hours it may last, so once
    the parser stands between two requests (a request complete, nothing of the next one
    fed) it is dropped, and made anew if the client sends more: a fresh parser is in the
    same state as one between requests."""

    __slots__ = ("_between", "_fanout")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fanout: Connection | None = None
        self._between = True  # no request begun: the parser may go
        self.pipeline = _Pipeline()  # type: ignore[assignment]

    def _new_parser(self) -> httptools.HttpRequestParser:
        """What uvicorn's __init__ makes."""
        parser = httptools.HttpRequestParser(self)
        if hasattr(parser, "set_dangerous_leniencies"):  # httptools >= 0.6.3
            parser.set_dangerous_leniencies(lenient_data_after_close=True)
        return parser

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.parser = self._new_parser()
        super().data_received(data)
        if self._between and self.cycle is not None and self.parser is not None:
            self.parser = None  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        self._between = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._between = True
        super().on_message_complete()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        writable = SmallEvent()
        writable.set()
        self.flow._is_writable_event = writable  # type: ignore[assignment]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.message_event = SmallEvent()  # type: ignore[assignment]
        if self._fanout is None:
            self._fanout = Connection(self.transport)
        scope: Any = self.scope
        scope.setdefault("extensions", {})[CONNECTION] = self._fanout

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._fanout is not None:
            self._fanout._gone()
