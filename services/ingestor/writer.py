"""One batch of JetStream deliveries -> Redis, through the `ingest_append` Lua script.

Per batch: the deliveries are grouped by feed, decoded, and each feed's group is
appended by ONE script call (dedup key, XADD, seq and meta in one atomic step per
message); what cannot be decoded goes to the dead-letter stream through the same
script. The calls for all groups go out in one pipeline, so a batch costs one round
trip. Nothing here acks: the caller acks once `write` has returned.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from services.ingestor import metrics
from services.ingestor.settings import IngestorSettings
from shared import codec, scripts
from shared.feeds import DEAD_LETTER, FEEDS, Feed
from shared.keys import Keys

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delivery:
    """One message as JetStream delivered it, parsed from its `$JS.ACK...` reply subject."""

    subject: str
    payload: bytes
    stream_seq: int
    delivered: int  # delivery count: 1 the first time
    timestamp_ns: int  # when the broker stored it
    reply: str  # where the ack goes


@dataclass(slots=True)
class BatchResult:
    appended: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0


@dataclass(slots=True)
class _Group:
    """The script call for one feed (or the dead letters): keys and args built up together."""

    name: str
    keys: list[str]
    args: list[Any]
    labels: list[tuple[str, str, Delivery, str]]  # dead letters only: feed, reason, delivery, error

    @property
    def count(self) -> int:
        return len(self.keys) - 2


class Writer:
    def __init__(self, redis: Redis, settings: IngestorSettings) -> None:
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.ttl = max(1, int(settings.dedup_ttl))
        self.max_payload = settings.max_payload
        self.script = scripts.register(redis, "ingest_append")
        self._feed_of_subject: dict[str, Feed] = {settings.subject(name): f for name, f in FEEDS.items()}

    def _group(self, groups: dict[str, _Group], name: str) -> _Group:
        group = groups.get(name)
        if group is None:
            group = groups[name] = _Group(
                name, [self.keys.stream(name), self.keys.meta(name)], [self.ttl, secrets.token_hex(4)], []
            )
        return group

    def build(self, batch: Sequence[Delivery], created_ms: int, ingest_time: str) -> list[_Group]:
        """The script calls for a batch: one per feed present, plus one for its dead letters."""
        groups: dict[str, _Group] = {}
        for d in batch:
            message_id = f"{created_ms}.{d.stream_seq}"
            broker_time = codec.iso_ms_from_ns(d.timestamp_ns)
            feed = self._feed_of_subject.get(d.subject)
            if feed is None:
                self._dead_letter(
                    groups,
                    d,
                    message_id,
                    broker_time,
                    ingest_time,
                    "unknown",
                    "unknown_subject",
                    f"no feed is published on subject {d.subject!r}",
                )
                continue
            if len(d.payload) > self.max_payload:
                self._dead_letter(
                    groups,
                    d,
                    message_id,
                    broker_time,
                    ingest_time,
                    feed.name,
                    "too_large",
                    f"payload of {len(d.payload)} bytes exceeds FANOUT_MAX_PAYLOAD "
                    f"({self.max_payload} bytes)",
                )
                continue
            try:
                decoded = codec.decode(feed, d.payload)
            except codec.BadPayload as exc:
                self._dead_letter(
                    groups, d, message_id, broker_time, ingest_time, feed.name, "bad_payload", str(exc)
                )
                continue
            fields = codec.entry_fields(message_id, decoded, broker_time, ingest_time)
            group = self._group(groups, feed.name)
            group.keys.append(self.keys.dedup(feed.name, message_id))
            group.args += (d.stream_seq, len(fields), *fields)
        return list(groups.values())

    def _dead_letter(
        self,
        groups: dict[str, _Group],
        d: Delivery,
        message_id: str,
        broker_time: str,
        ingest_time: str,
        feed: str,
        reason: str,
        error: str,
    ) -> None:
        fields = [
            "message_id",
            message_id,
            "subject",
            d.subject,
            "broker_seq",
            str(d.stream_seq),
            "error",
            error,
            "payload_b64",
            base64.b64encode(d.payload).decode("ascii"),
            "broker_time",
            broker_time,
            "ingest_time",
            ingest_time,
        ]
        group = self._group(groups, DEAD_LETTER)
        group.keys.append(self.keys.dedup(DEAD_LETTER, message_id))
        group.args += (d.stream_seq, len(fields), *fields)
        group.labels.append((feed, reason, d, error))

    async def write(self, batch: Sequence[Delivery], created_ms: int) -> BatchResult:
        """Append a batch to Redis; returns once Redis has answered for every message."""
        ingest_time = codec.iso_ms(datetime.now(UTC))
        groups = self.build(batch, created_ms, ingest_time)
        if not groups:
            return BatchResult()
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in groups:
                await self.script(keys=group.keys, args=group.args, client=pipe)
            replies = await pipe.execute()
        return self._account(groups, replies)

    def _account(self, groups: list[_Group], replies: list[Any]) -> BatchResult:
        result = BatchResult()
        for group, reply in zip(groups, replies, strict=True):
            appended = sum(1 for _, new in reply if int(new) == 1)
            if group.name == DEAD_LETTER:
                for (feed, reason, d, error), (_, new) in zip(group.labels, reply, strict=True):
                    if int(new) == 1:  # a redelivered dead letter is neither counted nor logged again
                        metrics.DEAD_LETTERS.labels(feed=feed, reason=reason).inc()
                        log.warning(
                            "dead-lettered a message",
                            extra={
                                "feed": feed,
                                "reason": reason,
                                "error": error,
                                "subject": d.subject,
                                "broker_seq": d.stream_seq,
                                "bytes": len(d.payload),
                            },
                        )
                result.dead_letters += appended
                continue
            result.appended[group.name] = appended
            result.duplicates[group.name] = group.count - appended
            metrics.MESSAGES.labels(feed=group.name).inc(appended)
            if group.count - appended:
                metrics.DUPLICATES.labels(feed=group.name).inc(group.count - appended)
        return result
