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
