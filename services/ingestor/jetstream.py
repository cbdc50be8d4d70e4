"""JetStream setup: the stream that captures both feeds and the ingestor's durable pull consumer.

Both are created or updated idempotently at start, and again whenever the consumer turns
out to be gone (someone deleted the stream or the consumer while we ran). The stream's
creation time is part of every message id, so ids stay unique when a deleted stream is
recreated and its sequence numbers start again at 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from services.ingestor.settings import IngestorSettings
from shared.feeds import FEED_NAMES

log = logging.getLogger(__name__)


class JetStreamUnavailable(RuntimeError):
    """The NATS server answers but has no JetStream: a setup error, not a transient one."""


@dataclass(frozen=True, slots=True)
class StreamHandle:
    stream: str
    consumer: str
    created_ms: int  # the stream's creation time, the first half of every message id

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


def stream_config(settings: IngestorSettings) -> StreamConfig:
    """The stream as the ingestor creates it when it does not exist yet."""
    return StreamConfig(
        name=settings.js_stream,
        subjects=[settings.subject(feed) for feed in FEED_NAMES],
        storage=StorageType.FILE,
        max_age=settings.js_max_age,
        num_replicas=settings.js_replicas,
    )


def updated_stream_config(current: StreamConfig, settings: IngestorSettings) -> StreamConfig | None:
    """The existing stream's config with what the ingestor owns (subjects, max_age) set
    from the settings, every other field (replicas, placement, limits, ...) carried over
    as the operator set it; None when nothing the ingestor owns differs.

    Sent whole because a stream update replaces the config: a field left out takes its
    default, and on NATS 2.9 a missing num_replicas turns an R3 stream into R1.
    """
    wanted = stream_config(settings)
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


async def setup(nc: NATS, settings: IngestorSettings) -> StreamHandle:
    """Create or update the stream and the consumer; return what the pull loop needs."""
    js = nc.jetstream(timeout=5.0)
    config = stream_config(settings)
    try:
        try:
            info = await js.stream_info(settings.js_stream)
        except NotFoundError:
            info = await js.add_stream(config)
            log.info(
                "created JetStream stream", extra={"stream": settings.js_stream, "subjects": config.subjects}
            )
        else:
            update = updated_stream_config(info.config, settings)
            if update is not None:
                info = await js.update_stream(update)
                log.info(
                    "updated JetStream stream",
                    extra={
                        "stream": settings.js_stream,
                        "subjects": update.subjects,
                        "max_age_s": update.max_age,
                        "replicas": info.config.num_replicas,
                    },
                )
        await js.add_consumer(settings.js_stream, consumer_config(settings))
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
    assert info.created is not None
    handle = StreamHandle(settings.js_stream, settings.js_consumer, _unix_ms(info.created))
    log.info(
        "JetStream ready",
        extra={"stream": handle.stream, "consumer": handle.consumer, "stream_created_ms": handle.created_ms},
    )
    return handle


def _unix_ms(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def consumer_exists(nc: NATS, handle: StreamHandle) -> bool:
    try:
        await nc.jetstream(timeout=5.0).consumer_info(handle.stream, handle.consumer)
    except NotFoundError:
        return False
    return True
