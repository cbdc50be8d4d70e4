"""The pull loops: JetStream -> Writer -> ack, one pipeline per feed, in batches.

nats-py's `fetch()` builds a future per request and a Msg with parsed metadata per
message, which caps it near 15k msg/s. This loop is leaner: one subscription on
`<inbox>.*` whose callback only appends deliveries to a buffer, pull requests
(`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with {"batch", "expires"}) published
by us with reply `<inbox>.<request number>`, and the stream sequence, timestamp and
delivery count read straight from each message's `$JS.ACK...` reply subject. One to two
batches are kept requested ahead, so JetStream delivers while Redis writes; a request
for a whole batch goes out when no more than one batch is left requested, never one per
message, so a trickle of messages (the upstream rate) sends no requests of its own.

Each feed has its own JetStream stream (its seq = the stream sequence), so each feed
runs its own pull loop and writer (with its own Redis connection) as a task of its own.

Status messages on the inbox: 408 (request expired) and 404 (no messages) end a
request and mean "idle", never an error; 409 ends it too, and `Consumer Deleted` means
the stream or consumer must be set up again. A request that ends with no status at all
(NATS restarted, or the consumer vanished) is noticed by its deadline, and the consumer
is checked. A loop sleeps on one event until a delivery or a status arrives, the stop
event is set, or the oldest request's deadline passes: idle, it wakes once per expired
request (two requests every PULL_EXPIRES), no more.

Batches are written in stream order, one at a time; while Redis runs batch k, batch
k+1 is decoded and packed. When the script reports a hole (Redis lost the seqs just
below the batch, or the whole stream), the missing seqs are read again from JetStream
and appended first (`refill.py`), then the rest of the batch. Acks (`+ACK` published
to each message's reply subject, written by the client's flusher with whatever else is
pending) go out only after Redis has answered for the whole batch. They are not
confirmed by a PING round trip per batch: an ack that never reaches the server means
redelivery, like a crash before it, and redelivery means no second entry (the script's
dedup keys and its seq <= top guard). The connection is flushed once, at exit.

SIGTERM: no new requests; what was requested is written and acked; then exit.
Redis or NATS away: retried with backoff, logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.ingestor import jetstream, metrics, refill
from services.ingestor.jetstream import StreamHandle, parse_ack_subject
from services.ingestor.settings import IngestorSettings
from services.ingestor.writer import Delivery, Outcome, Prepared, RunIdWatch, StaleEpoch, Writer
from shared import codec
from shared.feeds import FEED_NAMES
from shared.lifecycle import Backoff, wait_or_stop
from shared.settings import nats_servers

log = logging.getLogger(__name__)

# A pull request waits this long for messages before JetStream answers 408 (idle).
# Short, so that a stopping ingestor has nothing requested for long.
PULL_EXPIRES = 2.0
# A request with no answer this long after it expired was lost (NATS restarted).
PULL_GRACE = 2.0
# How long, after SIGTERM, to keep retrying a batch that Redis does not take; after
# that it is left unacked and JetStream redelivers it to the next ingestor.
STOP_GRACE = 10.0
# Pause between noticing the consumer was deleted and creating it again.
RESETUP_DELAY = 1.0
# How often the consumers' backlog is read for the metrics.
WATCH_INTERVAL = 5.0


class RefillError(RuntimeError):
    """JetStream no longer holds seqs that Redis lacks below a batch."""


@dataclass
class _Request:
    remaining: int
    deadline: float


@dataclass
class Stats:
    appended: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0  # malformed payloads appended at their seq
    redelivered: int = 0
    batches: int = 0
    abandoned: int = 0  # messages left unacked at shutdown (redelivered later)
    redis_outages: int = 0
    nats_reconnects: int = 0
    refilled: Counter[str] = field(default_factory=Counter)  # appended again from JetStream
    holes: int = 0  # holes found below a batch (Redis lost writes)
    rebuilds: int = 0  # of which the stream was missing or empty
    redis_restarts: int = 0  # run_id changes seen by the writers
    skipped: Counter[str] = field(default_factory=Counter)  # seqs held by nobody (aged out unwritten)

    def summary(self) -> dict[str, object]:
        return {
            "appended": sum(self.appended.values()),
            **{f"appended_{feed}": n for feed, n in sorted(self.appended.items())},
            "duplicates": sum(self.duplicates.values()),
            "dead_letters": self.dead_letters,
            "redelivered": self.redelivered,
            "batches": self.batches,
            "abandoned": self.abandoned,
            "redis_outages": self.redis_outages,
            "nats_reconnects": self.nats_reconnects,
            "refilled": sum(self.refilled.values()),
            "holes": self.holes,
            "rebuilds": self.rebuilds,
            "redis_restarts": self.redis_restarts,
            "skipped": sum(self.skipped.values()),
        }


class PullLoop:
    """Receives deliveries for one stream incarnation into a buffer; see the module doc."""

    def __init__(self, nc: NATS, handle: StreamHandle, batch: int) -> None:
        self.nc = nc
        self.handle = handle
        self.batch = batch
        self.buffer: list[Delivery] = []
        self.arrived = asyncio.Event()
        self.consumer_gone = False
        self.lost_requests = 0
        self._inbox = nc.new_inbox()
        self._requests: dict[str, _Request] = {}
        self._next_request = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self._inbox + ".*", cb=self._on_msg)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    @property
    def requested(self) -> int:
        return sum(r.remaining for r in self._requests.values())

    def forget_requests(self) -> None:
        """After a reconnect: the server may have forgotten them; ask afresh."""
        self._requests.clear()

    async def _on_msg(self, msg: Msg) -> None:
        reply = msg.reply
        if reply.startswith("$JS.ACK."):
            try:
                delivered, seq, ts = parse_ack_subject(reply)
            except ValueError:
                log.error("unexpected JetStream reply subject; message left unacked", extra={"reply": reply})
                return
            self.buffer.append(Delivery(msg.subject, msg.data, seq, delivered, ts, reply))
            # A delivery carries its own subject, not the request's: JetStream serves the
            # waiting requests in order, so it counts against the oldest one.
            for name, r in self._requests.items():
                r.remaining -= 1
                if r.remaining <= 0:
                    del self._requests[name]
                break
            self.arrived.set()
            return
        request = msg.subject.rpartition(".")[2]
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status in ("404", "408"):
            self._requests.pop(request, None)
        elif status == "409":
            self._requests.pop(request, None)
            description = str(headers.get("Description", ""))
            if "deleted" in description.lower():
                self.consumer_gone = True
            else:
                log.debug("pull request ended", extra={"status": status, "description": description})
        elif status == "100":
            return  # heartbeat (not requested, harmless)
        else:
            self._requests.pop(request, None)
            log.warning(
                "unexpected message on the pull inbox",
                extra={"status": status, "subject": msg.subject, "headers": dict(headers)},
            )
        self.arrived.set()

    def purge(self) -> None:
        """Drop requests that ended with no answer at all (NATS restarted, or no consumer)."""
        now = time.monotonic()
        for name, r in list(self._requests.items()):
            if now > r.deadline:
                del self._requests[name]
                self.lost_requests += 1

    async def top_up(self) -> None:
        """Keep one to two batches requested ahead of what is buffered: a batch is asked
        for once no more than one is left, so single deliveries send no request each."""
        now = time.monotonic()
        while len(self.buffer) + self.requested <= self.batch and len(self._requests) < 8:
            self._next_request += 1
            name = str(self._next_request)
            payload = json.dumps({"batch": self.batch, "expires": int(PULL_EXPIRES * 1e9)}).encode()
            self._requests[name] = _Request(self.batch, now + PULL_EXPIRES + PULL_GRACE)
            try:
                await self.nc.publish(self.handle.next_subject, payload, reply=f"{self._inbox}.{name}")
            except nats.errors.Error:  # disconnected meanwhile: asked again after the reconnect
                del self._requests[name]
                return

    @property
    def waiting(self) -> bool:
        return bool(self._requests)

    @property
    def next_deadline(self) -> float | None:
        """When the oldest request counts as lost if nothing ended it (monotonic)."""
        return min((r.deadline for r in self._requests.values()), default=None)

    def take(self) -> list[Delivery]:
        batch = self.buffer[: self.batch]
        del self.buffer[: self.batch]
        if not self.buffer:
            self.arrived.clear()
        return batch


class _Following:
    """Takes and prepares the next batch, once, when called (while Redis runs the current one)."""

    def __init__(self, loop: PullLoop, writer: Writer, epoch: str) -> None:
        self.loop = loop
        self.writer = writer
        self.epoch = epoch
        self.batch: list[Delivery] = []
        self.prepared: Prepared | None = None
        self._done = False

    def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        if self.loop.buffer:
            self.batch = self.loop.take()
            self.prepared = self.writer.prepare(self.batch, self.epoch)


class Ingestor:
    """Connects, sets up JetStream, and runs one pipeline per feed until the stop event."""

    def __init__(self, settings: IngestorSettings, redis: Redis, stop: asyncio.Event) -> None:
        self.settings = settings
        self.redis = redis
        self.stop = stop
        self.stats = Stats()
        self.watch = RunIdWatch()
        self.nc: NATS | None = None
        self.feeds: dict[str, FeedPipeline] = {}
        self.abandon = asyncio.Event()  # set STOP_GRACE after stop: give up on what is in flight
        self._nats_down = False
        self._closing = False

    @property
    def handles(self) -> dict[str, StreamHandle]:
        """Each feed's JetStream stream as last set up."""
        return {feed: p.handle for feed, p in self.feeds.items()}

    # -- NATS connection -------------------------------------------------------------

    async def connect(self) -> bool:
        """Connect to NATS, retrying with backoff; False if stopped first."""
        backoff = Backoff(cap=5.0)
        logged = False
        while not self.stop.is_set():
            try:
                self.nc = await nats.connect(
                    servers=nats_servers(self.settings.nats_url),
                    name="fanout-ingestor",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2.0,
                    allow_reconnect=True,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                if not logged:
                    log.warning(
                        "NATS unreachable; retrying with backoff",
                        extra={"url": self.settings.nats_url, "error": str(exc) or type(exc).__name__},
                    )
                    metrics.OUTAGES.labels(server="nats").inc()
                    logged = True
                await backoff.wait(self.stop)
                continue
            if logged:
                log.info("NATS reachable again", extra={"url": self.settings.nats_url})
            return True
        return False

    async def _on_disconnected(self) -> None:
        if not self._nats_down and not self._closing:
            self._nats_down = True
            metrics.OUTAGES.labels(server="nats").inc()
            log.warning(
                "NATS disconnected; reconnecting (messages wait in JetStream)",
                extra={"url": self.settings.nats_url},
            )

    async def _on_reconnected(self) -> None:
        self.stats.nats_reconnects += 1
        if self._nats_down:
            log.info("NATS reconnected", extra={"url": self.settings.nats_url})
        self._nats_down = False
        for pipeline in self.feeds.values():
            if pipeline.loop is not None:
                pipeline.loop.forget_requests()
        self._wake_loops()

    async def _on_error(self, exc: Exception) -> None:
        if not self._nats_down:
            log.debug("NATS client error", extra={"error": str(exc) or type(exc).__name__})

    async def nats_ready(self) -> bool:
        """/readyz: NATS connected and every feed's stream set up."""
        return (
            self.nc is not None
            and self.nc.is_connected
            and len(self.feeds) == len(FEED_NAMES)
            and all(p.loop is not None and not p.failed for p in self.feeds.values())
        )

    async def redis_ready(self) -> bool:
        """/readyz: Redis answers PING. A pooled connection that died with the last Redis
        outage fails once and is dropped from the pool, so a failure is tried once more
        on a fresh connection before /readyz turns red (it was red once after every
        outage while ingestion worked)."""
        try:
            return bool(await self.redis.ping())
        except (RedisConnectionError, RedisTimeoutError):
            return bool(await self.redis.ping())

    # -- JetStream setup -------------------------------------------------------------

    async def setup(self) -> bool:
        """Retire the legacy stream, create or update each feed's stream and consumer;
        False if stopped first. Raises JetStreamUnavailable and LegacyStreamBusy (not
        worth retrying)."""
        assert self.nc is not None
        backoff = Backoff(cap=5.0)
        logged = False
        while not self.stop.is_set():
            try:
                handles = await jetstream.setup(self.nc, self.settings)
                break
            except (jetstream.JetStreamUnavailable, jetstream.LegacyStreamBusy):
                raise
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                if not logged:
                    log.warning(
                        "JetStream setup failed; retrying with backoff",
                        extra={"error": str(exc) or type(exc).__name__},
                    )
                    logged = True
                await backoff.wait(self.stop)
        else:
            return False
        for feed, handle in handles.items():
            pipeline = self.feeds.get(feed)
            if pipeline is None:
                pipeline = self.feeds[feed] = FeedPipeline(self, handle)
            await pipeline.start(handle)
        return True

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Until stop: pull, write, ack, per feed. After stop: finish what was requested."""
        watcher = asyncio.create_task(self._abandon_after_stop())
        try:
            if not await self.connect() or not await self.setup():
                return
            lag = asyncio.create_task(self._watch_consumers())
            tasks = [
                asyncio.create_task(self._supervised(p), name=f"ingest-{feed}")
                for feed, p in self.feeds.items()
            ]
            try:
                await asyncio.gather(*tasks)
            finally:
                lag.cancel()
                for t in tasks:
                    t.cancel()
        finally:
            watcher.cancel()
            for pipeline in self.feeds.values():
                await pipeline.close()
            if self.nc is not None:
                try:
                    await self.nc.flush(timeout=2)
                except (OSError, TimeoutError, nats.errors.Error):
                    pass
                self._closing = True
                await self.nc.close()
            self.stats.redis_restarts = self.watch.restarts
            log.info("ingestor stopped", extra=self.stats.summary())

    async def _supervised(self, pipeline: FeedPipeline) -> None:
        """Run a feed's pipeline until stop; restart it (a fresh pull loop, with backoff)
        if it fails on something unexpected, with /readyz red meanwhile. What it held
        unacked is redelivered by JetStream, and the script makes that harmless."""
        backoff = Backoff(base=1.0, cap=10.0)  # the first restart after 0.5-1 s
        while True:
            try:
                if pipeline.failed:
                    await pipeline.start(pipeline.handle)
                    pipeline.failed = False
                await pipeline.run()
                return
            except Exception:  # supervision: a bug on one path must not end the feed for good
                pipeline.failed = True
                log.exception(
                    "the feed's pipeline failed; restarting it (what it held is redelivered)",
                    extra={"feed": pipeline.feed},
                )
                if await backoff.wait(self.stop):
                    return

    async def _watch_consumers(self) -> None:
        """Every few seconds: export each consumer's backlog, and warn (once per episode)
        when JetStream holds messages for it but delivers none while requests wait."""
        stalled: dict[str, int | None] = {}
        warned: set[str] = set()
        while not await wait_or_stop(self.stop, WATCH_INTERVAL):
            if self.nc is None or not self.nc.is_connected:
                continue
            for feed, pipeline in self.feeds.items():
                handle = pipeline.handle
                try:
                    info = await self.nc.jetstream(timeout=5.0).consumer_info(handle.stream, handle.consumer)
                except (OSError, TimeoutError, nats.errors.Error):
                    continue
                pending = int(info.num_pending or 0)
                metrics.CONSUMER_PENDING.labels(feed=feed).set(pending)
                metrics.CONSUMER_ACK_PENDING.labels(feed=feed).set(int(info.num_ack_pending or 0))
                delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
                stuck = pending > 0 and not info.num_ack_pending and (info.num_waiting or 0) > 0
                if stuck and stalled.get(feed) == delivered:
                    if feed not in warned:
                        warned.add(feed)
                        log.warning(
                            "JetStream holds messages for the consumer but delivers none while requests wait",
                            extra={
                                "feed": feed,
                                "pending": pending,
                                "delivered_stream_seq": delivered,
                                "consumer": handle.consumer,
                                "stream": handle.stream,
                            },
                        )
                else:
                    if feed in warned and not stuck:
                        log.info(
                            "JetStream delivers again",
                            extra={"feed": feed, "delivered_stream_seq": delivered},
                        )
                        warned.discard(feed)
                    stalled[feed] = delivered if stuck else None

    async def _abandon_after_stop(self) -> None:
        """Wake the pull loops when stop is set (no new requests), and again STOP_GRACE
        later with `abandon` set (give up on what is in flight)."""
        await self.stop.wait()
        self._wake_loops()
        await asyncio.sleep(STOP_GRACE)
        self.abandon.set()
        self._wake_loops()

    def _wake_loops(self) -> None:
        """Have every pull loop look at its state again (each waits on its `arrived`)."""
        for pipeline in self.feeds.values():
            if pipeline.loop is not None:
                pipeline.loop.arrived.set()


class FeedPipeline:
    """One feed: its pull loop, its writer, holes filled from JetStream, acks."""

    def __init__(self, owner: Ingestor, handle: StreamHandle) -> None:
        self.owner = owner
        self.feed = handle.feed
        self.handle = handle
        self.settings = owner.settings
        self.stats = owner.stats
        self.writer = Writer(owner.redis, owner.settings, self.feed, owner.watch)
        self.loop: PullLoop | None = None
        self._stale = False
        self.failed = False  # ended on an unexpected error; restarted by the supervisor

    @property
    def nc(self) -> NATS:
        assert self.owner.nc is not None
        return self.owner.nc

    async def start(self, handle: StreamHandle) -> None:
        """A fresh pull loop on `handle` (after a setup)."""
        if self.loop is not None:
            await self.loop.close()
        self.handle = handle
        self.loop = PullLoop(self.nc, handle, self.settings.batch)
        await self.loop.start()

    async def close(self) -> None:
        if self.loop is not None:
            await self.loop.close()
        await self.writer.close()

    async def _resetup(self) -> bool:
        """Set this feed's stream and consumer up again; False if stopped first."""
        backoff = Backoff(cap=5.0)
        while not self.owner.stop.is_set():
            try:
                handle = await jetstream.setup_feed(self.nc, self.settings, self.feed)
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                log.warning(
                    "JetStream setup failed; retrying with backoff",
                    extra={"feed": self.feed, "error": str(exc) or type(exc).__name__},
                )
                await backoff.wait(self.owner.stop)
                continue
            await self.start(handle)
            return True
        return False

    async def _check_consumer(self) -> bool:
        """After pull requests went unanswered: True if the consumer must be set up again."""
        if not self.nc.is_connected:
            return False
        try:
            return not await jetstream.consumer_exists(self.nc, self.handle)
        except (OSError, TimeoutError, nats.errors.Error):
            return False

    async def run(self) -> None:
        assert self.loop is not None
        stop = self.owner.stop
        while True:
            loop = self.loop
            loop.arrived.clear()  # whatever set it is looked at below, before waiting again
            loop.purge()
            stopping = stop.is_set()
            if (
                self._stale
                or loop.consumer_gone
                or (loop.lost_requests and not loop.waiting and await self._check_consumer())
            ):
                if not self._stale:
                    await self._drain_buffer()
                self._stale = False
                log.warning(
                    "JetStream consumer is gone or its stream was recreated; setting up again",
                    extra={"feed": self.feed, "stream": self.handle.stream, "consumer": self.handle.consumer},
                )
                # nats-server 2.9 can leave a consumer re-created within milliseconds of the
                # old one's deletion stuck (requests wait, nothing is delivered): let the
                # deletion settle first.
                if await wait_or_stop(stop, RESETUP_DELAY) or not await self._resetup():
                    return
                continue
            loop.lost_requests = 0
            if stopping:
                if not loop.buffer and not loop.waiting:
                    return
                if self.owner.abandon.is_set():
                    self.stats.abandoned += len(loop.buffer)
                    return
            elif self.nc.is_connected:
                await loop.top_up()
            if not loop.buffer:
                await self._wait_for_work(loop)
                continue
            if not await self._process(loop):
                return

    async def _wait_for_work(self, loop: PullLoop) -> None:
        """Until a delivery or a status arrives, stop or abandon is set (the owner sets
        `arrived` then), or the oldest request's deadline passes (it was lost: purged by
        the next round); with no request out (NATS away), at most one request's span."""
        deadline = loop.next_deadline
        if deadline is None:
            deadline = time.monotonic() + PULL_EXPIRES + PULL_GRACE
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await loop.arrived.wait()

    async def _drain_buffer(self) -> None:
        assert self.loop is not None
        if self.loop.buffer:
            await self._process(self.loop)

    async def _process(self, loop: PullLoop) -> bool:
        """Write and ack what is buffered, batch after batch, in stream order.

        While Redis runs batch k, batch k+1 is decoded and packed, so the CPU work and
        the Redis work overlap; batch k+1 goes out only once batch k is written and acked.
        False if stopped before Redis took a batch (it stays unacked, to be redelivered).
        """
        epoch = self.handle.epoch
        batch = loop.take()
        prepared = self.writer.prepare(batch, epoch)
        while True:
            started = time.perf_counter()
            following = _Following(loop, self.writer, epoch)
            try:
                result = await self._write(prepared, len(batch), following)
            except (StaleEpoch, jetstream.StreamGone) as exc:
                # The feed's JetStream stream was deleted or recreated: what this loop
                # holds belongs to the old one. Left unacked; set up again.
                log.warning(
                    "the feed's JetStream stream is not this ingestor's any more; setting up again",
                    extra={"feed": self.feed, "epoch": epoch, "reason": str(exc)},
                )
                following()
                loop.buffer.clear()
                self._stale = True
                return True
            if result is None:
                self.stats.abandoned += len(batch) + len(following.batch) + len(loop.buffer)
                return False
            await self._ack(batch, result, started)
            following()  # if Redis failed before it could run
            if not following.batch:
                return True
            assert following.prepared is not None
            batch, prepared = following.batch, following.prepared
            if not self.owner.stop.is_set() and self.nc.is_connected:
                await loop.top_up()

    async def _write(
        self, prepared: Prepared, size: int, meanwhile: Callable[[], None] | None = None
    ) -> Outcome | None:
        """Append a batch (filling any hole below it first), retrying with backoff while
        Redis or JetStream is away or refuses. None if stopped and the grace period ran
        out first. Raises StaleEpoch."""
        backoff = Backoff(cap=5.0)
        outage = False
        while True:
            try:
                result = await self._append(prepared, meanwhile)
                break
            except (StaleEpoch, jetstream.StreamGone):
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if not outage:
                    outage = True
                    self.stats.redis_outages += 1
                    metrics.OUTAGES.labels(server="redis").inc()
                    log.warning(
                        "Redis unreachable; retrying the batch with backoff (nothing acked)",
                        extra={"feed": self.feed, "error": str(exc) or type(exc).__name__, "batch": size},
                    )
            except RedisError as exc:
                if not outage:
                    outage = True
                    log.error(
                        "Redis refused the batch; retrying with backoff (nothing acked)",
                        extra={"feed": self.feed, "error": str(exc), "batch": size},
                    )
            except (nats.errors.Error, TimeoutError) as exc:  # reading a hole from JetStream
                if not outage:
                    outage = True
                    log.warning(
                        "cannot read what Redis lost from JetStream; retrying with backoff (nothing acked)",
                        extra={"feed": self.feed, "error": str(exc) or type(exc).__name__, "batch": size},
                    )
            except RefillError as exc:
                if not outage:
                    outage = True
                    log.error(str(exc), extra={"feed": self.feed, "batch": size})
            if await backoff.wait(self.owner.abandon):
                return None
        if outage:
            log.info("Redis answered again; batch written", extra={"feed": self.feed, "batch": size})
        return result

    async def _append(self, prepared: Prepared, meanwhile: Callable[[], None] | None) -> Outcome:
        """The batch's script call; on a hole, fill it from JetStream and send the rest again."""
        epoch = self.handle.epoch
        messages = prepared.messages
        outcome = await self.writer.send(prepared, meanwhile)
        total = Outcome()
        while True:
            total.add(outcome)
            if outcome.hole is None:
                return total
            messages = messages[outcome.hole :]
            wanted = messages[0].seq
            self.stats.holes += 1
            if outcome.top == 0:
                self.stats.rebuilds += 1
                start = await refill.rebuild_start(
                    self.nc, self.settings.database_url, self.settings.db_schema, self.handle
                )
                log.warning(
                    "the feed's Redis stream is missing or empty: rebuilding it from the first seq "
                    "not yet archived, read from JetStream",
                    extra={"feed": self.feed, "epoch": epoch, "start": start, "batch_first_seq": wanted},
                )
                first = start
            else:
                start = 0
                first = outcome.top + 1
                retained = await jetstream.first_seq(self.nc, self.handle)
                if retained > first:
                    start = first = await self._restart_at(outcome.top, retained)
                else:
                    # Another ingestor's batch below this one not written yet (several ingestors
                    # on one consumer), or entries Redis lost (a restart or failover, which the
                    # writer logs as a run_id change): info, not a warning.
                    log.info(
                        "a hole below the batch: filling it from JetStream",
                        extra={
                            "feed": self.feed,
                            "epoch": epoch,
                            "top": outcome.top,
                            "from_seq": first,
                            "to_seq": wanted - 1,
                        },
                    )
            if first < wanted:
                await self._fill(first, wanted - 1, start)
            outcome = await self.writer.append(messages, epoch, start)

    async def _restart_at(self, top: int, retained: int) -> int:
        """Seqs top+1..retained-1 are in neither Redis nor JetStream: start the Redis
        stream again at `retained` once everything it holds is archived (RefillError
        until then). Returns `retained`."""
        lowest = await self.writer.lowest()
        if lowest is not None:
            try:
                archived = await refill.archived_top(
                    self.settings.database_url, self.settings.db_schema, self.handle, lowest - 1
                )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise RefillError(
                    f"JetStream no longer holds seqs {top + 1}..{retained - 1} of the feed {self.feed} "
                    f"(aged out or discarded before they were ingested), and the catalogue cannot be read "
                    f"({exc or type(exc).__name__}) to check that Redis's seqs {lowest}..{top} are "
                    f"archived before the stream restarts at {retained}; retrying"
                ) from None
            if archived < top:
                raise RefillError(
                    f"JetStream no longer holds seqs {top + 1}..{retained - 1} of the feed {self.feed} "
                    f"(aged out or discarded before they were ingested): waiting for the archiver to "
                    f"store Redis's seqs {archived + 1}..{top} before the stream restarts at {retained}"
                )
        dropped = await self.writer.restart(top)
        self.stats.skipped[self.feed] += retained - top - 1
        log.error(
            "seqs of the feed are in neither Redis, PostgreSQL nor JetStream (they aged out of "
            "JetStream before any ingestor wrote them): the Redis stream restarts at JetStream's "
            "first retained seq; readers see a gap there",
            extra={
                "feed": self.feed,
                "epoch": self.handle.epoch,
                "lost_from_seq": top + 1,
                "lost_to_seq": retained - 1,
                "restart_seq": retained,
                "dropped": dropped,
            },
        )
        return retained

    async def _fill(self, first: int, last: int, start: int) -> None:
        """Append seqs first..last read from JetStream (stops at a new hole: Redis lost
        more meanwhile, and the caller looks again). Raises RefillError when JetStream
        no longer holds `first`."""
        epoch = self.handle.epoch
        read = appended = 0
        async for chunk in refill.read_range(self.nc, self.handle, first, last, self.settings.batch):
            if not read and chunk[0].stream_seq != first:
                break
            read += len(chunk)
            messages = self.writer.messages(chunk, epoch, codec.iso_ms_from_ns(time.time_ns()))
            outcome = await self.writer.append(messages, epoch, start)
            appended += outcome.appended
            if outcome.hole is not None:
                break
        if appended:
            self.stats.refilled[self.feed] += appended
            metrics.REFILLED.labels(feed=self.feed).inc(appended)
        log.info(
            "filled from JetStream",
            extra={"feed": self.feed, "from_seq": first, "to_seq": last, "read": read, "appended": appended},
        )
        if not read:
            raise RefillError(
                f"JetStream no longer holds seqs {first}..{last} of the feed {self.feed}, which Redis "
                "lacks below the batch in hand: the feed cannot be appended contiguously; check "
                f"`nats stream info {self.handle.stream}` (purged? max_age?)"
            )

    async def _ack(self, batch: list[Delivery], result: Outcome, started: float) -> None:
        """Ack a batch Redis has answered for (the client's flusher writes the acks)."""
        try:
            for d in batch:
                await self.nc.publish(d.reply, b"+ACK")
        except nats.errors.Error as exc:  # closed, or the reconnect buffer is full
            # Written but not acked: JetStream redelivers and the dedup keys drop them.
            log.warning(
                "could not ack a written batch; it will be redelivered and deduplicated",
                extra={"feed": self.feed, "error": str(exc) or type(exc).__name__, "batch": len(batch)},
            )
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        redelivered = sum(1 for d in batch if d.delivered > 1)
        if redelivered:
            metrics.REDELIVERED.inc(redelivered)
        self.stats.redelivered += redelivered
        self.stats.appended[self.feed] += result.appended - result.malformed
        self.stats.duplicates[self.feed] += result.duplicates
        self.stats.dead_letters += result.malformed
        self.stats.batches += 1
