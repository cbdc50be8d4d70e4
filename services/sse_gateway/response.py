"""The event-stream response: a raw ASGI response that sends each chunk the subscriber
hands it (everything pending, joined) as ONE body message, and ends the subscriber when
the client disconnects, a write stalls past the slow-client timeout, or the app stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import Message, Receive, Scope, Send

from services.sse_gateway import metrics
from services.sse_gateway.subscriber import Registry, Subscriber

log = logging.getLogger(__name__)

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class EventStream:
    def __init__(
        self,
        subscriber: Subscriber,
        subscribers: Registry,
        send_timeout: float,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.subscriber = subscriber
        self.subscribers = subscribers
        self.send_timeout = send_timeout
        self.headers = HEADERS + (headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.subscriber
        watcher = asyncio.create_task(self._watch(receive))
        stalled = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async with contextlib.aclosing(sub.stream()) as chunks:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    try:
                        async with asyncio.timeout(self.send_timeout):
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    except TimeoutError:
                        stalled = True
                        metrics.SLOW_DISCONNECTS.inc()
                        log.info(
                            "subscriber disconnected: a write stalled", extra={"feeds": ",".join(sub.feeds)}
                        )
                        break
                    if sub.closed:
                        break
            if not stalled:
                with contextlib.suppress(OSError):
                    async with asyncio.timeout(1.0):
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
