"""`fanout audit`: reconcile JetStream, the Redis streams and the PostgreSQL catalogue.

Per feed it checks that every message JetStream still retains is accounted for exactly
once, and that Redis and Postgres agree with each other:

- JetStream: the stream's retained sequences [first, last], counted per subject (the
  feed's subject is Settings.subject(feed)). A message id is
  `<stream created, unix ms>.<stream seq>`, so a Redis entry or a Postgres row names the
  JetStream message it came from. A retained message is accounted for when it is in its
  feed (Redis or Postgres) or in the dead letters; one the ingestor has not acked yet
  (above its consumer's ack floor) is `in flight`, not missing.
- Redis: within the stream, `seq` must go up by exactly one from entry to entry (one
  epoch per stream), no message id twice, and the meta hash must name the last entry.
- Postgres: no (epoch, seq) twice, no message twice (in two feeds, or in a feed and the
  dead letters), no seq gap within an epoch, and every Redis entry the archiver has
  already acked must have its row (an entry still pending in the archiver's consumer
  group is `unarchived`, not missing).

Exit status: 0 when everything reconciles, 1 on any discrepancy (each one is named
below the table), 2 when a server cannot be reached. In-flight and unarchived messages
are lag, reported but not a discrepancy; `--wait 60s` repeats the audit until the lag
is gone or the time is up, for checks after a run.

`--watch` runs the audit every `--audit-interval` and exports the counts as Prometheus
gauges (fanout_audit_missing_total, fanout_audit_duplicates_total, ...) on
`--audit-http` /metrics, so the exactly-once promise is watched in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import RedisError

from shared import logs
from shared.connections import redis_client
from shared.feeds import DEAD_LETTER, FEED_NAMES
from shared.keys import Keys
from shared.lifecycle import install_stop_signals, wait_or_stop
from shared.settings import Settings, nats_servers, parse_duration, parse_host_port, setting

DESCRIPTION = __doc__
log = logging.getLogger(__name__)

# How many discrepancies of one kind are named one by one; the rest are counted.
_NAMED = 10
# How many unaccounted JetStream sequences are looked up one by one to name their feed.
_LOOKUPS = 2000
_XRANGE_CHUNK = 10_000


@dataclass(frozen=True)
class AuditSettings(Settings):
    js_consumer: str = setting("FANOUT_JS_CONSUMER", "ingestor", "the ingestor's durable JetStream consumer")
    archive_group: str = setting("FANOUT_ARCHIVE_GROUP", "archiver", "the archiver's Redis consumer group")
    audit_http: tuple[str, int] = setting(
        "FANOUT_AUDIT_HTTP",
        ("127.0.0.1", 9104),
        "--watch: ops http address (/metrics, /healthz, /readyz); port 0 = any free port",
        parse_host_port,
    )
    audit_interval: float = setting(
        "FANOUT_AUDIT_INTERVAL", 60.0, "--watch: time between two audits, e.g. 60s", parse_duration
    )


class Unreachable(Exception):
    """A server the audit needs did not answer."""

    def __init__(self, server: str, url: str, reason: object) -> None:
        super().__init__(f"{server} at {url} is unreachable: {reason}")
        self.server = server


@dataclass
class FeedAudit:
    feed: str
    jetstream: int = 0  # messages JetStream retains on the feed's subject
    redis: int = 0  # entries in the feed's Redis stream
    postgres: int = 0  # rows in the feed's catalogue table
    dead_letters: int = 0  # JetStream messages of this feed's subject that were dead-lettered
    in_flight: int = 0  # retained messages the ingestor has not acked yet
    unarchived: int = 0  # Redis entries still pending in the archiver's group
    missing: int = 0
    duplicates: int = 0
    seq_gaps: int = 0  # seqs missing inside an epoch (Redis stream or Postgres)
    problems: list[str] = field(default_factory=list)

    @property
    def discrepancies(self) -> int:
        return self.missing + self.duplicates + self.seq_gaps

    def problem(self, kind: str, items: list[str], total: int) -> None:
        if total:
            more = f" (+{total - len(items)} more)" if total > len(items) else ""
            self.problems.append(f"{self.feed}: {total} {kind}: {', '.join(items)}{more}")


@dataclass
class Report:
    feeds: dict[str, FeedAudit]
    notes: list[str] = field(default_factory=list)

    @property
    def discrepancies(self) -> int:
        return sum(f.discrepancies for f in self.feeds.values())

    @property
    def lag(self) -> int:
        return sum(f.in_flight + f.unarchived for f in self.feeds.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.discrepancies == 0,
            "feeds": {name: asdict(f) for name, f in self.feeds.items()},
            "notes": self.notes,
        }


# --- collecting --------------------------------------------------------------------


@dataclass
class _JetStream:
    created_ms: int | None = None
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0
    per_subject: dict[str, int] = field(default_factory=dict)
    ack_floor: int | None = None
    js: Any = None  # the JetStream context, to look messages up by seq

    def seq_of(self, message_id: str) -> int | None:
        """The stream seq a message id names, if it names a message of this stream's
        life (a recreated stream has another creation time) still retained."""
        created, _, seq = message_id.partition(".")
        if self.created_ms is None or not (created.isdigit() and seq.isdigit()):
            return None
        # Allow 1 ms either way: creation times are rounded differently by clients.
        if abs(int(created) - self.created_ms) > 1:
            return None
        n = int(seq)
        return n if self.first_seq <= n <= self.last_seq else None


async def _jetstream(settings: AuditSettings, report: Report, stack: contextlib.AsyncExitStack) -> _JetStream:
    import nats
    import nats.errors
    from nats.js.errors import NotFoundError

    out = _JetStream()
    try:
        nc = await nats.connect(
            servers=nats_servers(settings.nats_url),
            connect_timeout=3,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # 0 would mean "forever" in nats-py's server selection
            reconnect_time_wait=0.2,
            error_cb=_quiet,
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise Unreachable("NATS", settings.nats_url, exc) from None
    stack.push_async_callback(nc.close)
    js = nc.jetstream(timeout=5)
    try:
        info = await js.stream_info(settings.js_stream, subjects_filter=">")
    except NotFoundError:
        report.notes.append(f"JetStream stream {settings.js_stream!r} does not exist: nothing to reconcile")
        return out
    except (nats.errors.Error, TimeoutError) as exc:  # timeout, no responders: no JetStream
        raise Unreachable("NATS JetStream", settings.nats_url, f"{type(exc).__name__} {exc}") from None
    if info.created is not None:
        out.created_ms = int(info.created.timestamp() * 1000)
    state = info.state
    out.first_seq, out.last_seq, out.messages = state.first_seq, state.last_seq, state.messages
    out.per_subject = dict(state.subjects or {})
    out.js = js
    try:
        consumer = await js.consumer_info(settings.js_stream, settings.js_consumer)
        out.ack_floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
    except NotFoundError:
        report.notes.append(
            f"JetStream consumer {settings.js_consumer!r} does not exist: the ingestor has not run"
        )
        out.ack_floor = 0
    return out


async def _quiet(exc: Exception) -> None:
    """nats-py logs a traceback per failed attempt by default; the caller reports it once."""


@dataclass
class _Entry:
    id: str
    seq: int
    message_id: str
    subject: str = ""


async def _xrange(redis: Any, key: str) -> AsyncIterator[list[_Entry]]:
    start = "-"
    while True:
        rows = await redis.xrange(key, min=start, max="+", count=_XRANGE_CHUNK)
        if not rows:
            return
        batch = []
        for raw_id, raw in rows:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            get = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
            batch.append(
                _Entry(
                    entry_id,
                    int(get.get("seq", b"0")),
                    _str(get.get("message_id", b"")),
                    _str(get.get("subject", b"")),
                )
            )
        yield batch
        if len(rows) < _XRANGE_CHUNK:
            return
        start = "(" + batch[-1].id


def _str(v: bytes | str) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


async def _archiver_frontier(redis: Any, stream: str, group: str) -> tuple[int, int] | None:
    """The id below which the archiver has acked every entry (exclusive), or None when
    the group does not exist (nothing archived yet)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except Exception as exc:  # ResponseError: no such key
        if "no such key" in str(exc).lower():
            return None
        raise
    for g in groups:
        name = _str(g.get("name", b""))
        if name != group:
            continue
        last = _str(g.get("last-delivered-id", b"0-0"))
        frontier = _id_tuple(last)
        frontier = (frontier[0], frontier[1] + 1)  # entries up to last-delivered were delivered
        if int(g.get("pending", 0)):
            summary = await redis.xpending(stream, group)
            low = summary.get("min")
            if low:
                frontier = min(frontier, _id_tuple(_str(low)))
        return frontier
    return None


