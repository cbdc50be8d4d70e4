"""`fanout status`: the state of every feed across NATS, Redis and PostgreSQL.

Per feed: the Redis stream's length, first and last entry, the last seq and epoch (the
meta hash), the archive lag (entries not yet archived and the age of the oldest), and
the rows in PostgreSQL; the dead letters (stream length and table rows); the JetStream
stream's message count and the ingestor consumer's pending count and ack floor.

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

from services.archiver.progress import read_progress
from shared.connections import redis_client
from shared.feeds import DEAD_LETTER, FEED_NAMES
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def collect(settings: StatusSettings) -> dict[str, Any]:
    """Everything `fanout status` shows, as a JSON-ready dict."""
    report: dict[str, Any] = {
        "feeds": {name: {} for name in FEED_NAMES},
        "dead_letters": {},
        "jetstream": None,
        "unreachable": {},
    }
    results = await asyncio.gather(
        _redis(settings, report), _postgres(settings, report), _nats(settings, report), return_exceptions=True
    )
    for server, result in zip(("redis", "postgres", "nats"), results, strict=True):
        if isinstance(result, BaseException):
            report["unreachable"][server] = _reason(result)
    return report


async def _redis(settings: StatusSettings, report: dict[str, Any]) -> None:
    keys = Keys(settings.key_prefix)
    client = redis_client(settings.redis_url)
    try:
        async with asyncio.timeout(_TIMEOUT):
            now = time.time()
            for name in (*FEED_NAMES, DEAD_LETTER):
                progress = await read_progress(client, keys.stream(name), settings.archive_group)
                meta = {_text(k): _text(v) for k, v in (await client.hgetall(keys.meta(name))).items()}
                stream = {
                    "stream": keys.stream(name),
                    "length": progress.length,
                    "first_id": progress.first_id,
                    "last_id": progress.last_id,
                    "last_seq": int(meta["seq"]) if "seq" in meta else None,
                    "epoch": meta.get("epoch"),
                    "archive_group": progress.group_exists,
                    "archive_lag_entries": progress.lag_entries,
                    "archive_lag_seconds": round(progress.lag_seconds(now), 3),
                    "archived_below": progress.archived_below if progress.group_exists else None,
                }
                if name == DEAD_LETTER:
                    report["dead_letters"].update(stream)
                else:
                    report["feeds"][name].update(stream)
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
        info: dict[str, Any] = {"stream": settings.js_stream}
        report["jetstream"] = info
        try:
            stream = await js.stream_info(settings.js_stream)
        except NotFoundError:
            info["error"] = "stream not found (the ingestor creates it)"
            return
        info.update(
            messages=stream.state.messages, first_seq=stream.state.first_seq, last_seq=stream.state.last_seq
        )
        try:
            consumer = await js.consumer_info(settings.js_stream, settings.js_consumer)
        except NotFoundError:
            info["consumer"] = {"name": settings.js_consumer, "error": "consumer not found"}
            return
        info["consumer"] = {
            "name": settings.js_consumer,
            "pending": consumer.num_pending,
            "ack_pending": consumer.num_ack_pending,
            "ack_floor": consumer.ack_floor.stream_seq if consumer.ack_floor else None,
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


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    header = ("feed", "length", "first id", "last id", "last seq", "epoch", "archive lag", "rows")
    table = [header]
    for name, feed in report["feeds"].items():
        lag = "-"
        if "archive_lag_entries" in feed:
            lag = f"{feed['archive_lag_entries']} ({_age(feed['archive_lag_seconds'])})"
            if not feed["archive_group"]:
                lag += " no archiver yet"
        table.append(
            (
                name,
                _cell(feed.get("length")),
                _cell(feed.get("first_id")),
                _cell(feed.get("last_id")),
                _cell(feed.get("last_seq")),
                _cell(feed.get("epoch")),
                lag,
                _cell(feed.get("rows")),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]

    dead = report["dead_letters"]
    parts = []
    if "length" in dead:
        parts.append(f"stream {dead['length']} entries, archive lag {dead['archive_lag_entries']}")
    if "rows" in dead:
        rows = dead["rows"]
        detail = ", ".join(f"{k} {v}" for k, v in sorted(rows.items()))
        parts.append(f"table {sum(rows.values())} rows" + (f" ({detail})" if detail else ""))
    lines.append("")
    lines.append("dead letters: " + ("; ".join(parts) if parts else "-"))

    js = report["jetstream"]
    if js is not None:
        if "error" in js:
            lines.append(f"jetstream {js['stream']}: {js['error']}")
        else:
            seqs = f"seq {js['first_seq']}..{js['last_seq']}"
            line = f"jetstream {js['stream']}: {js['messages']} messages ({seqs})"
            consumer = js.get("consumer")
            if consumer and "error" in consumer:
                line += f"; consumer {consumer['name']}: {consumer['error']}"
            elif consumer:
                line += (
                    f"; consumer {consumer['name']}: {consumer['pending']} pending, "
                    f"{consumer['ack_pending']} awaiting ack, ack floor {consumer['ack_floor']}"
                )
            lines.append(line)
    if "catalogue" in report:
        lines.append(f"postgres: {report['catalogue']}")
    for server, reason in report["unreachable"].items():
        lines.append(f"{server}: unreachable ({reason})")
    return "\n".join(lines)


if __name__ == "__main__":
    from fanout.cli import main

    sys.exit(main(["status", *sys.argv[1:]]))
