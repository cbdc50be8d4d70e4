"""JetStream setup: one stream per feed and the ingestor's durable pull consumer on each.

A feed's stream (`FEEDS_execution`, `FEEDS_sport_event`: `js_stream_name`) captures only
that feed's subject, so its stream sequence IS the feed's `seq`, and its creation time in
ms IS the feed's epoch (contract v2, section 1). Both are created or updated
idempotently at start, and again whenever the consumer turns out to be gone (someone
deleted the stream or the consumer while we ran): a recreated stream has a new creation
time, so its ids never collide with the old one's.

The combined stream of the first layout (`FANOUT_JS_STREAM` capturing both subjects)
would overlap the new streams' subjects: it is retired at start (its subjects become
`<name>.retired`, its messages stay) when the ingestor's consumer on it has nothing
left to deliver or ack; otherwise the ingestor refuses to start and says how to drain it.

Reading a range of a stream again (to fill what Redis lost) goes through `reader`: a
short-lived, unacked consumer, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from services.ingestor.settings import IngestorSettings
from shared.feeds import FEED_NAMES, epoch_of, js_stream_name

log = logging.getLogger(__name__)


class JetStreamUnavailable(RuntimeError):
    """The NATS server answers but has no JetStream: a setup error, not a transient one."""


class StreamGone(RuntimeError):
    """A feed's stream was deleted or recreated since it was set up: set it up again."""


class LegacyStreamBusy(RuntimeError):
    """The combined stream of the first layout still holds messages for the ingestor."""


@dataclass(frozen=True, slots=True)
class StreamHandle:
    feed: str
    stream: str
    consumer: str
    created_ms: int  # the stream's creation time: the feed's epoch

    @property
    def epoch(self) -> str:
        return str(self.created_ms)

    def message_id(self, stream_seq: int) -> str:
        return f"{self.created_ms}.{stream_seq}"

    @property
    def next_subject(self) -> str:
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"


def parse_ack_subject(reply: str) -> tuple[int, int, int]:
    """(delivery count, stream sequence, timestamp ns) from a `$JS.ACK...` subject.

    v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    """
    t = reply.split(".")
    if len(t) == 9:
        return int(t[4]), int(t[5]), int(t[7])
    if len(t) >= 11:
        return int(t[6]), int(t[7]), int(t[9])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def stream_config(settings: IngestorSettings, feed: str) -> StreamConfig:
    """A feed's stream as the ingestor creates it when it does not exist yet."""
    return StreamConfig(
        name=js_stream_name(settings.js_stream, feed),
        subjects=[settings.subject(feed)],
        storage=StorageType.FILE,
        max_age=settings.js_max_age,
        num_replicas=settings.js_replicas,
    )


def updated_stream_config(current: StreamConfig, wanted: StreamConfig) -> StreamConfig | None:
    """The existing stream's config with what the ingestor owns (subjects, max_age) set
    from `wanted`, every other field (replicas, placement, limits, ...) carried over as
    the operator set it; None when nothing the ingestor owns differs.

    Sent whole because a stream update replaces the config: a field left out takes its
    default, and on NATS 2.9 a missing num_replicas turns an R3 stream into R1.
    """
    if sorted(current.subjects or []) == sorted(wanted.subjects or []) and current.max_age == wanted.max_age:
        return None
    return current.evolve(subjects=wanted.subjects, max_age=wanted.max_age)


def consumer_config(settings: IngestorSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.js_consumer,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.js_ack_wait,
        max_deliver=-1,
        # Bounded: a stuck ingestor holds at most this many messages unacknowledged.
        max_ack_pending=max(20_000, 4 * settings.batch),
        max_waiting=64,
    )


async def setup(nc: NATS, settings: IngestorSettings) -> dict[str, StreamHandle]:
    """Retire the legacy combined stream, then create or update each feed's stream and
    consumer; the handles by feed. Raises JetStreamUnavailable, LegacyStreamBusy."""
    async with _translated(settings):
        await retire_legacy_stream(nc, settings)
    return {feed: await setup_feed(nc, settings, feed) for feed in FEED_NAMES}


async def setup_feed(nc: NATS, settings: IngestorSettings, feed: str) -> StreamHandle:
    """Create or update one feed's stream and the consumer on it."""
    js = nc.jetstream(timeout=5.0)
    config = stream_config(settings, feed)
    assert config.name is not None
    async with _translated(settings):
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            info = await js.add_stream(config)
            log.info("created JetStream stream", extra={"stream": config.name, "subjects": config.subjects})
        else:
            update = updated_stream_config(info.config, config)
            if update is not None:
                info = await js.update_stream(update)
                log.info(
                    "updated JetStream stream",
                    extra={
                        "stream": config.name,
                        "subjects": update.subjects,
                        "max_age_s": update.max_age,
                        "replicas": info.config.num_replicas,
                    },
                )
        await js.add_consumer(config.name, consumer_config(settings))
    assert info.created is not None
    handle = StreamHandle(feed, config.name, settings.js_consumer, int(epoch_of(info.created)))
    log.info(
        "JetStream ready",
        extra={
            "feed": feed,
            "stream": handle.stream,
            "consumer": handle.consumer,
            "epoch": handle.epoch,
        },
    )
    return handle


