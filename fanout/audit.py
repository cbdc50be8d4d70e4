"""`fanout audit`: reconcile JetStream, the Redis streams and the PostgreSQL catalogue.

Contract v2: a message's position is its feed's JetStream stream (`<FANOUT_JS_STREAM>_<feed>`)
epoch (the stream's creation time in ms) and sequence; its message id is `<epoch>.<seq>`,
its Redis entry id `<seq>-0`. Per feed, per epoch, the audit checks that every seq is
accounted for exactly once:

- JetStream: every retained seq [first, last] is in PostgreSQL or Redis; one the
  ingestor has not acked yet (above its consumer's ack floor) is `in flight`, not missing.
- Redis: entry ids are contiguous `<seq>-0`, each entry's `seq` field equals its id and
  its message id is `<epoch>.<seq>` of the meta hash's epoch; an entry the archiver has
  acked must be in PostgreSQL (one not yet acked is `unarchived`, not missing).
- PostgreSQL: the feed's table and its `dead_letter` rows (malformed payloads, poison
  entries) together hold each (epoch, seq) at most once, a row's message id is
  `<epoch>.<seq>`, and no seq of an epoch (from 1 to its top) is missing unless Redis
  or JetStream accounts for it. Rows of the old layout (epochs made in Redis) are
  counted, not checked by seq.

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
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import RedisError

from shared import logs
from shared.connections import redis_client
from shared.feeds import FEED_NAMES, id_key, js_stream_name, seq_of_entry_id
from shared.keys import Keys
from shared.lifecycle import install_stop_signals, wait_or_stop
from shared.settings import (
    Settings,
    nats_servers,
    parse_duration,
    parse_host_port,
    require_positive,
    setting,
)

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
        "--watch: HOST:PORT of /healthz /readyz /metrics; if the port is taken, a free port is used "
        "and logged (port 0: always a free port)",
        parse_host_port,
    )
    audit_interval: float = setting(
        "FANOUT_AUDIT_INTERVAL", 60.0, "--watch: time between two audits", parse_duration
    )

    def validate(self) -> None:
        super().validate()
        require_positive({"FANOUT_AUDIT_INTERVAL": self.audit_interval})


class Unreachable(Exception):
    """A server the audit needs did not answer."""

    def __init__(self, server: str, url: str, reason: object) -> None:
        super().__init__(f"{server} at {url} is unreachable: {reason}")
        self.server = server


@dataclass
class FeedAudit:
    feed: str
    jetstream: int = 0  # messages the feed's JetStream stream retains
    redis: int = 0  # entries in the feed's Redis stream
    postgres: int = 0  # rows in the feed's catalogue table
    dead_letters: int = 0  # dead_letter rows of the feed (malformed payloads, poison entries)
    in_flight: int = 0  # retained messages the ingestor has not acked yet
    unarchived: int = 0  # Redis entries not yet acked by the archiver's group
    missing: int = 0
    duplicates: int = 0
    seq_gaps: int = 0  # seqs of an epoch held nowhere (Redis stream, or PostgreSQL)
    mismatches: int = 0  # entries or rows not at their position (id, seq and message id disagree)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def discrepancies(self) -> int:
        return self.missing + self.duplicates + self.seq_gaps + self.mismatches

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

# A contract v2 epoch: a JetStream stream's creation time in ms (13 digits). Rows of the
# old layout (random hex epochs made in Redis) are counted, not checked by seq.
_V2_EPOCH = "^[0-9]{13}$"


@dataclass
class _JetStream:
    """One feed's JetStream stream (`<FANOUT_JS_STREAM>_<feed>`) and the ingestor's consumer on it."""

    stream: str
    epoch: str | None = None  # creation time in ms; None when the stream does not exist
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0
    deleted: int = 0  # interior deletes: seqs of the range that hold nothing
    ack_floor: int = 0
    js: Any = None  # the JetStream context, to look messages up by seq


async def _jetstream(
    settings: AuditSettings, report: Report, stack: contextlib.AsyncExitStack
) -> dict[str, _JetStream]:
    import nats
    import nats.errors
    from nats.js.errors import NotFoundError

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
    out: dict[str, _JetStream] = {}
    for feed in FEED_NAMES:
        info = out[feed] = _JetStream(js_stream_name(settings.js_stream, feed))
        try:
            stream = await js.stream_info(info.stream)
        except NotFoundError:
            report.notes.append(
                f"JetStream stream {info.stream!r} does not exist: {feed} has nothing to reconcile"
            )
            continue
        except (nats.errors.Error, TimeoutError) as exc:  # timeout, no responders: no JetStream
            raise Unreachable("NATS JetStream", settings.nats_url, f"{type(exc).__name__} {exc}") from None
        if stream.created is not None:
            info.epoch = str(int(stream.created.timestamp() * 1000))
        state = stream.state
        info.first_seq, info.last_seq, info.messages = state.first_seq, state.last_seq, state.messages
        info.deleted = state.num_deleted or 0
        info.js = js
        try:
            consumer = await js.consumer_info(info.stream, settings.js_consumer)
            info.ack_floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        except NotFoundError:
            report.notes.append(
                f"JetStream consumer {settings.js_consumer!r} on {info.stream!r} does not exist: "
                "the ingestor has not run"
            )
    return out


async def _quiet(exc: Exception) -> None:
    """nats-py logs a traceback per failed attempt by default; the caller reports it once."""


def _str(v: bytes | str) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else v


class _Seqs:
    """A set of seqs within [lo, hi], one byte each (hot windows and retained JetStream
    ranges are dense)."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.bits = bytearray(max(0, hi - lo + 1))

    def add(self, seq: int) -> None:
        if self.lo <= seq <= self.hi:
            self.bits[seq - self.lo] = 1

    def __contains__(self, seq: int) -> bool:
        return self.lo <= seq <= self.hi and self.bits[seq - self.lo] == 1

    def count(self, lo: int, hi: int) -> int:
        """How many of lo..hi are in the set."""
        lo, hi = max(lo, self.lo), min(hi, self.hi)
        if lo > hi:
            return 0
        part = self.bits[lo - self.lo : hi - self.lo + 1]
        return len(part) - part.count(0)

    def absent(self, lo: int, hi: int) -> Iterator[int]:
        """The seqs of lo..hi (within the set's range) that are not in it, in order."""
        lo, hi = max(lo, self.lo), min(hi, self.hi)
        i, end = lo - self.lo, hi - self.lo + 1
        while i < end:
            i = self.bits.find(0, i, end)
            if i < 0:
                return
            yield self.lo + i
            i += 1


