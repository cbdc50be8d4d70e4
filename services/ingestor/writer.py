"""One feed's JetStream deliveries -> its Redis stream, through the `ingest_append` Lua script.

Per batch: the deliveries are sorted by stream sequence (= the feed's seq) and decoded;
a payload that cannot be decoded keeps its seq as a malformed entry (`error`,
`payload_b64`: `codec.malformed_fields`), so a reader sees no gap. The batch goes to
Redis as ONE script call: per message the dedup key, the XADD at id `<seq>-0`, the meta
hash, atomically. The script answers per message: appended, duplicate, or not appended
because the stream's top is below seq-1 (a hole Redis lost: the caller fills it from
JetStream, then sends the rest again). Nothing here acks.

The EVALSHA command is packed with `hiredis.pack_command` (about twice as fast as a
hand-written RESP packer, and the same bytes as redis-py's own packer: a batch of 1000
messages is ~20,000 arguments) and sent on the writer's OWN connection, not one from the
pool that /readyz also uses: so the writer knows when it connects again, and reads
Redis's INFO `run_id` then. A changed run_id means Redis restarted or failed over and
may have lost writes; it is logged and counted, and the next script call says where the
stream's top now is. The script goes by SHA and is loaded on NOSCRIPT (a restarted
Redis). A resend after any error is safe: the script is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from services.ingestor import metrics
from services.ingestor.settings import IngestorSettings
from shared import codec, scripts
from shared.feeds import FEEDS, message_id, seq_of_entry_id
from shared.keys import Keys

log = logging.getLogger(__name__)


class StaleEpoch(ResponseError):
    """Redis holds the feed under a newer epoch: this ingestor's JetStream stream is old."""

    def __init__(self, current: str) -> None:
        super().__init__(f"Redis holds a newer epoch ({current}) than this ingestor's stream")
        self.current = current


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
class Rejected:
    """Why a payload became a malformed entry: a reason label and the error."""

    reason: str
    error: str


@dataclass(slots=True)
class Message:
    """A delivery as the script appends it: seq, message id, fields (without `seq`)."""

    seq: int
    message_id: str
    fields: list[str]
    rejected: Rejected | None = None
    size: int = 0  # payload bytes (for the malformed entry's log line)


@dataclass(slots=True)
class Outcome:
    """What one or more script calls did."""

    appended: int = 0
    duplicates: int = 0
    malformed: int = 0  # of the appended, malformed entries
    hole: int | None = None  # index of the first message not appended for a hole below it
    top: int = 0  # the stream's top when the hole was found (0: stream missing or empty)

    def add(self, other: Outcome) -> None:
        self.appended += other.appended
        self.duplicates += other.duplicates
        self.malformed += other.malformed


@dataclass(slots=True)
class Prepared:
    """A batch decoded (in seq order) and packed, ready to send."""

    messages: list[Message]
    packed: bytes = field(repr=False)


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