async def retire_legacy_stream(nc: NATS, settings: IngestorSettings) -> bool:
    """Move the first layout's combined stream off the feed subjects (True if it did).

    Only when the ingestor's consumer on it has delivered and had acked everything: what
    it still holds for us would otherwise be lost. Raises LegacyStreamBusy if not."""
    js = nc.jetstream(timeout=5.0)
    name = settings.js_stream
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return False
    feed_subjects = {settings.subject(feed) for feed in FEED_NAMES}
    if not feed_subjects & set(info.config.subjects or []):
        return False  # already retired, or not ours
    messages = int(info.state.messages or 0)
    try:
        consumer = await js.consumer_info(name, settings.js_consumer)
    except NotFoundError:
        left = messages
        why = f"it holds {messages} message(s) and has no consumer {settings.js_consumer!r}"
    else:
        left = int(consumer.num_pending or 0) + int(consumer.num_ack_pending or 0)
        why = (
            f"its consumer {settings.js_consumer!r} has {consumer.num_pending or 0} message(s) "
            f"not yet delivered and {consumer.num_ack_pending or 0} not yet acked"
        )
    if left:
        raise LegacyStreamBusy(
            f"the JetStream stream {name!r} of the previous layout still captures the feeds and {why}: "
            "run the previous ingestor version until `nats consumer info "
            f"{name} {settings.js_consumer}` shows nothing pending or unacked (or, if those messages "
            f"may be dropped, `nats stream rm {name}`), then start this one; it then moves {name!r} "
            f"to the subject {name}.retired (its messages are kept) and captures each feed in "
            f"{js_stream_name(name, '<feed>')}"
        )
    await js.update_stream(info.config.evolve(subjects=[f"{name}.retired"]))
    log.warning(
        "retired the JetStream stream of the previous layout (its messages are kept); "
        "each feed now has its own stream",
        extra={"stream": name, "subjects": [f"{name}.retired"], "messages": messages},
    )
    return True


@contextlib.asynccontextmanager
async def _translated(settings: IngestorSettings) -> AsyncIterator[None]:
    """JetStream's "not there" answers as JetStreamUnavailable, a timeout as TimeoutError."""
    try:
        yield
    except (NoRespondersError, ServiceUnavailableError) as exc:
        raise JetStreamUnavailable(
            f"the NATS server at {settings.nats_url} has no JetStream: start it with `nats-server -js` "
            "(or enable jetstream {} in its config)"
        ) from exc
    except BadRequestError as exc:
        if "not enabled" in str(exc).lower():
            raise JetStreamUnavailable(
                f"the NATS server at {settings.nats_url} has JetStream disabled: "
                "start it with `nats-server -js`"
            ) from exc
        raise
    except NatsTimeoutError as exc:
        raise TimeoutError("JetStream did not answer the stream/consumer setup in time") from exc


async def consumer_exists(nc: NATS, handle: StreamHandle) -> bool:
    try:
        await nc.jetstream(timeout=5.0).consumer_info(handle.stream, handle.consumer)
    except NotFoundError:
        return False
    return True


async def first_seq(nc: NATS, handle: StreamHandle) -> int:
    """The first sequence the feed's stream still retains (last + 1 when it retains
    nothing). Raises StreamGone if the stream is not the one `handle` names any more."""
    try:
        info = await nc.jetstream(timeout=5.0).stream_info(handle.stream)
    except NotFoundError:
        raise StreamGone(f"the JetStream stream {handle.stream} was deleted") from None
    if info.created is None or epoch_of(info.created) != handle.epoch:
        raise StreamGone(f"the JetStream stream {handle.stream} was recreated")
    return int(info.state.first_seq or 0) or int(info.state.last_seq or 0) + 1


@contextlib.asynccontextmanager
async def reader(js: JetStreamContext, stream: str, purpose: str, start_seq: int) -> AsyncIterator[Any]:
    """A short-lived, unacked pull consumer on `stream` from `start_seq`, bound for
    reading (`fetch`); deleted on the way out."""
    name = f"{purpose}-{secrets.token_hex(4)}"
    await js.add_consumer(
        stream,
        ConsumerConfig(
            name=name,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
        ),
    )
    try:
        sub = await js.pull_subscribe_bind(name, stream=stream)
        try:
            yield sub
        finally:
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, name)
