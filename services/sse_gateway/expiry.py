"""A stream ends when its credential does: at a JWT's `exp` (or that of the ticket got
with one), the subscriber is closed and the stream's last frame is

    event: expired
    data: {"reason":"token_expired","expired_at":"2026-11-28T10:43:18.000Z"}

after which the response ends. The client gets a fresh token from its backend and
reconnects with its last event id (an EventSource: close it on `expired`, open a new one
with `?last_event_id=<e.lastEventId>` and the new token; left alone it would reconnect
with the old URL and get a 401, after which an EventSource gives up for good).

`Expiring` wraps the stream's ASGI response: a timer closes the subscriber at the expiry,
and the response's final body message (the one that ends it) carries the notice, so
nothing the subscriber already produced is cut off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.sse_gateway import frames
from services.sse_gateway.subscriber import Subscriber

log = logging.getLogger(__name__)

REASON = "token_expired"
CLOSE_REASON = "credential expired"
EXPIRED = Counter("fanout_gateway_expired_total", "streams ended at their credential's expiry")


def notice(expires: float) -> bytes:
    when = datetime.fromtimestamp(expires, UTC)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    return frames.notice("expired", {"reason": REASON, "expired_at": stamp})


class Expiring:
    """The stream `response` of `subscriber`, ended at `expires` (Unix seconds)."""

    def __init__(self, response: ASGIApp, subscriber: Subscriber, expires: float, who: str) -> None:
        self.response = response
        self.subscriber = subscriber
        self.expires = expires
        self.who = who

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            self.subscriber.close(CLOSE_REASON)

        async def send_with_notice(message: Message) -> None:
            if fired and message["type"] == "http.response.body" and not message.get("more_body", False):
                message = {**message, "body": message.get("body", b"") + notice(self.expires)}
                EXPIRED.inc()
                log.info("stream ended: its credential expired", extra={"who": self.who})
            await send(message)

        delay = max(0.0, self.expires - time.time())
        timer = asyncio.get_running_loop().call_later(delay, expire)
        try:
            await self.response(scope, receive, send_with_notice)
        finally:
            timer.cancel()
