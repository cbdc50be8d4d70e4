"""The pull loop: JetStream -> Writer -> ack, in batches.

nats-py's `fetch()` builds a future per request and a Msg with parsed metadata per
message, which caps it near 15k msg/s. This loop is leaner: one subscription on
`<inbox>.*` whose callback only appends deliveries to a buffer, pull requests
(`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with {"batch", "expires"}) published
by us with reply `<inbox>.<request number>`, and the stream sequence, timestamp and
delivery count read straight from each message's `$JS.ACK...` reply subject. About two
batches are kept requested ahead, so JetStream delivers while Redis writes.

Status messages on the inbox: 408 (request expired) and 404 (no messages) end a
request and mean "idle", never an error; 409 ends it too, and `Consumer Deleted` means
the stream or consumer must be set up again. A request that ends with no status at all
(NATS restarted, or the consumer vanished) is noticed by its deadline, and the consumer
is checked.

Batches are written in stream order, one at a time; while Redis runs batch k, batch
k+1 is decoded and packed. Acks (`+ACK` published to each message's reply subject,
then one flush, which overlaps the next write) go out only after Redis has answered
for the whole batch. A crash before that means redelivery, and redelivery means no
second entry (the Lua script's dedup keys).

Redis that may have lost writes (at start, after an outage, after a reconnect) is
compared with JetStream before anything else is written, and the gap is replayed
(`replay.py`); skipped when Redis has not restarted since the last completed check.
SIGTERM: no new requests; what was requested is written and acked; then exit.
Redis or NATS away: retried with backoff, logged once per outage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.ingestor import jetstream, metrics, replay
from services.ingestor.jetstream import StreamHandle, parse_ack_subject
from services.ingestor.settings import IngestorSettings
from services.ingestor.writer import BatchResult, Delivery, Prepared, RedisReconnected, Writer
from shared.keys import Keys
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
# How often the consumer's backlog is read for the metrics.
WATCH_INTERVAL = 5.0


@dataclass
class _Request:
    remaining: int
    deadline: float


@dataclass
class Stats:
    appended: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    redelivered: int = 0
    batches: int = 0
    abandoned: int = 0  # messages left unacked at shutdown (redelivered later)
    redis_outages: int = 0
    nats_reconnects: int = 0
    replayed: int = 0  # messages Redis had lost, appended again from JetStream
    redis_checks: int = 0  # checks of Redis against JetStream
    replays: int = 0  # of which replayed (Redis new, emptied or restarted since the last)

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
            "replayed": self.replayed,
            "redis_checks": self.redis_checks,
            "replays": self.replays,
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
        """Keep about two batches requested ahead of what is buffered."""
        now = time.monotonic()
        while len(self.buffer) + self.requested < 2 * self.batch and len(self._requests) < 8:
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

    def take(self) -> list[Delivery]:
        batch = self.buffer[: self.batch]
        del self.buffer[: self.batch]
        if not self.buffer:
            self.arrived.clear()
        return batch


class _Following:
    """Takes and prepares the next batch, once, when called (while Redis runs the current one)."""

    def __init__(self, loop: PullLoop, writer: Writer, created_ms: int) -> None:
        self.loop = loop
        self.writer = writer
        self.created_ms = created_ms
        self.batch: list[Delivery] = []
        self.prepared: Prepared | None = None
        self._done = False

    def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        if self.loop.buffer:
            self.batch = self.loop.take()
            self.prepared = self.writer.prepare(self.batch, self.created_ms)


class Ingestor:
    """Connects, sets up JetStream, and runs the pull loop until the stop event."""

    def __init__(self, settings: IngestorSettings, redis: Redis, stop: asyncio.Event) -> None:
        self.settings = settings
        self.redis = redis
        self.stop = stop
        self.writer = Writer(redis, settings)
        self.stats = Stats()
        self.nc: NATS | None = None
        self.handle: StreamHandle | None = None
        self._loop: PullLoop | None = None
        self._abandon = asyncio.Event()
        self._nats_down = False
        self._closing = False
        self._flushing: asyncio.Task[None] | None = None
        self._keys = Keys(settings.key_prefix)
        # Redis may have lost writes (it was away, or this is a fresh start): compare it
        # with JetStream, and replay the gap, before writing anything else.
        self._redis_suspect = True

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
        if self._loop is not None:
            self._loop.forget_requests()
            self._loop.arrived.set()

    async def _on_error(self, exc: Exception) -> None:
        if not self._nats_down:
            log.debug("NATS client error", extra={"error": str(exc) or type(exc).__name__})

    async def nats_ready(self) -> bool:
        """/readyz: NATS connected and JetStream set up."""
        return self.nc is not None and self.nc.is_connected and self.handle is not None

    async def redis_ready(self) -> bool:
        """/readyz: Redis answers PING."""
        return bool(await self.redis.ping())

    # -- JetStream setup -------------------------------------------------------------

    async def setup(self) -> bool:
        """(Re)create the stream and consumer and a fresh pull loop; False if stopped first.

        Raises JetStreamUnavailable when the server has no JetStream (not worth retrying).
        """
        assert self.nc is not None
        backoff = Backoff(cap=5.0)
        logged = False
        while not self.stop.is_set():
            try:
                handle = await jetstream.setup(self.nc, self.settings)
                break
            except jetstream.JetStreamUnavailable:
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
        if self._loop is not None:
            await self._loop.close()
        self.handle = handle
        self._loop = PullLoop(self.nc, handle, self.settings.batch)
        await self._loop.start()
        return True

    async def _check_consumer(self) -> bool:
        """After pull requests went unanswered: True if the consumer must be set up again."""
        assert self.nc is not None and self.handle is not None
        if not self.nc.is_connected:
            return False
        try:
            return not await jetstream.consumer_exists(self.nc, self.handle)
        except (OSError, TimeoutError, nats.errors.Error):
            return False

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Until stop: pull, write, ack. After stop: finish what was requested, then return."""
        watcher = asyncio.create_task(self._abandon_after_stop())
        try:
            if not await self.connect() or not await self.setup():
                return
            try:
                await self._replay_if_behind()
            except (RedisError, OSError, nats.errors.Error, TimeoutError) as exc:
                log.warning(
                    "could not compare Redis with JetStream at start; will before the first write",
                    extra={"error": str(exc) or type(exc).__name__},
                )
            lag = asyncio.create_task(self._watch_consumer())
            try:
                await self._loop_until_stopped()
            finally:
                lag.cancel()
        finally:
            watcher.cancel()
            if self._loop is not None:
                await self._loop.close()
            await self._wait_flushed()
            if self.nc is not None:
                try:
                    await self.nc.flush(timeout=2)
                except (OSError, TimeoutError, nats.errors.Error):
                    pass
                self._closing = True
                await self.nc.close()
            log.info("ingestor stopped", extra=self.stats.summary())

    async def _watch_consumer(self) -> None:
        """Every few seconds: export the consumer's backlog, and warn (once per episode)
        when JetStream holds messages for it but delivers none while requests wait."""
        stalled_since: int | None = None
        warned = False
        while not await wait_or_stop(self.stop, WATCH_INTERVAL):
            if self.nc is None or self.handle is None or not self.nc.is_connected:
                continue
            try:
                info = await self.nc.jetstream(timeout=5.0).consumer_info(
                    self.handle.stream, self.handle.consumer
                )
            except (OSError, TimeoutError, nats.errors.Error):
                continue
            pending = int(info.num_pending or 0)
            metrics.CONSUMER_PENDING.set(pending)
            metrics.CONSUMER_ACK_PENDING.set(int(info.num_ack_pending or 0))
            delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
            stuck = pending > 0 and not info.num_ack_pending and (info.num_waiting or 0) > 0
            if stuck and stalled_since == delivered:
                if not warned:
                    warned = True
                    log.warning(
                        "JetStream holds messages for the consumer but delivers none while requests wait",
                        extra={
                            "pending": pending,
                            "delivered_stream_seq": delivered,
                            "consumer": self.handle.consumer,
                            "stream": self.handle.stream,
                        },
                    )
            else:
                if warned and not stuck:
                    log.info("JetStream delivers again", extra={"delivered_stream_seq": delivered})
                    warned = False
                stalled_since = delivered if stuck else None

    async def _abandon_after_stop(self) -> None:
        await self.stop.wait()
        await asyncio.sleep(STOP_GRACE)
        self._abandon.set()

    async def _loop_until_stopped(self) -> None:
        assert self._loop is not None
        while True:
            loop = self._loop
            loop.purge()
            stopping = self.stop.is_set()
            if loop.consumer_gone or (
                loop.lost_requests and not loop.waiting and await self._check_consumer()
            ):
                await self._drain_buffer()
                log.warning(
                    "JetStream consumer is gone (stream or consumer deleted); setting up again",
                    extra={"stream": self.settings.js_stream, "consumer": self.settings.js_consumer},
                )
                # nats-server 2.9 can leave a consumer re-created within milliseconds of the
                # old one's deletion stuck (requests wait, nothing is delivered): let the
                # deletion settle first.
                if await wait_or_stop(self.stop, RESETUP_DELAY) or not await self.setup():
                    return
                continue
            loop.lost_requests = 0
            if stopping:
                if not loop.buffer and not loop.waiting:
                    return
                if self._abandon.is_set():
                    self.stats.abandoned += len(loop.buffer)
                    return
            elif self.nc is not None and self.nc.is_connected:
                await loop.top_up()
            if not loop.buffer:
                await self._wait_for_work(loop)
                continue
            if not await self._process(loop):
                return

    async def _wait_for_work(self, loop: PullLoop) -> None:
        waiters = [asyncio.ensure_future(loop.arrived.wait())]
        if not self.stop.is_set():
            waiters.append(asyncio.ensure_future(self.stop.wait()))
        else:
            waiters.append(asyncio.ensure_future(self._abandon.wait()))
        try:
            await asyncio.wait(waiters, timeout=PULL_EXPIRES / 2, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _drain_buffer(self) -> None:
        assert self._loop is not None
        if self._loop.buffer:
            await self._process(self._loop)

    async def _process(self, loop: PullLoop) -> bool:
        """Write and ack what is buffered, batch after batch, in stream order.

        While Redis runs batch k, batch k+1 is decoded and packed, so the CPU work and
        the Redis work overlap; batch k+1 goes out only once batch k is written and acked.
        False if stopped before Redis took a batch (it stays unacked, to be redelivered).
        """
        assert self.handle is not None and self.nc is not None
        created_ms = self.handle.created_ms
        batch = loop.take()
        prepared = self.writer.prepare(batch, created_ms)
        while True:
            started = time.perf_counter()
            following = _Following(loop, self.writer, created_ms)
            result = await self._write(prepared, len(batch), following)
            if result is None:
                self.stats.abandoned += len(batch) + len(following.batch) + len(loop.buffer)
                return False
            await self._ack(batch, result, started)
            following()  # if Redis failed before it could run
            if not following.batch:
                return True
            assert following.prepared is not None
            batch, prepared = following.batch, following.prepared
            if not self.stop.is_set() and self.nc.is_connected:
                await loop.top_up()

    async def _write(
        self, prepared: Prepared, size: int, meanwhile: Callable[[], None] | None = None
    ) -> BatchResult | None:
        """Send a batch to Redis, retrying with backoff while Redis is away or refuses it.

        None if the ingestor was stopped and the grace period ran out first."""
        backoff = Backoff(cap=5.0)
        outage = False
        reconnects = 0
        while True:
            try:
                if self._redis_suspect:
                    await self._replay_if_behind()
                result = await self.writer.send(prepared, meanwhile)
                break
            except RedisReconnected:
                self._redis_suspect = True
                reconnects += 1
                if reconnects == 1:
                    log.info("Redis connection re-established; checking Redis against JetStream")
                    continue  # check and write at once; a connection that keeps flapping backs off
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self._redis_suspect = True
                if not outage:
                    outage = True
                    self.stats.redis_outages += 1
                    metrics.OUTAGES.labels(server="redis").inc()
                    log.warning(
                        "Redis unreachable; retrying the batch with backoff (nothing acked)",
                        extra={"error": str(exc) or type(exc).__name__, "batch": size},
                    )
            except RedisError as exc:
                if not outage:
                    outage = True
                    log.error(
                        "Redis refused the batch; retrying with backoff (nothing acked)",
                        extra={"error": str(exc), "batch": size},
                    )
            except (nats.errors.Error, TimeoutError) as exc:  # from the replay's JetStream reads
                if not outage:
                    outage = True
                    log.warning(
                        "could not compare Redis with JetStream; retrying with backoff (nothing acked)",
                        extra={"error": str(exc) or type(exc).__name__, "batch": size},
                    )
            if await backoff.wait(self._abandon):
                return None
        if outage:
            log.info("Redis answered again; batch written", extra={"batch": size})
        return result

    async def _replay_if_behind(self) -> None:
        assert self.nc is not None and self.handle is not None
        self.writer.forget_reconnects()
        result = await replay.check_redis(
            self.nc,
            self.redis,
            self.writer,
            self.handle,
            self._keys,
            self.settings.batch,
            margin=self.settings.replay_margin,
        )
        self.stats.redis_checks += 1
        self.stats.replays += len(result.replays)
        metrics.REDIS_CHECKS.labels(result="skipped" if result.skipped else "replayed").inc()
        self.stats.replayed += result.appended
        if result.appended:
            metrics.REPLAYED.inc(result.appended)
        self._redis_suspect = False

    async def _ack(self, batch: list[Delivery], result: BatchResult, started: float) -> None:
        """Ack a batch Redis has answered for; the flush overlaps the next batch's write."""
        assert self.nc is not None
        try:
            for d in batch:
                await self.nc.publish(d.reply, b"+ACK")
        except nats.errors.Error as exc:  # closed, or the reconnect buffer is full
            # Written but not acked: JetStream redelivers and the dedup keys drop them.
            log.warning(
                "could not ack a written batch; it will be redelivered and deduplicated",
                extra={"error": str(exc) or type(exc).__name__, "batch": len(batch)},
            )
        await self._wait_flushed()
        self._flushing = asyncio.create_task(self._flush(len(batch)))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        redelivered = sum(1 for d in batch if d.delivered > 1)
        if redelivered:
            metrics.REDELIVERED.inc(redelivered)
        self.stats.redelivered += redelivered
        self.stats.appended.update(result.appended)
        self.stats.duplicates.update(result.duplicates)
        self.stats.dead_letters += result.dead_letters
        self.stats.batches += 1

    async def _flush(self, size: int) -> None:
        assert self.nc is not None
        try:
            await self.nc.flush(timeout=5)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            # Written but maybe not acked: JetStream redelivers and the dedup keys drop them.
            log.warning(
                "acks not confirmed by NATS; the batch will be redelivered and deduplicated",
                extra={"error": str(exc) or type(exc).__name__, "batch": size},
            )

    async def _wait_flushed(self) -> None:
        if self._flushing is not None:
            flushing, self._flushing = self._flushing, None
            await flushing