_EMPTY = _Seqs(1, 0)


@dataclass
class _Redis:
    """What one feed's Redis stream holds, checked."""

    epoch: str | None = None
    held: _Seqs = _EMPTY
    frontier: tuple[int, int] | None = None  # the archiver acked every entry below; None: no group


async def _xrange(redis: Any, key: str) -> AsyncIterator[list[tuple[str, dict[str, str]]]]:
    start = "-"
    while True:
        rows = await redis.xrange(key, min=start, max="+", count=_XRANGE_CHUNK)
        if not rows:
            return
        batch = [(_str(i), {_str(k): _str(v) for k, v in raw.items()}) for i, raw in rows]
        yield batch
        if len(rows) < _XRANGE_CHUNK:
            return
        start = "(" + batch[-1][0]


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
        frontier = id_key(last)
        frontier = (frontier[0], frontier[1] + 1)  # entries up to last-delivered were delivered
        if int(g.get("pending", 0)):
            summary = await redis.xpending(stream, group)
            low = summary.get("min")
            if low:
                frontier = min(frontier, id_key(_str(low)))
        return frontier
    return None


async def _redis_feed(redis: Any, keys: Keys, settings: AuditSettings, feed: str, audit: FeedAudit) -> _Redis:
    """Redis checks for one feed: entry ids `<seq>-0` contiguous, the seq field equal to
    the id, message ids `<epoch>.<seq>` of the meta hash's epoch."""
    meta = {_str(k): _str(v) for k, v in (await redis.hgetall(keys.meta(feed))).items()}
    stream = keys.stream(feed)
    out = _Redis(epoch=meta.get("epoch"))
    first: Any = await redis.xrange(stream, count=1)
    last: Any = await redis.xrevrange(stream, count=1)
    if not first:
        return out
    try:
        out.held = _Seqs(seq_of_entry_id(first[0][0]), seq_of_entry_id(last[0][0]))
    except ValueError:
        out.held = _EMPTY  # not contract v2 ids: every entry is named below
    if out.epoch is None:  # the meta hash was lost: the newest entry's message id names the epoch
        out.epoch = _str(last[0][1].get(b"message_id", b"")).rpartition(".")[0] or None
    gaps: list[str] = []
    odd: list[str] = []
    gap_total = odd_total = 0
    prev: int | None = None
    async for batch in _xrange(redis, stream):
        for entry_id, fields in batch:
            audit.redis += 1
            try:
                seq = seq_of_entry_id(entry_id)
            except ValueError:
                odd_total += 1
                if len(odd) < _NAMED:
                    odd.append(f"entry {entry_id}: its id is not <seq>-0")
                continue
            expected = f"{out.epoch}.{seq}"
            if fields.get("seq") != str(seq) or fields.get("message_id") != expected:
                odd_total += 1
                if len(odd) < _NAMED:
                    odd.append(
                        f"entry {entry_id}: seq {fields.get('seq')!r}, message id "
                        f"{fields.get('message_id')!r} (expected {expected!r})"
                    )
            if prev is not None and seq != prev + 1:
                gap_total += seq - prev - 1
                if len(gaps) < _NAMED:
                    gaps.append(f"seq {prev + 1}..{seq - 1}")
            out.held.add(seq)
            prev = seq
    audit.seq_gaps += gap_total
    audit.mismatches += odd_total
    audit.problem("seqs missing in the Redis stream", gaps, gap_total)
    audit.problem("Redis entries not at their position", odd, odd_total)
    if prev is not None and meta.get("seq") and int(meta["seq"]) != prev:
        audit.notes.append(f"Redis meta seq {meta['seq']} is not the last entry's seq {prev} (informational)")
    out.frontier = await _archiver_frontier(redis, stream, settings.archive_group)
    return out


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