class RunIdWatch:
    """The run_id of the Redis the writers last connected to, shared by a process's
    writers, so that one restart is logged and counted once."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.restarts = 0

    def seen(self, run_id: str | None) -> bool:
        """Record the run_id found on (re)connecting; True if it differs from the last."""
        if run_id is None or run_id == self.run_id:
            return False
        previous, self.run_id = self.run_id, run_id
        if previous is None:
            return False
        self.restarts += 1
        metrics.REDIS_RESTARTS.inc()
        log.warning(
            "Redis restarted or failed over (its run_id changed) and may have lost writes; "
            "each feed's next append reports where its stream's top is, and a hole is filled "
            "from JetStream",
            extra={"run_id": run_id, "previous_run_id": previous},
        )
        return True


def pack(args: Sequence[str | int | bytes]) -> bytes:
    """One command in the Redis protocol (RESP), as redis-py would send it."""
    return bytes(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]  # the stub says 1-tuple


class Writer:
    """Appends one feed's batches to its Redis stream on a connection of its own."""

    def __init__(
        self, redis: Redis, settings: IngestorSettings, feed: str, watch: RunIdWatch | None = None
    ) -> None:
        self.feed = feed
        self._feed = FEEDS[feed]
        self.keys = Keys(settings.key_prefix)
        self.ttl = max(1, int(settings.dedup_ttl))
        self.max_payload = settings.max_payload
        self.subject = settings.subject(feed)
        self._sha = scripts.register(redis, "ingest_append").sha
        self._restart = scripts.register(redis, "ingest_restart")
        self._redis = redis
        self._stream_key = self.keys.stream(feed)
        self._meta_key = self.keys.meta(feed)
        pool = redis.connection_pool
        self._conn: Any = pool.connection_class(**pool.connection_kwargs)
        self.watch = watch if watch is not None else RunIdWatch()
        self._clock = BrokerClock()

    async def close(self) -> None:
        await self._conn.disconnect()

    # -- decoding and packing (CPU only) --------------------------------------------------

    def messages(self, batch: Sequence[Delivery], epoch: str, ingest_time: str) -> list[Message]:
        """The batch as the script appends it, in seq order."""
        out = []
        for d in sorted(batch, key=lambda d: d.stream_seq):
            mid = message_id(epoch, d.stream_seq)
            broker_time = self._clock.iso_ms(d.timestamp_ns)
            outcome = self._decode(d)
            if isinstance(outcome, Rejected):
                fields = codec.malformed_fields(mid, outcome.error, d.payload, broker_time, ingest_time)
                out.append(Message(d.stream_seq, mid, fields, outcome, len(d.payload)))
            else:
                out.append(
                    Message(d.stream_seq, mid, codec.entry_fields(mid, outcome, broker_time, ingest_time))
                )
        return out

    def _decode(self, d: Delivery) -> dict[str, str] | Rejected:
        """The delivery's decoded fields, or why it becomes a malformed entry."""
        if d.subject != self.subject:
            return Rejected(
                "unknown_subject", f"the feed {self.feed} is not published on subject {d.subject!r}"
            )
        if len(d.payload) > self.max_payload:
            return Rejected(
                "too_large",
                f"payload of {len(d.payload)} bytes exceeds FANOUT_MAX_PAYLOAD ({self.max_payload} bytes)",
            )
        try:
            return codec.decode(self._feed, d.payload)
        except codec.BadPayload as exc:
            return Rejected("bad_payload", str(exc))
        except Exception as exc:  # one payload must never stop the pipeline
            log.exception("the decoder failed unexpectedly; keeping the payload as a malformed entry")
            return Rejected("decoder_error", f"the decoder failed: {type(exc).__name__}: {exc}")

    def command(self, messages: Sequence[Message], epoch: str, start: int = 0) -> list[str | int]:
        """EVALSHA of the script for `messages`: its arguments."""
        args: list[str | int] = ["EVALSHA", self._sha, 2 + len(messages), self._stream_key, self._meta_key]
        dedup = self.keys.dedup
        feed = self.feed
        args += [dedup(feed, m.message_id) for m in messages]
        args += [self.ttl, epoch, start]
        for m in messages:
            args.append(m.seq)
            args.append(len(m.fields))
            args += m.fields
        return args

    def prepare(self, batch: Sequence[Delivery], epoch: str) -> Prepared:
        """Decode a batch and pack its script call (no I/O)."""
        messages = self.messages(batch, epoch, codec.iso_ms(datetime.now(UTC)))
        return Prepared(messages, pack(self.command(messages, epoch)) if messages else b"")

    # -- Redis ----------------------------------------------------------------------------

    async def send(self, prepared: Prepared, meanwhile: Callable[[], None] | None = None) -> Outcome:
        """Run a prepared batch's script call; returns once Redis has answered for every
        message. `meanwhile` runs once the command is on its way, while Redis executes it
        (the caller prepares its next batch there). Raises StaleEpoch, Redis errors."""
        if not prepared.messages:
            return Outcome()
        return self._account(prepared.messages, await self._call(prepared.packed, meanwhile))

    async def append(self, messages: Sequence[Message], epoch: str, start: int = 0) -> Outcome:
        """pack, then send."""
        if not messages:
            return Outcome()
        return self._account(messages, await self._call(pack(self.command(messages, epoch, start)), None))

    async def write(self, batch: Sequence[Delivery], epoch: str, start: int = 0) -> Outcome:
        """Decode and append a batch in one call (used by tests and tools)."""
        return await self.append(self.messages(batch, epoch, codec.iso_ms(datetime.now(UTC))), epoch, start)

    async def lowest(self) -> int | None:
        """The seq of the first entry the feed's stream still holds (None: none)."""
        first: Any = await self._redis.xrange(self._stream_key, count=1)
        return seq_of_entry_id(first[0][0]) if first else None

    async def restart(self, top: int) -> bool:
        """Drop the feed's stream if its top is still `top` (see `ingest_restart.lua`)."""
        return bool(await self._restart(keys=[self._stream_key], args=[top]))

    async def _connection(self) -> Any:
        conn = self._conn
        if not conn.is_connected:
            await conn.connect()
            self.watch.seen(await self._run_id(conn))
        return conn

    async def _run_id(self, conn: Any) -> str | None:
        """INFO server's run_id (new at every Redis start); None if INFO is refused (a
        managed Redis may disable it): the script's hole check still covers every loss."""
        try:
            await conn.send_command("INFO", "server", check_health=False)
            text = await conn.read_response()
        except ResponseError as exc:
            log.debug(
                "Redis refuses INFO server: restarts are noticed by holes only", extra={"error": str(exc)}
            )
            return None
        for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
            if line.startswith("run_id:"):
                return line[7:].strip()
        return None

    async def _call(self, packed: bytes, meanwhile: Callable[[], None] | None) -> Any:
        reused = self._conn.is_connected
        try:
            return await self._call_once(packed, meanwhile)
        except RedisConnectionError:
            if not reused:
                raise
        # A connection that died while it was not in use (Redis restarted, or closed it):
        # once more on a new one, which also reads the run_id. Safe: the script is
        # idempotent. `meanwhile` may have run already: not again.
        return await self._call_once(packed, None)

    async def _call_once(self, packed: bytes, meanwhile: Callable[[], None] | None) -> Any:
        conn = await self._connection()
        try:
            await conn.send_packed_command(packed, check_health=False)
            if meanwhile is not None:
                meanwhile()
            try:
                return await conn.read_response()
            except NoScriptError:
                await conn.send_command("SCRIPT", "LOAD", scripts.source("ingest_append"), check_health=False)
                await conn.read_response()
                await conn.send_packed_command(packed, check_health=False)
                return await conn.read_response()
        except ResponseError as exc:
            text = str(exc)
            if text.startswith("STALE_EPOCH"):
                raise StaleEpoch(text.partition(" ")[2]) from None
            raise
        except BaseException:
            await conn.disconnect()  # a reply may be left unread: never reuse this connection
            raise

    def _account(self, messages: Sequence[Message], reply: Any) -> Outcome:
        out = Outcome()
        for i, (m, (entry_id, status)) in enumerate(zip(messages, reply, strict=True)):
            status = int(status)
            if status == 1:
                out.appended += 1
                if m.rejected is not None:
                    out.malformed += 1
                    self._malformed(m)
            elif status == 0:
                out.duplicates += 1
            else:
                out.hole, out.top = i, seq_of_entry_id(entry_id)
                break
        metrics.MESSAGES.labels(feed=self.feed).inc(out.appended - out.malformed)
        if out.duplicates:
            metrics.DUPLICATES.labels(feed=self.feed).inc(out.duplicates)
        return out

    def _malformed(self, m: Message) -> None:
        """Counted and logged once: when appended (a redelivery is a duplicate)."""
        assert m.rejected is not None
        metrics.DEAD_LETTERS.labels(feed=self.feed, reason=m.rejected.reason).inc()
        log.warning(
            "a payload that is not a valid message keeps its seq as a malformed entry",
            extra={
                "feed": self.feed,
                "seq": m.seq,
                "message_id": m.message_id,
                "reason": m.rejected.reason,
                "error": m.rejected.error,
                "bytes": m.size,
            },
        )
