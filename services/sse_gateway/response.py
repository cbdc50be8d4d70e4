"""The event-stream response: a raw ASGI response that sends each chunk the subscriber
hands it (everything pending, joined) as ONE body message, and ends the subscriber when
the client disconnects, a write stalls past the slow-client timeout, or the app stops.
Once the headers are out it hands the subscriber its connection, when the server gives
one (`protocol.StreamProtocol`): live chunks then go straight to the socket, and the
protocol reports the disconnect (no task per stream waiting for it).

Also `unavailable_stream`: what an EventSource client gets instead of a 503."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from services.sse_gateway import frames, metrics
from services.sse_gateway.protocol import CONNECTION, Connection
from services.sse_gateway.subscriber import SLOW_CLIENT, Registry, Subscriber

log = logging.getLogger(__name__)

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def wants_event_stream(accept: str) -> bool:
    """Whether the client asked for an event stream: EventSource always sends
    `Accept: text/event-stream`; curl, fetch() and most HTTP libraries send `*/*`."""
    return "text/event-stream" in accept.lower()


def unavailable_stream(error: Mapping[str, Any], retry_after: float) -> Response:
    """For an EventSource client, what stands in for a 503: EventSource fails for good on
    any status but 200 (it reconnects only after a network error or the end of a 200
    stream). So: 200, `retry:` set to the Retry-After, the error as one comment line
    (`: unavailable {"error": ..., "detail": ...}`; JSON holds no line break), and the
    end of the stream. The browser reconnects after that delay with the Last-Event-ID it
    had: nothing is lost or repeated. Clients that do not ask for text/event-stream keep
    the 503 with Retry-After."""
    body = frames.retry(max(0, int(retry_after * 1000))) + b": unavailable " + frames.dumps(error) + b"\n\n"
    headers = {k.decode(): v.decode() for k, v in HEADERS if k != b"content-type"}
    return Response(body, status_code=200, headers=headers, media_type="text/event-stream")


# Set (in the request's own task context) when this response gives up on a stalled client.
_GAVE_UP: ContextVar[bool] = ContextVar("fanout_gateway_gave_up_on_stalled_client", default=False)
INCOMPLETE = "ASGI callable returned without completing response"


class ExpectedIncomplete(logging.Filter):
    """For the `uvicorn.error` logger: drops uvicorn's ERROR "ASGI callable returned without
    completing response" for a stream this module ended on purpose (a stalled client),
    and only for that; the gateway logs its own INFO line for it.

    Why a log filter and not a completed response: completing one means sending the last
    body message, and uvicorn's send first awaits the transport's drain, which a client
    that stopped reading never allows; ASGI gives an app no way to abort the connection.
    Returning with the response incomplete is what makes uvicorn close the connection, so
    it is the right ending; only the log line is wrong for it. uvicorn runs each request
    in a task of its own context, where EventStream sets `_GAVE_UP`, and logs that line
    from the same task right after the app returns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_GAVE_UP.get() and str(record.msg).startswith(INCOMPLETE))


class EventStream:
    def __init__(
        self,
        subscriber: Subscriber,
        subscribers: Registry,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.subscriber = subscriber
        self.subscribers = subscribers
        self.headers = HEADERS + headers if headers else HEADERS  # shared when nothing is added

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.subscriber
        task = sub.task = asyncio.current_task()
        assert task is not None
        conn: Connection | None = scope.get("extensions", {}).get(CONNECTION)
        watcher: asyncio.Task[None] | None = None
        if conn is not None:  # the protocol says when the client goes: no task waiting for it
            conn.when_lost(sub.lost)
        else:
            watcher = asyncio.create_task(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            sub.conn = conn  # the headers are out: live chunks may now go straight to it
            # Nothing reads the request's headers once the response started; a browser sends
            # a dozen (1-3 KB) that would otherwise stay for the hours a stream lasts.
            if isinstance(scope["headers"], list):
                scope["headers"].clear()
            async with contextlib.aclosing(sub.stream()) as chunks:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    if not await self._write(send, task, chunk, more=True) or sub.closed:
                        break
            if not sub.stalled:
                await self._write(send, task, b"", more=False)
        except OSError:
            pass  # the client went away mid-write
        finally:
            sub.close()
            if watcher is not None:
                watcher.cancel()
            if conn is not None:
                conn.when_lost(None)
            self.subscribers.discard(sub)

    async def _write(self, send: Send, task: asyncio.Task[Any], body: bytes, *, more: bool) -> bool:
        """Send one body message; False if the watchdog gave up on it (the client stopped
        reading). No timer per write: the registry's watchdog cancels a write stalled past
        the slow-client timeout (see Registry.tend), the last one (more=False) included,
        which would otherwise wait forever on a client that never reads again."""
        sub = self.subscriber
        sub.sending_since = asyncio.get_running_loop().time()
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more})
            return True
        except asyncio.CancelledError:
            if not sub.stalled:
                raise
            task.uncancel()  # our own watchdog's cancellation: handled here
            _GAVE_UP.set(True)  # the response stays incomplete: see ExpectedIncomplete
            if sub.close_reason != SLOW_CLIENT:  # counted and logged once, by the subscriber
                metrics.SLOW_DISCONNECTS.inc()
                log.info("subscriber disconnected: a write stalled", extra={"feeds": ",".join(sub.feeds)})
            return False
        finally:
            sub.sending_since = 0.0

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.subscriber.close("client disconnected")
                return
