"""Archiver throughput: fill the feed streams, then time one archiver storing them all.

    .venv/bin/python bench/archive.py                   # 200k entries, COPY
    .venv/bin/python bench/archive.py --entries 100000 --method unnest --batch 5000

Uses REDIS_URL / DATABASE_URL (default: the local servers) with a private key prefix
and schema, removed afterwards. Prints rows/s stored (commit + XACK included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from services.archiver.service import Archiver
from services.archiver.settings import ArchiverSettings
from services.archiver.store import APPLICATION_NAME, Store
from shared import codec
from shared.connections import redis_client
from shared.feeds import EXECUTION, FEED_NAMES
from shared.keys import Keys
from shared.scripts import ingest_append_call, register


def _fields(feed: str, i: int) -> dict[str, str]:
    if feed == EXECUTION.name:
        return {
            "symbol": f"SYM{i % 50}",
            "market": "NASDAQ",
            "price": codec.float32_text(100 + (i % 1000) / 8),
            "quantity": codec.float32_text(1 + i % 17),
            "executionEpoch": str(1_700_000_000_000 + i),
            "stateSymbol": "FILLED",
        }
    return {"sport": "TENNIS", "match_title": f"Match {i % 300}", "data_event": f"point {i}"}


async def fill(settings: ArchiverSettings, entries: int) -> None:
    redis = redis_client(settings.redis_url)
    keys = Keys(settings.key_prefix)
    script = register(redis, "ingest_append")
    start = datetime.now(UTC) - timedelta(minutes=5)
    per_feed = entries // len(FEED_NAMES)
    n = 0
    for feed in FEED_NAMES:
        for chunk in range(0, per_feed, 1000):
            messages = []
            for i in range(chunk, min(per_feed, chunk + 1000)):
                n += 1
                mid = f"1795000000000.{i + 1}"
                when = codec.iso_ms(start + timedelta(microseconds=n))
                messages.append((i + 1, mid, codec.entry_fields(mid, _fields(feed, i), when, when)))
            call_keys, argv = ingest_append_call(keys, feed, "1795000000000", messages, 3600)
            await script(keys=call_keys, args=argv)
    await redis.aclose()


async def cleanup(settings: ArchiverSettings) -> None:
    redis = redis_client(settings.redis_url)
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{settings.key_prefix}:*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            await redis.unlink(*batch)
            batch.clear()
    if batch:
        await redis.unlink(*batch)
    await redis.aclose()
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    await conn.close()


async def bench(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = ArchiverSettings.from_env(
        os.environ,
        key_prefix=f"bench:{tag}",
        db_schema=f"bench_{tag}",
        batch=args.batch,
        workers=args.workers,
        http=("127.0.0.1", 0),
        log_level="WARNING",
        trim_interval=3600.0,
    )
    try:
        t0 = time.perf_counter()
        await fill(settings, args.entries)
        total = args.entries // len(FEED_NAMES) * len(FEED_NAMES)
        print(f"filled {total} entries in {time.perf_counter() - t0:.1f}s")
        store = Store(
            settings.database_url, settings.db_schema, method=args.method, pool_size=2 * args.workers + 2
        )
        await store.open()  # migrate before the clock starts
        archiver = Archiver(settings, store=store)
        stop = asyncio.Event()
        task = asyncio.create_task(archiver.run(stop))
        await archiver.ready.wait()
        backends = await _backends(store)
        t0, cpu0 = time.perf_counter(), time.process_time()
        sched0: dict[object, list[int]] = {pid: _schedstat(pid) for pid in ["self", *backends]}
        while sum(archiver.counts(name).rows for name in FEED_NAMES) < total:
            if task.done():
                task.result()
                raise RuntimeError("the archiver stopped early")
            await asyncio.sleep(0.02)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        backends = await _backends(store)  # the pool grew during the run: new ones count from 0
        sched = {
            pid: [b - a for a, b in zip(sched0.get(pid, [0, 0]), _schedstat(pid), strict=True)]
            for pid in ["self", *backends]
        }
        stop.set()
        await task
        rate = total / elapsed
        print(
            f"archived {total} rows in {elapsed:.2f}s: {rate:,.0f} rows/s "
            f"(method={args.method}, batch={args.batch}, workers={args.workers}, 1 archiver; "
            f"archiver CPU {cpu / elapsed:.0%} of the time, {cpu / total * 1e6:.1f} us/row)"
        )
        # Where the time went, from /proc/<pid>/schedstat: CPU used, and time spent
        # runnable but waiting for a CPU (other processes on a shared machine).
        pg_cpu = sum(v[0] for pid, v in sched.items() if pid != "self") / 1e9
        pg_wait = sum(v[1] for pid, v in sched.items() if pid != "self") / 1e9
        own_cpu, own_wait = sched["self"][0] / 1e9, sched["self"][1] / 1e9
        print(
            f"  archiver process: {own_cpu:.2f}s CPU, {own_wait:.2f}s waiting for a CPU; "
            f"its {len(backends)} Postgres backends: {pg_cpu:.2f}s CPU, {pg_wait:.2f}s waiting for a CPU"
        )
        print(
            f"  CPU per row: archiver {own_cpu / total * 1e6:.1f} us"
            f" + Postgres {pg_cpu / total * 1e6:.1f} us;"
            f" on 2 idle cores the bound is ~{total / max(own_cpu, (own_cpu + pg_cpu) / 2):,.0f} rows/s"
        )
    finally:
        await cleanup(settings)


async def _backends(store: Store) -> list[int]:
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()"
    return [r["pid"] for r in await store.pool.fetch(sql, APPLICATION_NAME)]


def _schedstat(pid: object) -> list[int]:
    """[CPU ns, runqueue wait ns] of a process, from /proc/<pid>/schedstat."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            cpu, wait, _ = f.read().split()
        return [int(cpu), int(wait)]
    except OSError:
        return [0, 0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--entries", type=int, default=200_000, help="entries in all (split across the feeds)"
    )
    parser.add_argument("--batch", type=int, default=2000, help="FANOUT_ARCHIVE_BATCH")
    parser.add_argument("--workers", type=int, default=2, help="FANOUT_ARCHIVE_WORKERS")
    parser.add_argument("--method", choices=("copy", "staged", "unnest", "executemany"), default="copy")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