async def _catalogued(pg: Any, settings: AuditSettings, feed: str, epoch: str, lo: int, hi: int) -> _Seqs:
    """The seqs lo..hi of one feed's epoch in the catalogue (feed table or dead_letter)."""
    out = _Seqs(lo, hi)
    if lo > hi:
        return out
    union = (
        f"SELECT seq FROM {_q(settings.db_schema, feed)} WHERE epoch = $1 AND seq BETWEEN $2 AND $3 UNION ALL"
        f" SELECT seq FROM {_q(settings.db_schema, 'dead_letter')} WHERE feed = $4 AND epoch = $1"
        " AND seq BETWEEN $2 AND $3"
    )
    async with pg.transaction():
        async for r in pg.cursor(union, epoch, lo, hi, feed, prefetch=10_000):
            out.add(int(r["seq"]))
    return out


async def _postgres_feed(
    pg: Any, settings: AuditSettings, feed: str, audit: FeedAudit, js: _JetStream, rds: _Redis
) -> None:
    """Every seq of an epoch exactly once across the feed's table and its dead letters,
    no seq missing; the seqs JetStream retains and Redis holds are accounted for."""
    table, dead = _q(settings.db_schema, feed), _q(settings.db_schema, "dead_letter")
    exists = await _table_exists(pg, settings.db_schema, feed) and await _table_exists(
        pg, settings.db_schema, "dead_letter"
    )
    gap_rows: list[Any] = []
    tops: dict[str, int] = {}
    if exists:
        audit.postgres = int(await pg.fetchval(f"SELECT count(*) FROM {table}"))
        audit.dead_letters = int(await pg.fetchval(f"SELECT count(*) FROM {dead} WHERE feed = $1", feed))
        union = (
            f"SELECT epoch, seq, message_id FROM {table} UNION ALL SELECT epoch, seq, message_id"
            f" FROM {dead} WHERE feed = $1 AND epoch IS NOT NULL AND seq IS NOT NULL"
        )
        # The same position twice: in the table and the dead letters, or two dead letters.
        rows = await pg.fetch(
            f"SELECT epoch, seq, array_agg(coalesce(message_id, '?') ORDER BY message_id) AS ids,"
            f" count(*) AS n FROM ({union}) u GROUP BY epoch, seq HAVING count(*) > 1 ORDER BY epoch, seq",
            feed,
        )
        total = sum(int(r["n"]) - 1 for r in rows)
        audit.duplicates += total
        audit.problem(
            "positions catalogued twice (feed table or dead letters)",
            [f"epoch {r['epoch']} seq {r['seq']} ({', '.join(r['ids'])})" for r in rows[:_NAMED]],
            total,
        )
        # Rows whose message id is not <epoch>.<seq>.
        odd = await pg.fetch(
            f"SELECT message_id, epoch, seq, count(*) OVER () AS n FROM {table}"
            f" WHERE epoch ~ '{_V2_EPOCH}' AND message_id <> epoch || '.' || seq LIMIT {_NAMED}"
        )
        if odd:
            audit.mismatches += int(odd[0]["n"])
            audit.problem(
                "rows whose message id is not <epoch>.<seq>",
                [f"{r['message_id']} at epoch {r['epoch']} seq {r['seq']}" for r in odd],
                int(odd[0]["n"]),
            )
        legacy = int(await pg.fetchval(f"SELECT count(*) FROM {table} WHERE epoch !~ '{_V2_EPOCH}'"))
        if legacy:
            audit.notes.append(f"{legacy} rows of the old layout (before contract v2) are not checked by seq")
        # Holes inside each epoch (an epoch starts at seq 1), and each epoch's top.
        gap_rows = await pg.fetch(
            f"SELECT epoch, prev + 1 AS lo, seq - 1 AS hi FROM (SELECT epoch, seq,"
            f" coalesce(lag(seq) OVER (PARTITION BY epoch ORDER BY seq), 0) AS prev"
            f" FROM ({union}) u WHERE epoch ~ '{_V2_EPOCH}') g WHERE seq > prev + 1 ORDER BY epoch, lo",
            feed,
        )
        tops = {
            r["epoch"]: int(r["top"])
            for r in await pg.fetch(
                f"SELECT epoch, max(seq) AS top FROM ({union}) u WHERE epoch ~ '{_V2_EPOCH}' GROUP BY epoch",
                feed,
            )
        }
    live = {e for e in (js.epoch, rds.epoch) if e}
    held_epoch = rds.epoch if rds.held.hi >= rds.held.lo else None
    # What PostgreSQL holds where JetStream retains and Redis holds, per live epoch.
    catalogued: dict[str, _Seqs] = {}
    for epoch in live:
        ranges = []
        if epoch == js.epoch and js.last_seq >= js.first_seq > 0:
            ranges.append((js.first_seq, js.last_seq))
        if epoch == held_epoch:
            ranges.append((rds.held.lo, rds.held.hi))
        lo = min((r[0] for r in ranges), default=1)
        hi = max((r[1] for r in ranges), default=0)
        catalogued[epoch] = await _catalogued(pg, settings, feed, epoch, lo, hi) if exists else _Seqs(lo, hi)
        # Seqs of a live epoch above everything PostgreSQL holds are a hole too (below
        # they are found by the gap query), unless Redis or JetStream accounts for them.
        top = tops.get(epoch, 0)
        if hi > top:
            gap_rows.append({"epoch": epoch, "lo": top + 1, "hi": hi})

    def accounted(epoch: str, lo: int, hi: int) -> int:
        """How many of lo..hi Redis or JetStream accounts for (checked below)."""
        n = 0
        js_lo, js_hi = (js.first_seq, js.last_seq) if epoch == js.epoch and js.first_seq > 0 else (1, 0)
        if max(lo, js_lo) <= min(hi, js_hi):
            n += min(hi, js_hi) - max(lo, js_lo) + 1
        if epoch == held_epoch:
            n += rds.held.count(lo, min(hi, js_lo - 1)) + rds.held.count(max(lo, js_hi + 1), hi)
        return n

    gaps: list[str] = []
    gap_total = 0
    for r in gap_rows:
        lo, hi = int(r["lo"]), int(r["hi"])
        lost = hi - lo + 1 - accounted(r["epoch"], lo, hi)
        if lost > 0:
            gap_total += lost
            if len(gaps) < _NAMED:
                gaps.append(f"epoch {r['epoch']} seq {lo}..{hi}")
    audit.seq_gaps += gap_total
    audit.problem("seqs in neither PostgreSQL, Redis nor JetStream", gaps, gap_total)

    # Redis entries: archived (acked by the archiver) ones must be catalogued.
    missing: list[str] = []
    missing_total = 0
    if held_epoch:
        pg_seqs = catalogued[held_epoch]
        for seq in (
            pg_seqs.absent(rds.held.lo, rds.held.hi) if exists else range(rds.held.lo, rds.held.hi + 1)
        ):
            if seq not in rds.held:
                continue
            if rds.frontier is None or (seq, 0) >= rds.frontier:
                audit.unarchived += 1
            else:
                missing_total += 1
                if len(missing) < _NAMED:
                    missing.append(f"{held_epoch}.{seq}")
    audit.missing += missing_total
    audit.problem("archived Redis entries without a row or dead letter", missing, missing_total)
    await _unaccounted(js, rds, catalogued, audit)


