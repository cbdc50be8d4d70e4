"""One batch of JetStream deliveries -> Redis, through the `ingest_append` Lua script.

Per batch: the deliveries are grouped by feed, decoded, and each feed's group is
appended by ONE script call (dedup key, XADD, seq and meta in one atomic step per
message); what cannot be decoded goes to the dead-letter stream through the same
script. The calls for all groups go out in one pipeline, so a batch costs one round
trip. Nothing here acks: the caller acks once `write` has returned.

The EVALSHA commands are packed into the Redis protocol here rather than by redis-py:
a batch of 1000 messages is ~20,000 arguments, and redis-py's `pack_command` spent
more time on them than everything else in the ingestor together (its buffer is
re-joined per argument). The field names, the same in every message, are encoded once.
The script still goes by SHA and is loaded on NOSCRIPT (a restarted Redis); a resend
after any error is safe, since the script's dedup keys make it idempotent.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from services.ingestor import metrics
from services.ingestor.settings import IngestorSettings
from shared import codec, scripts
from shared.feeds import DEAD_LETTER, FEEDS, Feed
from shared.keys import Keys

log = logging.getLogger(__name__)


class RedisReconnected(RedisConnectionError):
    """A connection was re-established: Redis may have restarted, and lost writes."""


@dataclass(slots=True)
class Delivery:
    """One message as JetStream delivered it, parsed from its `$JS.ACK...` reply subject."""

    subject: str
    payload: bytes
    stream_seq: int
    delivered: int  # delivery count: 1 the first time
    timestamp_ns: int  # when the broker stored it
    reply: str  # where the ack goes


@dataclass(frozen=True, slots=True)
class _Rejected:
    """Why a delivery goes to the dead letters: its feed (or "unknown"), a reason label, the error."""

    feed: str
    reason: str
    error: str


@dataclass(slots=True)
class BatchResult:
    appended: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


@dataclass(slots=True)
class _Group:
    """The script call for one feed (or the dead letters): keys and args built up together.

    `args` holds the arguments after the keys, already as RESP bulk strings."""

    name: str
    keys: list[str]
    args: list[bytes]
    labels: list[tuple[str, str, Delivery, str]]  # dead letters only: feed, reason, delivery, error
    count: int = 0

    def add(self, dedup_key: str, broker_seq: int, fields: list[str], names: dict[str, bytes]) -> None:
        self.keys.append(dedup_key)
        self.count += 1
        args = self.args
        args.append(_bulk(b"%d" % broker_seq))
        args.append(_bulk(b"%d" % len(fields)))
        for i in range(0, len(fields), 2):
            name = names.get(fields[i])
            if name is None:
                name = names[fields[i]] = _bulk(fields[i].encode())
            args.append(name)
            args.append(_bulk(fields[i + 1].encode()))

    def command(self, sha: bytes) -> bytes:
        """EVALSHA sha numkeys keys... args... in the Redis protocol."""
        head = [
            b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(self.keys) + len(self.args)),
            _bulk(sha),
            _bulk(b"%d" % len(self.keys)),
        ]
        return b"".join([*head, *(_bulk(k.encode()) for k in self.keys), *self.args])


@dataclass(slots=True)
class Prepared:
    """A batch decoded and packed, ready to send."""

    groups: list[_Group]
    packed: bytes


class BrokerClock:
    """`codec.iso_ms_from_ns`, formatting each second once (a batch shares a few seconds)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso_ms(self, ns: int) -> str:
        second, rest = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{rest // 1_000_000:03d}Z"


class Writer:
    def __init__(self, redis: Redis, settings: IngestorSettings) -> None:
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.ttl = max(1, int(settings.dedup_ttl))
        self.max_payload = settings.max_payload
        self.script = scripts.register(redis, "ingest_append")
        self._sha = self.script.sha.encode()
        self._names: dict[str, bytes] = {}
        self._feed_of_subject: dict[str, Feed] = {settings.subject(name): f for name, f in FEEDS.items()}
        self._clock = BrokerClock()
        self._reconnected = False

    def _group(self, groups: dict[str, _Group], name: str) -> _Group:
        group = groups.get(name)
        if group is None:
            group = groups[name] = _Group(
                name,
                [self.keys.stream(name), self.keys.meta(name)],
                [_bulk(b"%d" % self.ttl), _bulk(secrets.token_hex(4).encode())],
                [],
            )
        return group

    def build(self, batch: Sequence[Delivery], created_ms: int, ingest_time: str) -> list[_Group]:
        """The script calls for a batch: one per feed present, plus one for its dead letters."""
        groups: dict[str, _Group] = {}
        for d in batch:
            message_id = f"{created_ms}.{d.stream_seq}"
            broker_time = self._clock.iso_ms(d.timestamp_ns)
            outcome = self._decode(d)
            if isinstance(outcome, _Rejected):
                self._dead_letter(groups, d, message_id, broker_time, ingest_time, outcome)
                continue
            feed, decoded = outcome
            fields = codec.entry_fields(message_id, decoded, broker_time, ingest_time)
            self._group(groups, feed.name).add(
                self.keys.dedup(feed.name, message_id), d.stream_seq, fields, self._names
            )
        return list(groups.values())

    def _decode(self, d: Delivery) -> tuple[Feed, dict[str, str]] | _Rejected:
        """The delivery's feed and decoded fields, or why it goes to the dead letters."""
        feed = self._feed_of_subject.get(d.subject)
        if feed is None:
            return _Rejected("unknown", "unknown_subject", f"no feed is published on subject {d.subject!r}")
        if len(d.payload) > self.max_payload:
            return _Rejected(
                feed.name,
                "too_large",
                f"payload of {len(d.payload)} bytes exceeds FANOUT_MAX_PAYLOAD ({self.max_payload} bytes)",
            )
        try:
            return feed, codec.decode(feed, d.payload)
        except codec.BadPayload as exc:
            return _Rejected(feed.name, "bad_payload", str(exc))
        except Exception as exc:  # one payload must never stop the pipeline
            log.exception("the decoder failed unexpectedly; dead-lettering the payload")
            return _Rejected(feed.name, "decoder_error", f"the decoder failed: {type(exc).__name__}: {exc}")

    def _dead_letter(
        self,
        groups: dict[str, _Group],
        d: Delivery,
        message_id: str,
        broker_time: str,
        ingest_time: str,
        rejected: _Rejected,
    ) -> None:
        feed, reason, error = rejected.feed, rejected.reason, rejected.error
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
        group.add(self.keys.dedup(DEAD_LETTER, message_id), d.stream_seq, fields, self._names)
        group.labels.append((feed, reason, d, error))

    def prepare(self, batch: Sequence[Delivery], created_ms: int) -> Prepared:
        """Decode a batch and pack its script calls (CPU only: no I/O)."""
        groups = self.build(batch, created_ms, codec.iso_ms(datetime.now(UTC)))
        return Prepared(groups, b"".join(group.command(self._sha) for group in groups))

    def forget_reconnects(self) -> None:
        """Redis was just checked against JetStream: reconnects so far are accounted for."""
        self._reconnected = False

    async def send(
        self, prepared: Prepared, meanwhile: Callable[[], None] | None = None, watch: bool = True
    ) -> BatchResult:
        """Run a prepared batch's script calls; returns once Redis has answered for every message.

        `meanwhile` runs once the commands are on their way, while Redis executes them
        (the caller prepares its next batch there). Safe to call again after any error:
        messages already appended come back as duplicates."""
        groups = prepared.groups
        if not groups:
            return BatchResult()
        replies = await self._send(prepared.packed, len(groups), meanwhile, watch)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self.redis.script_load(scripts.source("ingest_append"))
            replies = await self._send(prepared.packed, len(groups), None, watch)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return self._account(groups, replies)

    async def write(self, batch: Sequence[Delivery], created_ms: int, watch: bool = True) -> BatchResult:
        """prepare, then send."""
        return await self.send(self.prepare(batch, created_ms), watch=watch)

    def _on_connect(self, conn: Any) -> None:
        self._reconnected = True

    async def _send(
        self, packed: bytes, count: int, meanwhile: Callable[[], None] | None = None, watch: bool = True
    ) -> list[Any]:
        """Send pipelined commands on one pooled connection; their replies (errors as values).

        With `watch`, raises RedisReconnected, sending nothing, if a connection this
        writer used was re-established since (Redis may have restarted and lost writes)."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        conn.register_connect_callback(self._on_connect)
        try:
            await conn.check_health()
        except BaseException:
            await pool.release(conn)
            raise
        if self._reconnected and watch:
            self._reconnected = False
            await pool.release(conn)
            raise RedisReconnected("the connection to Redis was re-established")
        try:
            await conn.send_packed_command(packed, check_health=False)
            if meanwhile is not None:
                meanwhile()
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()  # replies may be left unread: never reuse this connection
            raise
        finally:
            await pool.release(conn)

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