async def _pg_connect(settings: AuditSettings) -> Any:
    import asyncpg

    try:
        return await asyncpg.connect(settings.database_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise Unreachable("PostgreSQL", settings.database_url, exc) from None


async def _table_exists(pg: Any, schema: str, table: str) -> bool:
    return bool(await pg.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}"."{table}"'))


def _q(schema: str, table: str) -> str:
    return f'"{schema.replace(chr(34), chr(34) * 2)}"."{table}"'


class _Ledger:
    """Which retained JetStream sequences were seen where: a bytearray over
    [first_seq, last_seq], one bit per place (feed stream/row per feed, dead letter)."""

    DEAD = 0x80

    def __init__(self, js: _JetStream) -> None:
        self.js = js
        self.size = js.last_seq - js.first_seq + 1 if js.created_ms is not None and js.last_seq else 0
        self.bits = bytearray(self.size)
        self.feed_bit = {name: 1 << i for i, name in enumerate(FEED_NAMES)}
        self.twice: dict[str, list[str]] = {}  # feed -> message ids accounted twice

    def mark(self, message_id: str, place: str) -> None:
        seq = self.js.seq_of(message_id)
        if seq is None:
            return
        i = seq - self.js.first_seq
        bit = self.DEAD if place == DEAD_LETTER else self.feed_bit[place]
        if self.bits[i] & ~bit:
            # In a feed and in the dead letters, or in two feeds.
            self.twice.setdefault(place, []).append(message_id)
        self.bits[i] |= bit


async def _redis_feed(
    redis: Any, keys: Keys, settings: AuditSettings, feed: str, audit: FeedAudit, ledger: _Ledger
) -> tuple[str, dict[int, _Entry], tuple[int, int] | None]:
    """Redis checks for one feed; returns (epoch, entries by seq, archiver frontier)."""
    meta = {_str(k): _str(v) for k, v in (await redis.hgetall(keys.meta(feed))).items()}
    epoch = meta.get("epoch", "")
    stream = keys.stream(feed)
    by_seq: dict[int, _Entry] = {}
    seen: dict[str, str] = {}
    dups: list[str] = []
    gaps: list[str] = []
    gap_total = 0
    dup_total = 0
    prev: _Entry | None = None
    async for batch in _xrange(redis, stream):
        for e in batch:
            audit.redis += 1
            if e.message_id in seen:
                dup_total += 1
                if len(dups) < _NAMED:
                    dups.append(f"{e.message_id} at {seen[e.message_id]} and {e.id}")
            else:
                seen[e.message_id] = e.id
                ledger.mark(e.message_id, feed)
            if prev is not None and e.seq != prev.seq + 1:
                if e.seq > prev.seq + 1:
                    gap_total += e.seq - prev.seq - 1
                    if len(gaps) < _NAMED:
                        gaps.append(f"seq {prev.seq + 1}..{e.seq - 1} (between {prev.id} and {e.id})")
                else:
                    dup_total += 1
                    if len(dups) < _NAMED:
                        dups.append(f"seq {e.seq} again at {e.id} after seq {prev.seq}")
            by_seq.setdefault(e.seq, e)
            prev = e
    audit.duplicates += dup_total
    audit.seq_gaps += gap_total
    audit.problem("duplicate entries in Redis", dups, dup_total)
    audit.problem("seqs missing in the Redis stream", gaps, gap_total)
    if prev is not None and meta.get("seq") and int(meta["seq"]) != prev.seq:
        audit.problems.append(
            f"{feed}: Redis meta seq {meta['seq']} is not the last entry's seq {prev.seq} ({prev.id})"
        )
        audit.seq_gaps += abs(int(meta["seq"]) - prev.seq)
    frontier = await _archiver_frontier(redis, stream, settings.archive_group)
    return epoch, by_seq, frontier


async def _postgres_feed(
    pg: Any,
    settings: AuditSettings,
    feed: str,
    audit: FeedAudit,
    ledger: _Ledger,
    epoch: str,
    redis_by_seq: dict[int, _Entry],
    frontier: tuple[int, int] | None,
    poisoned: set[str],
) -> None:
    table = _q(settings.db_schema, feed)
    if not await _table_exists(pg, settings.db_schema, feed):
        pg_seqs: set[int] = set()
        pg_ids: set[str] = set()
    else:
        audit.postgres = int(await pg.fetchval(f"SELECT count(*) FROM {table}"))
        # The same (epoch, seq) twice: the same stream entry catalogued twice.
        rows = await pg.fetch(
            f"SELECT epoch, seq, array_agg(message_id ORDER BY message_id) AS ids, count(*) AS n"
            f" FROM {table} GROUP BY epoch, seq HAVING count(*) > 1 ORDER BY epoch, seq"
        )
        total = sum(int(r["n"]) - 1 for r in rows)
        audit.duplicates += total
        audit.problem(
            "duplicate rows in Postgres",
            [f"epoch {r['epoch']} seq {r['seq']} ({', '.join(r['ids'])})" for r in rows[:_NAMED]],
            total,
        )
        # Seq gaps within each epoch (the first seq of an epoch is 1).
        gap_rows = await pg.fetch(
            f"SELECT epoch, prev + 1 AS lo, seq - 1 AS hi FROM ("
            f" SELECT epoch, seq, coalesce(lag(seq) OVER (PARTITION BY epoch ORDER BY seq), 0) AS prev"
            f" FROM {table}) g WHERE seq > prev + 1 ORDER BY epoch, lo"
        )
        # Rows of the current epoch from the first seq Redis holds on: checked against Redis.
        first_redis = min(redis_by_seq) if redis_by_seq else None
        pg_seqs = set()
        pg_ids = set()
        if epoch:
            low = first_redis if first_redis is not None else 1 << 62
            for r in await pg.fetch(
                f"SELECT seq, message_id FROM {table} WHERE epoch = $1 AND seq >= $2", epoch, low
            ):
                pg_seqs.add(int(r["seq"]))
                pg_ids.add(r["message_id"])
        # Every row's message id, for the JetStream ledger (streamed: tables can be big).
        if ledger.size:
            async with pg.transaction():
                async for r in pg.cursor(f"SELECT message_id FROM {table}", prefetch=10_000):
                    ledger.mark(r["message_id"], feed)
        gaps: list[str] = []
        gap_total = 0
        for r in gap_rows:
            lo, hi = int(r["lo"]), int(r["hi"])
            if r["epoch"] == epoch and redis_by_seq:
                # A seq Redis still holds is checked below (unarchived lag, or a missing row).
                absent = [s for s in range(lo, hi + 1) if s not in redis_by_seq]
                if not absent:
                    continue
                gap_total += len(absent)
                lo, hi = absent[0], absent[-1]
            else:
                gap_total += hi - lo + 1
            if len(gaps) < _NAMED:
                gaps.append(f"epoch {r['epoch']} seq {lo}..{hi}")
        audit.seq_gaps += gap_total
        audit.problem("seqs missing in Postgres", gaps, gap_total)

    # Redis entries the archiver has acked must have their row.
    candidates: list[_Entry] = []
    for seq, e in redis_by_seq.items():
        if seq in pg_seqs:
            continue
        if frontier is None or _id_tuple(e.id) >= frontier:
            audit.unarchived += 1
        elif e.message_id not in pg_ids and e.message_id not in poisoned and e.id not in poisoned:
            candidates.append(e)
    if candidates and await _table_exists(pg, settings.db_schema, feed):
        # A message re-ingested under a new epoch (Redis lost its data) keeps its first row.
        kept = {
            r["message_id"]
            for r in await pg.fetch(
                f"SELECT message_id FROM {table} WHERE message_id = ANY($1::text[])",
                [e.message_id for e in candidates],
            )
        }
        candidates = [e for e in candidates if e.message_id not in kept]
    missing_total = len(candidates)
    missing = [f"{e.message_id} (seq {e.seq}, entry {e.id})" for e in candidates[:_NAMED]]
    audit.missing += missing_total
    audit.problem("archived Redis entries without a Postgres row", missing, missing_total)


async def _dead_letters(
    redis: Any, pg: Any, keys: Keys, settings: AuditSettings, report: Report, ledger: _Ledger
) -> set[str]:
    """Mark dead letters in the ledger; count them per feed; return the message ids and
    entry ids the archiver dead-lettered (poison entries: no row expected)."""
    by_subject = {settings.subject(f): f for f in FEED_NAMES}
    seen: set[str] = set()
    async for batch in _xrange(redis, keys.dead_letter_stream()):
        for e in batch:
            if e.message_id in seen:
                continue
            seen.add(e.message_id)
            ledger.mark(e.message_id, DEAD_LETTER)
            feed = by_subject.get(e.subject)
            if feed:
                report.feeds[feed].dead_letters += 1
    poisoned: set[str] = set()
    if await _table_exists(pg, settings.db_schema, "dead_letter"):
        table = _q(settings.db_schema, "dead_letter")
        for r in await pg.fetch(f"SELECT source, feed, message_id, subject, stream_id FROM {table}"):
            if r["source"] == "archiver":
                poisoned.update(x for x in (r["message_id"], r["stream_id"]) if x)
                continue
            if r["message_id"] and r["message_id"] not in seen:
                seen.add(r["message_id"])
                ledger.mark(r["message_id"], DEAD_LETTER)
                feed = by_subject.get(r["subject"] or "")
                if feed:
                    report.feeds[feed].dead_letters += 1
    return poisoned


async def _unaccounted(js: _JetStream, ledger: _Ledger, settings: AuditSettings, report: Report) -> None:
    """Retained JetStream messages found nowhere: missing, or in flight if the ingestor
    has not acked them yet. Each is looked up (up to _LOOKUPS) to name its feed."""
    from nats.js.errors import NotFoundError

    by_subject = {settings.subject(f): f for f in FEED_NAMES}
    floor = js.ack_floor or 0
    named: dict[str, list[str]] = {f: [] for f in FEED_NAMES}
    missing = dict.fromkeys(FEED_NAMES, 0)
    unknown_missing = unknown_in_flight = 0
    looked = 0
    for i, b in enumerate(ledger.bits):
        if b:
            continue
        seq = js.first_seq + i
        feed: str | None = None
        if js.js is not None and looked < _LOOKUPS:
            looked += 1
            try:
                msg = await js.js.get_msg(settings.js_stream, seq)
            except NotFoundError:
                continue  # deleted from the stream: nothing to hold
            feed = by_subject.get(msg.subject or "")
            if feed is None:
                continue  # a subject that is not a feed's
        if seq > floor:
            if feed:
                report.feeds[feed].in_flight += 1
            else:
                unknown_in_flight += 1
        elif feed:
            missing[feed] += 1
            if len(named[feed]) < _NAMED:
                named[feed].append(f"{js.created_ms}.{seq}")
        else:
            unknown_missing += 1
    for feed, total in missing.items():
        report.feeds[feed].missing += total
        report.feeds[feed].problem(
            "JetStream messages in neither Redis, Postgres nor the dead letters", named[feed], total
        )
    if unknown_missing or unknown_in_flight:
        report.notes.append(
            f"{unknown_missing} missing and {unknown_in_flight} in-flight JetStream messages beyond "
            f"the first {_LOOKUPS} looked up; counted under {FEED_NAMES[0]}"
        )
        report.feeds[FEED_NAMES[0]].missing += unknown_missing
        report.feeds[FEED_NAMES[0]].in_flight += unknown_in_flight
    for place, twice in ledger.twice.items():
        target = report.feeds.get(place) or report.feeds[FEED_NAMES[0]]
        target.duplicates += len(twice)
        target.problem(
            "messages accounted twice (in two feeds, or in a feed and the dead letters)",
            twice[:_NAMED],
            len(twice),
        )


async def audit(settings: AuditSettings) -> Report:
    """Run every check once. Raises Unreachable when a server does not answer."""
    report = Report({f: FeedAudit(f) for f in FEED_NAMES})
    keys = Keys(settings.key_prefix)
    async with contextlib.AsyncExitStack() as stack:
        js = await _jetstream(settings, report, stack)
        redis = redis_client(settings.redis_url)
        stack.push_async_callback(redis.aclose)
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            raise Unreachable("Redis", settings.redis_url, exc) from None
        pg = await _pg_connect(settings)
        stack.push_async_callback(pg.close)
        ledger = _Ledger(js)
        for feed in FEED_NAMES:
            report.feeds[feed].jetstream = js.per_subject.get(settings.subject(feed), 0)
        poisoned = await _dead_letters(redis, pg, keys, settings, report, ledger)
        for feed in FEED_NAMES:
            a = report.feeds[feed]
            epoch, by_seq, frontier = await _redis_feed(redis, keys, settings, feed, a, ledger)
            await _postgres_feed(pg, settings, feed, a, ledger, epoch, by_seq, frontier, poisoned)
        await _unaccounted(js, ledger, settings, report)
        return report


# --- output --------------------------------------------------------------------------

_COLUMNS = (
    ("feed", "feed"),
    ("jetstream", "JetStream"),
    ("redis", "Redis"),
    ("postgres", "Postgres"),
    ("dead_letters", "dead letters"),
    ("in_flight", "in flight"),
    ("unarchived", "unarchived"),
    ("missing", "missing"),
    ("duplicates", "duplicates"),
    ("seq_gaps", "seq gaps"),
)


def table(report: Report) -> str:
    rows = [[title for _, title in _COLUMNS]]
    for a in report.feeds.values():
        rows.append([str(getattr(a, name)) for name, _ in _COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    problems = [p for a in report.feeds.values() for p in a.problems]
    out = "\n".join(lines)
    if problems:
        out += "\n\nDiscrepancies:\n" + "\n".join(f"  - {p}" for p in problems)
    if report.notes:
        out += "\n\nNotes:\n" + "\n".join(f"  - {n}" for n in report.notes)
    verdict = (
        "OK: every retained message is accounted for exactly once"
        if not report.discrepancies
        else (f"FAIL: {report.discrepancies} discrepancies")
    )
    if report.lag and not report.discrepancies:
        verdict += f" (lag: {report.lag} messages not yet ingested or archived)"
    return out + "\n\n" + verdict


# --- the command ---------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--wait",
        type=parse_duration,
        default=0.0,
        metavar="DURATION",
        help="repeat the audit until nothing is in flight or unarchived and nothing is wrong, "
        "or this long has passed (e.g. 60s); for checks after a run",
    )
    parser.add_argument(
        "--watch", action="store_true", help="run forever, every --audit-interval, exporting metrics"
    )
    AuditSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = AuditSettings.from_args(args)
    if args.watch:
        logs.configure("audit", settings.log_format, settings.log_level)
        asyncio.run(watch(settings))
        return 0
    try:
        report = asyncio.run(audit_until_settled(settings, args.wait))
    except Unreachable as exc:
        print(f"fanout audit: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else table(report))
    return 1 if report.discrepancies else 0


async def audit_until_settled(settings: AuditSettings, wait: float) -> Report:
    deadline = time.monotonic() + wait
    delay = 0.2
    while True:
        report = await audit(settings)
        if (report.discrepancies == 0 and report.lag == 0) or time.monotonic() >= deadline:
            return report
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 5.0)


# --- the periodic check --------------------------------------------------------------


class AuditMetrics:
    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Gauge

        reg = registry or REGISTRY
        self.missing = Gauge(
            "fanout_audit_missing_total",
            "messages missing (JetStream->Redis/Postgres, Redis->Postgres)",
            ["feed"],
            registry=reg,
        )
        self.duplicates = Gauge(
            "fanout_audit_duplicates_total", "messages stored more than once", ["feed"], registry=reg
        )
        self.seq_gaps = Gauge(
            "fanout_audit_seq_gaps_total", "seqs missing within an epoch", ["feed"], registry=reg
        )
        self.lag = Gauge(
            "fanout_audit_lag_messages", "messages not yet ingested or archived", ["feed"], registry=reg
        )
        self.up = Gauge("fanout_audit_up", "1 if the last audit reached every server", registry=reg)
        self.last = Gauge(
            "fanout_audit_last_run_timestamp_seconds", "when the last complete audit ended", registry=reg
        )

    def update(self, report: Report) -> None:
        for name, a in report.feeds.items():
            self.missing.labels(name).set(a.missing)
            self.duplicates.labels(name).set(a.duplicates)
            self.seq_gaps.labels(name).set(a.seq_gaps)
            self.lag.labels(name).set(a.in_flight + a.unarchived)
        self.up.set(1)
        self.last.set(time.time())


async def watch(
    settings: AuditSettings,
    stop: asyncio.Event | None = None,
    metrics: AuditMetrics | None = None,
    ops_port: list[int] | None = None,
) -> None:
    """Audit every settings.audit_interval until stopped, exporting the counts."""
    from shared.monitoring import OpsServer

    own_stop = stop is None
    stop = stop or asyncio.Event()
    if own_stop:
        install_stop_signals(stop)
    metrics = metrics or AuditMetrics()
    last_ok: list[bool] = [False]

    async def ready() -> bool:
        return last_ok[0]

    host, port = settings.audit_http
    ops = OpsServer(host, port, {"last_audit": ready})
    await ops.start()
    if ops_port is not None:
        ops_port.append(ops.port)
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                report = await audit(settings)
            except Unreachable as exc:
                metrics.up.set(0)
                last_ok[0] = False
                log.warning("audit incomplete", extra={"error": str(exc)})
            else:
                metrics.update(report)
                last_ok[0] = True
                extra = {
                    "discrepancies": report.discrepancies,
                    "lag": report.lag,
                    "seconds": round(time.monotonic() - started, 3),
                }
                if report.discrepancies:
                    problems = [p for a in report.feeds.values() for p in a.problems]
                    log.error("audit found discrepancies", extra={**extra, "problems": problems[:20]})
                else:
                    log.info("audit ok", extra=extra)
            if await wait_or_stop(stop, settings.audit_interval):
                break
    finally:
        await ops.stop()
