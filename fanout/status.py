"""`fanout status`: the state of every feed across NATS, Redis and PostgreSQL.

Per feed (contract v2: positions come from the feed's JetStream stream):

- Redis: the epoch (meta hash), the first and last seq the stream holds (entry ids are
  `<seq>-0`), the meta's `first_seq` (where this Redis incarnation of the stream began:
  below it PostgreSQL serves), the length, and the archive lag (entries not yet archived
  and the age of the oldest by its broker_time);
- PostgreSQL: the rows of the feed's table, and of `dead_letter` per source;
- JetStream: the feed's stream `<FANOUT_JS_STREAM>_<feed>` (its epoch = creation time in
  ms, first and last seq) and the ingestor's consumer on it (pending, ack floor).

A server that does not answer is reported as unreachable (exit status 1); the others
are still shown. `--json` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared import codec
from shared.codec import parse_iso
from shared.connections import redis_client
from shared.feeds import DEAD_LETTER, FEED_NAMES, js_stream_name, seq_of_entry_id
from shared.keys import Keys
from shared.settings import Settings, nats_servers, setting

DESCRIPTION = __doc__
_TIMEOUT = 5.0


@dataclass(frozen=True)
class StatusSettings(Settings):
    js_consumer: str = setting("FANOUT_JS_CONSUMER", "ingestor", "the ingestor's durable JetStream consumer")
    archive_group: str = setting("FANOUT_ARCHIVE_GROUP", "archiver", "the archiver's Redis consumer group")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    StatusSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = StatusSettings.from_args(args)
    report = asyncio.run(collect(settings))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if report["unreachable"] else 0


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def collect(settings: StatusSettings) -> dict[str, Any]:
    """Everything `fanout status` shows, as a JSON-ready dict."""
    report: dict[str, Any] = {
        "feeds": {name: {} for name in FEED_NAMES},
        "dead_letters": {},
        "jetstream": {},
        "unreachable": {},
    }
    results = await asyncio.gather(
        _redis(settings, report), _postgres(settings, report), _nats(settings, report), return_exceptions=True
    )
    for server, result in zip(("redis", "postgres", "nats"), results, strict=True):
        if isinstance(result, BaseException):
            report["unreachable"][server] = _reason(result)
    return report


def _seq(entry_id: str | None) -> int | None:
    """The seq of an entry id `<seq>-0`; None for none, or an id of the old layout."""
    try:
        return None if entry_id is None else seq_of_entry_id(entry_id)
    except ValueError:
        return None


def _broker_time(fields: Any) -> float | None:
    raw = (fields or {}).get(b"broker_time")
    try:
        return parse_iso(codec.text(raw)).timestamp() if raw is not None else None
    except ValueError:
        return None


async def _stream(client: Redis, keys: Keys, name: str, group: str, now: float) -> dict[str, Any]:
    """One feed's stream, read from Redis directly (XINFO GROUPS gives the group's pending
    and undelivered counts; the oldest unarchived entry gives the lag in seconds)."""
    stream = keys.stream(name)
    async with client.pipeline(transaction=True) as pipe:
        pipe.xlen(stream)
        pipe.xrange(stream, "-", "+", count=1)
        pipe.xrevrange(stream, "+", "-", count=1)
        pipe.hgetall(keys.meta(name))
        pipe.xinfo_groups(stream)
        pipe.xpending(stream, group)
        length, first, last, meta_raw, groups, pending = await pipe.execute(raise_on_error=False)
    for reply in (length, first, last, meta_raw):
        if isinstance(reply, Exception):
            raise reply
    meta = {codec.text(k): codec.text(v) for k, v in meta_raw.items()}
    first_id = codec.text(first[0][0]) if first else None
    info = (
        None
        if isinstance(groups, Exception)
        else next((g for g in groups if codec.text(g["name"]) == group), None)
    )
    out: dict[str, Any] = {
        "stream": stream,
        "length": int(length),
        "epoch": meta.get("epoch"),
        "first_seq": _seq(first_id),
        "last_seq": _seq(codec.text(last[0][0]) if last else None),
        "meta_first_seq": int(meta["first_seq"]) if "first_seq" in meta else None,
        "meta_seq": int(meta["seq"]) if "seq" in meta else None,
        "archive_group": info is not None,
    }
    oldest: str | None
    if info is None or isinstance(pending, Exception):
        out["archive_lag_entries"] = int(length)
        oldest = first_id
    else:
        undelivered = info.get("lag")
        waiting = int(pending["pending"])
        out["archive_lag_entries"] = waiting + int(undelivered or 0)
        oldest = codec.text(pending["min"]) if waiting and pending["min"] is not None else None
        if oldest is None and (undelivered is None or int(undelivered) > 0):
            after = await client.xrange(stream, f"({codec.text(info['last-delivered-id'])}", "+", count=1)
            oldest = codec.text(after[0][0]) if after else None
    lag_seconds = 0.0
    if oldest is not None:
        entry = first if oldest == first_id else await client.xrange(stream, oldest, "+", count=1)
        when = _broker_time(entry[0][1]) if entry else None
        lag_seconds = max(0.0, now - when) if when is not None else 0.0
    out["archive_lag_seconds"] = round(lag_seconds, 3)
    return out


async def _redis(settings: StatusSettings, report: dict[str, Any]) -> None:
    keys = Keys(settings.key_prefix)
    client = redis_client(settings.redis_url)
    try:
        async with asyncio.timeout(_TIMEOUT):
            now = time.time()
            for name in FEED_NAMES:
                report["feeds"][name].update(await _stream(client, keys, name, settings.archive_group, now))
            # Contract v1's separate dead-letter stream, retired: shown only while it exists.
            legacy = keys.stream(DEAD_LETTER)
            if await client.exists(legacy):
                report["dead_letters"]["legacy_stream"] = {
                    "stream": legacy,
                    "length": int(await client.xlen(legacy)),
                }
    finally:
        await client.aclose()


async def _postgres(settings: StatusSettings, report: dict[str, Any]) -> None:
    import asyncpg

    schema = '"' + settings.db_schema.replace('"', '""') + '"'
    conn = await asyncpg.connect(settings.database_url, timeout=_TIMEOUT)
    try:
        async with asyncio.timeout(_TIMEOUT * 2):
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.dead_letter")
            if not exists:
                report["catalogue"] = (
                    f"no catalogue in schema {settings.db_schema!r} yet (the archiver creates it)"
                )
                return
            for name in FEED_NAMES:
                report["feeds"][name]["rows"] = int(
                    await conn.fetchval(f"SELECT count(*) FROM {schema}.{name}")
                )
            by_source = await conn.fetch(
                f"SELECT source, count(*) AS n FROM {schema}.dead_letter GROUP BY source"
            )
            report["dead_letters"]["rows"] = {r["source"]: int(r["n"]) for r in by_source}
    finally:
        await conn.close()


async def _nats(settings: StatusSettings, report: dict[str, Any]) -> None:
    import nats
    from nats.js.errors import NotFoundError

    async def _quiet(exc: Exception) -> None:  # the failure is reported once, below the table
        return None

    nc = await nats.connect(
        servers=nats_servers(settings.nats_url),
        connect_timeout=_TIMEOUT,
        allow_reconnect=False,
        max_reconnect_attempts=1,  # 0 means "forever" in nats-py's server selection
        reconnect_time_wait=0.2,
        error_cb=_quiet,
    )
    try:
        js = nc.jetstream(timeout=_TIMEOUT)
        for feed in FEED_NAMES:
            name = js_stream_name(settings.js_stream, feed)
            info: dict[str, Any] = {"stream": name}
            report["jetstream"][feed] = info
            try:
                stream = await js.stream_info(name)
            except NotFoundError:
                info["error"] = "stream not found (the ingestor creates it)"
                continue
            created = stream.created
            info.update(
                epoch=str(int(created.timestamp() * 1000)) if created is not None else None,
                messages=stream.state.messages,
                first_seq=stream.state.first_seq,
                last_seq=stream.state.last_seq,
            )
            try:
                consumer = await js.consumer_info(name, settings.js_consumer)
            except NotFoundError:
                info["consumer"] = {"name": settings.js_consumer, "error": "consumer not found"}
                continue
            info["consumer"] = {
                "name": settings.js_consumer,
                "pending": consumer.num_pending,
                "ack_pending": consumer.num_ack_pending,
                "ack_floor": consumer.ack_floor.stream_seq if consumer.ack_floor else None,
            }
        try:
            legacy = await js.stream_info(settings.js_stream)
        except NotFoundError:
            return
        report["jetstream"]["legacy"] = {
            "stream": settings.js_stream,
            "subjects": list(legacy.config.subjects or []),
            "messages": legacy.state.messages,
        }
    finally:
        await nc.close()


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _seqs(first: Any, last: Any) -> str:
    return "-" if first is None or last is None else f"{first}..{last}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    table: list[tuple[str, ...]] = [
        (
            "feed",
            "epoch",
            "redis seqs",
            "first_seq",
            "length",
            "archive lag",
            "rows",
            "jetstream seqs",
            "ingestor",
        )
    ]
    for name, feed in report["feeds"].items():
        lag = "-"
        if "archive_lag_entries" in feed:
            lag = f"{feed['archive_lag_entries']} ({_age(feed['archive_lag_seconds'])})"
            if not feed["archive_group"]:
                lag += " no archiver yet"
        js = report["jetstream"].get(name) or {}
        consumer = js.get("consumer") or {}
        ingestor = "-"
        if "error" in consumer:
            ingestor = consumer["error"]
        elif consumer:
            ingestor = f"{consumer['pending']} pending, ack floor {consumer['ack_floor']}"
        epoch = _cell(feed.get("epoch"))
        if js.get("epoch") and js["epoch"] != feed.get("epoch"):
            epoch += f" (jetstream {js['epoch']})"
        table.append(
            (
                name,
                epoch,
                _seqs(feed.get("first_seq"), feed.get("last_seq")),
                _cell(feed.get("meta_first_seq")),
                _cell(feed.get("length")),
                lag,
                _cell(feed.get("rows")),
                js.get("error") or _seqs(js.get("first_seq"), js.get("last_seq")),
                ingestor,
            )
        )
    lines += _table(table)

    dead = report["dead_letters"]
    lines.append("")
    if "rows" in dead:
        rows = dead["rows"]
        detail = ", ".join(f"{k} {v}" for k, v in sorted(rows.items()))
        lines.append(f"dead letters: {sum(rows.values())} rows" + (f" ({detail})" if detail else ""))
    else:
        lines.append("dead letters: -")
    if "legacy_stream" in dead:
        old = dead["legacy_stream"]
        lines.append(
            f"retired dead-letter stream {old['stream']} still holds {old['length']} entries "
            "(contract v1; not archived any more)"
        )
    legacy = report["jetstream"].get("legacy")
    if legacy:
        lines.append(
            f"legacy jetstream stream {legacy['stream']}: {legacy['messages']} messages, "
            f"subjects {', '.join(legacy['subjects'])}"
        )
    if "catalogue" in report:
        lines.append(f"postgres: {report['catalogue']}")
    for server, reason in report["unreachable"].items():
        lines.append(f"{server}: unreachable ({reason})")
    return "\n".join(lines)


if __name__ == "__main__":
    from fanout.cli import main

    sys.exit(main(["status", *sys.argv[1:]]))
