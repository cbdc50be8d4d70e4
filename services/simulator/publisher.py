"""Publish payloads on core NATS at a steady rate: a batch per tick, one flush per tick,
no sleep per message.

At `rate` messages/s the publisher works out how many messages are due since it started,
publishes them, flushes, and waits for the next one to fall due (at least `MIN_TICK`, so
a high rate goes out in batches). Rate 0 publishes as fast as NATS takes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from services.simulator import metrics
from services.simulator.generator import Payload
from shared.lifecycle import Backoff, wait_or_stop

log = logging.getLogger(__name__)

MIN_TICK = 0.005  # seconds: the shortest wait between two batches
MAX_BATCH = 5_000  # messages published between two flushes, at most
FAST_BATCH = 1_000  # messages per batch at rate 0 (as fast as possible)
FLUSH_TIMEOUT = 5  # seconds NATS has to confirm a batch (PING/PONG)


@dataclass
class Counts:
    feed: str
    published: int = 0
    malformed: int = 0
    failed: int = 0  # payloads the client refused (closed, or buffer full while NATS is away): lost
    defects: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


async def publish_feed(
    nc: NATS,
    subject: str,
    source: Iterator[Payload],
    counts: Counts,
    stop: asyncio.Event,
    *,
    rate: float,
    count: int | None,
) -> Counts:
    """Publish from `source` on `subject` until `count` are out (then flush) or `stop` is set."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    wall = time.monotonic()
    backoff = Backoff(base=0.2, cap=5.0)
    attempted = 0  # messages taken from the source (published or failed)
    try:
        while not stop.is_set() and (count is None or attempted < count):
            if rate > 0:
                due = int((loop.time() - start) * rate) + 1 - attempted
            else:
                due = FAST_BATCH
            due = min(due, MAX_BATCH)
            if count is not None:
                due = min(due, count - attempted)
            batch = [next(source) for _ in range(max(0, due))]
            attempted += len(batch)
            accepted = 0
            try:
                for payload in batch:
                    await nc.publish(subject, payload.data)  # into the client's buffer
                    accepted += 1
            except (NatsError, OSError) as exc:
                # The client refused them (closed, or its buffer is full while NATS is away):
                # these payloads are lost, as an upstream publisher's would be.
                lost = len(batch) - accepted
                counts.failed += lost
                metrics.FAILED.labels(counts.feed).inc(lost)
                log.warning("NATS refused payloads; they are lost",
                            extra={"feed": counts.feed, "error": repr(exc), "lost": lost})
            _account(counts, batch[:accepted])
            if accepted < len(batch):
                if await backoff.wait(stop):
                    break
                continue
            try:
                await nc.flush(timeout=FLUSH_TIMEOUT)
            except (NatsError, OSError, TimeoutError) as exc:
                # Still in the client's buffer: sent when NATS is back (or lost if it never is).
                log.warning("NATS did not confirm a batch; it stays buffered",
                            extra={"feed": counts.feed, "error": repr(exc)})
                if await backoff.wait(stop):
                    break
                continue
            backoff.reset()
            if rate > 0:
                next_due = start + attempted / rate  # when message number attempted+1 falls due
                wait = max(MIN_TICK, next_due - loop.time())
                if await wait_or_stop(stop, wait):
                    break
            else:
                await asyncio.sleep(0)  # let the other feed and the signal handler run
    finally:
        counts.seconds = time.monotonic() - wall
    return counts


def _account(counts: Counts, accepted: list[Payload]) -> None:
    counts.published += len(accepted)
    metrics.PUBLISHED.labels(counts.feed).inc(len(accepted))
    for payload in accepted:
        if payload.defect is not None:
            counts.malformed += 1
            counts.defects[payload.defect] = counts.defects.get(payload.defect, 0) + 1
            metrics.MALFORMED.labels(counts.feed, payload.defect).inc()