async def _unaccounted(js: _JetStream, rds: _Redis, catalogued: dict[str, _Seqs], audit: FeedAudit) -> None:
    """Retained JetStream messages neither in PostgreSQL nor in Redis: missing, or in
    flight if the ingestor has not acked them yet."""
    from nats.js.errors import NotFoundError

    if js.epoch is None or js.first_seq == 0 or js.last_seq < js.first_seq:
        return
    pg_seqs = catalogued[js.epoch]
    redis_seqs = rds.held if rds.epoch == js.epoch else _EMPTY
    named: list[str] = []
    total = looked = 0
    for seq in pg_seqs.absent(js.first_seq, js.last_seq):
        if seq in redis_seqs:
            continue
        if seq > js.ack_floor:
            audit.in_flight += 1
            continue
        if js.deleted and looked < _LOOKUPS:  # the range has holes: is this one of them?
            looked += 1
            try:
                await js.js.get_msg(js.stream, seq)
            except NotFoundError:
                continue
        total += 1
        if len(named) < _NAMED:
            named.append(f"{js.epoch}.{seq}")
    audit.missing += total
    audit.problem("JetStream messages in neither Redis nor PostgreSQL", named, total)


async def audit(settings: AuditSettings) -> Report:
    """Run every check once. Raises Unreachable when a server does not answer."""
    report = Report({f: FeedAudit(f) for f in FEED_NAMES})
    keys = Keys(settings.key_prefix)
    async with contextlib.AsyncExitStack() as stack:
        streams = await _jetstream(settings, report, stack)
        redis = redis_client(settings.redis_url)
        stack.push_async_callback(redis.aclose)
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            raise Unreachable("Redis", settings.redis_url, exc) from None
        pg = await _pg_connect(settings)
        stack.push_async_callback(pg.close)
        for feed in FEED_NAMES:
            a = report.feeds[feed]
            js = streams[feed]
            a.jetstream = js.messages
            rds = await _redis_feed(redis, keys, settings, feed, a)
            if js.epoch and rds.epoch and rds.epoch != js.epoch:
                a.notes.append(
                    f"Redis holds epoch {rds.epoch}, JetStream's stream is epoch {js.epoch} "
                    "(recreated; the ingestor starts the new epoch in Redis with its next message)"
                )
            await _postgres_feed(pg, settings, feed, a, js, rds)
        for a in report.feeds.values():
            report.notes += [f"{a.feed}: {n}" for n in a.notes]
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
    ("mismatches", "mismatches"),
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


def _duration_argument(text: str) -> float:
    """parse_duration for a plain flag, its error worded as every setting's."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--wait",
        type=_duration_argument,
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
        self.mismatches = Gauge(
            "fanout_audit_mismatches_total",
            "entries or rows not at their position (entry id, seq and message id disagree)",
            ["feed"],
            registry=reg,
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
            self.mismatches.labels(name).set(a.mismatches)
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
