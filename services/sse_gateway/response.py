"""The event-stream response: a raw ASGI response that sends each chunk the subscriber
hands it (everything pending, joined) as ONE body message, and ends the subscriber when
the client disconnects, a write stalls past the slow-client timeout, or the app stops.

Also `unavailable_stream`: what an EventSource client gets instead of a 503."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from services.sse_gateway import frames, metrics
from services.sse_gateway.subscriber import Registry, Subscriber

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


class EventStream:
    def __init__(
        self,
        subscriber: Subscriber,
        subscribers: Registry,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.subscriber = subscriber
        self.subscribers = subscribers
        self.headers = HEADERS + (headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.subscriber
        loop = asyncio.get_running_loop()
        task = sub.task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async with contextlib.aclosing(sub.stream()) as chunks:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    # No timer per write: the registry's watchdog cancels a write stalled
                    # past the slow-client timeout (see Registry.tend).
                    sub.sending_since = loop.time()
                    try:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    except asyncio.CancelledError:
                        if not sub.stalled:
                            raise
                        task.uncancel()  # our own watchdog's cancellation: handled here
                        metrics.SLOW_DISCONNECTS.inc()
                        log.info(
                            "subscriber disconnected: a write stalled", extra={"feeds": ",".join(sub.feeds)}
                        )
                        break
                    finally:
                        sub.sending_since = 0.0
                    if sub.closed:
                        break
            if not sub.stalled:
                with contextlib.suppress(OSError):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        finally:
            sub.close()
            watcher.cancel()
            self.subscribers.discard(sub)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.subscriber.close("client disconnected")
                return
