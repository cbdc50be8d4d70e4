"""Any Redis loss is invisible to SSE subscribers (contract v2, issue 9).

One private pipeline under load (`FANOUT_FAULTS_LOSS_RATE`, default 150 msg/s per feed)
with trimming ON (a few seconds of hot window, a small maxlen), a Redis primary and a
replica (fed through a link that can be stalled), and SSE subscribers connected
throughout: fast ones, a slow one, two that drop and resume with their last id every few
seconds, and a wanderer that is away across each fault until Redis has trimmed past it,
so it catches up from rows the archiver wrote while servers failed. The faults, in order:

- SIGKILL of Redis with AOF `everysec` (the last second of writes may be lost), of NATS,
  of PostgreSQL (postmaster and backends at once);
- keys evicted under `maxmemory` with `allkeys-lru`: the limit is lowered until stream,
  meta and dedup keys have been evicted (seen through keyspace notifications), then lifted;
- a failover that loses more entries per feed than any read batch: the replica's link is
  stalled ~12 s, the primary SIGKILLed, what the link held dropped, the replica promoted
  (REPLICAOF NO ONE) and the services' endpoint moved to it. The endpoint is a TCP proxy,
  as a managed Redis's DNS name or virtual IP: the services are not restarted, so the
  connected subscribers and the gateway's shared reader live through the failover (the
  case that stalled every subscriber for good in issue 9);
- Redis replaced by an empty one under load (SIGKILL, data folder wiped, restart), and
  again while PostgreSQL is down (the archivers behind, the catalogue unreadable).

Right after the promotion and after the empty restart, the reconnecting subscribers
resume with cursors ahead of what Redis then holds: never a 4xx/5xx (after which an
EventSource stops for good), they wait for the refill.

Every subscriber must receive, per feed, every seq from 1 to the end exactly once and in
order (malformed payloads as `event: malformed` at their seq), with no `gap` or `reset`;
PostgreSQL holds each (epoch, seq) exactly once; `fanout audit` exits 0. The report
(results/redis_loss_<mode>.md) gives each fault's recovery and the live latency during it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import pytest

from tests.faults.driver import Fault, Run, Setup, run, together
from tests.faults.harness import KEY_PREFIX, HarnessError, redis_tops, until
from tests.faults.test_faults import faults as service_faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

RETENTION = 3.0  # seconds of hot window (FANOUT_RETENTION)
MAXLEN = 300  # FANOUT_STREAM_MAXLEN
READER_BATCH = 1000  # FANOUT_READER_BATCH: a failover must lose more than this per feed
CATCHUP_BATCH = 500  # FANOUT_CATCHUP_BATCH


async def sigkill_redis(r: Run) -> str:
    before = await asyncio.to_thread(redis_tops, r.p.redis)
    await asyncio.to_thread(r.p.redis.kill)
    await asyncio.to_thread(r.p.redis.start)  # replays its AOF (fsynced every second)
    after = await asyncio.to_thread(redis_tops, r.p.redis)  # the replica resyncs in the background
    return f"AOF everysec: tops before the kill {before}, as it came back {after}"


async def sigkill_nats(r: Run) -> str:
    await asyncio.to_thread(r.p.nats.kill)
    await asyncio.to_thread(r.p.nats.start)
    return ""


async def sigkill_postgres(r: Run) -> str:
    await asyncio.to_thread(r.p.postgres.kill)
    await asyncio.to_thread(r.p.postgres.start)  # crash recovery
    return ""


def _kind(key: str) -> str:
    if key.endswith(":stream"):
        return "stream"
    if key.endswith(":meta"):
        return "meta"
    if key.startswith(f"{KEY_PREFIX}:{{"):
        return "dedup"  # the dedup keys or blocks live under the feed's hash tag too
    return "other"


async def evict(r: Run) -> str:
    """Lower maxmemory (allkeys-lru) step by step until stream, meta and dedup keys have
    been evicted while the pipeline runs, then lift the limit."""
    from redis.asyncio import Redis

    server = r.p.redis
    await asyncio.to_thread(server.call, "CONFIG", "SET", "notify-keyspace-events", "Ee")
    await asyncio.to_thread(server.call, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    client: Any = Redis.from_url(server.url)
    pubsub = client.pubsub()
    await pubsub.subscribe("__keyevent@0__:evicted")
    evicted: dict[str, int] = {}
    wanted = {"stream", "meta", "dedup"}

    async def listen() -> None:
        async for m in pubsub.listen():
            if m["type"] == "message":
                kind = _kind(m["data"].decode())
                evicted[kind] = evicted.get(kind, 0) + 1
                if wanted <= evicted.keys():
                    return

    listening = asyncio.create_task(listen())
    limit = 0
    try:
        for fraction in (0.5, 0.25, 0.1, 0.05, 0.02, 0.01):
            mem = await asyncio.to_thread(server.info, "memory")
            used = int(mem["used_memory"]) - int(mem.get("mem_not_counted_for_evict", "0"))
            dataset = int(mem["used_memory_dataset"])
            limit = max(used - dataset + int(dataset * fraction), 1024 * 1024)
            await asyncio.to_thread(server.call, "CONFIG", "SET", "maxmemory", limit)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(listening), 3.0)  # evictions come with writes
            if listening.done():
                break
        hold = float(os.environ.get("FANOUT_FAULTS_EVICT_HOLD", "2"))
        await asyncio.sleep(hold)  # keep the pressure on for a moment: the fault itself
    finally:
        await asyncio.to_thread(server.call, "CONFIG", "SET", "maxmemory", 0)
        listening.cancel()
        with contextlib.suppress(BaseException):
            await listening
        with contextlib.suppress(Exception):
            await pubsub.aclose()
        await client.aclose()
    missing = wanted - evicted.keys()
    if missing:
        r.problems.append(f"evict: no {sorted(missing)} key was evicted (evicted: {evicted}); the scenario "
                          "did not test what it claims")
    return f"evicted {evicted} down to maxmemory {limit // 1024} KiB"


async def failover(r: Run) -> str:
    """The replica stops receiving for `stall` s (longer, up to 30 s more, until it misses more
    than a read batch per feed), the primary dies, the replica is promoted."""
    p = r.p
    assert p.link is not None and p.standby is not None
    stall = float(os.environ.get("FANOUT_FAULTS_FAILOVER_STALL", "12"))
    await p.replica_in_sync()
    p.link.stall()
    started = time.monotonic()
    await asyncio.sleep(stall)  # how long the replica misses writes is the fault
    standby = p.standby

    async def lost_enough() -> bool:  # on a slow machine the publisher may fall behind its rate
        ahead = await asyncio.to_thread(redis_tops, p.redis)
        behind = await asyncio.to_thread(redis_tops, standby)
        return min(ahead[f] - behind[f] for f in ahead) > READER_BATCH + 100

    with contextlib.suppress(HarnessError):
        await until("the replica to miss more than a read batch", lost_enough, 30.0, every=0.5)
    stall = time.monotonic() - started
    primary_tops = await asyncio.to_thread(redis_tops, p.redis)
    await asyncio.to_thread(p.redis.kill)
    p.link.cut()  # what the link held never reaches the replica
    replica_tops = await asyncio.to_thread(redis_tops, p.standby)
    await p.failover()
    r.reconnect_now()  # cursors ahead of the promoted replica's top: never a 400, they wait
    lost = {f: primary_tops[f] - replica_tops[f] for f in primary_tops}
    if min(lost.values()) <= READER_BATCH:
        r.problems.append(f"failover: the replica lost only {lost} entries, not more than a read batch "
                          f"({READER_BATCH}) per feed: raise the rate or FANOUT_FAULTS_FAILOVER_STALL")
    await p.restore_replica()  # the old primary comes back as the new one's replica
    return f"link stalled {stall:.1f}s; the promoted replica lacked {lost} entries (at least)"


async def empty_redis(r: Run) -> str:
    await asyncio.to_thread(r.p.redis.kill)
    await asyncio.to_thread(r.p.redis.wipe)
    await asyncio.to_thread(r.p.redis.start)
    r.reconnect_now()  # cursors ahead of an empty Redis: never a 400, they wait for the refill
    return "restarted without its data"


async def empty_redis_while_postgres_is_down(r: Run) -> str:
    """Redis comes back empty while the catalogue cannot be read and the archivers are
    behind: the rebuild cannot start from the first unarchived seq, yet nothing may show."""
    await asyncio.to_thread(r.p.postgres.kill)
    await asyncio.sleep(2.0)  # the archivers fall behind: the fault itself
    note = await empty_redis(r)
    await asyncio.sleep(2.0)  # Redis refills while PostgreSQL is still down
    await asyncio.to_thread(r.p.postgres.start)
    return note + " while PostgreSQL was down (SIGKILL)"


FAULTS: dict[str, Fault] = {
    "SIGKILL Redis": sigkill_redis,
    "SIGKILL NATS": sigkill_nats,
    "SIGKILL PostgreSQL": sigkill_postgres,
    "evict under maxmemory": evict,
    "failover": failover,
    "empty Redis": empty_redis,
    "empty Redis while PostgreSQL is down": empty_redis_while_postgres_is_down,
}


def caught_up_from_postgres(r: Run) -> list[str]:
    """Trimming ON must make wanderers catch up from PostgreSQL at least once."""
    if not any(rec.from_postgres for rec in r.records):
        return ["no subscriber came back below Redis's first entry: trimming did not make anyone catch up "
                "from PostgreSQL"]
    return []


def soak_faults() -> dict[str, Fault]:
    """The soak adds service crashes, alone and in the middle of a refill."""
    kill = {k: v for k, v in service_faults(6.0).items() if k.startswith("SIGKILL")}
    return {
        **FAULTS,
        **kill,
        "empty Redis + SIGKILL ingestor": together([empty_redis, kill["SIGKILL ingestor"]]),
        "failover + SIGKILL gateway": together([failover, kill["SIGKILL gateway"]]),
        "SIGKILL Redis + SIGKILL archiver": together([sigkill_redis, kill["SIGKILL archiver"]]),
        "empty Redis + SIGKILL NATS": together([empty_redis, sigkill_nats]),
    }


async def test_any_redis_loss_is_invisible_to_subscribers(soak: bool) -> None:
    rate = float(os.environ.get("FANOUT_FAULTS_LOSS_RATE", "150"))
    setup = Setup(
        name="redis_loss",
        mode="soak" if soak else "short",
        rate=rate,
        subscribers=8,
        slow=1,
        reconnecting=2,
        wanderers=1,
        replica=True,
        env={
            "FANOUT_RETENTION": f"{RETENTION:g}s",
            "FANOUT_STREAM_MAXLEN": str(MAXLEN),
            "FANOUT_ARCHIVE_TRIM_INTERVAL": "1s",
            "FANOUT_READER_BATCH": str(READER_BATCH),
            "FANOUT_CATCHUP_BATCH": str(CATCHUP_BATCH),
        },
        away_after_heal=RETENTION + 2.0,
        recovery_timeout=180.0 if soak else 90.0,
        random_seconds=float(os.environ.get("FANOUT_FAULTS_SOAK_SECONDS", "600")) if soak else 0.0,
    )
    await run(setup, soak_faults() if soak else FAULTS, check=caught_up_from_postgres)
