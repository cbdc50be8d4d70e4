"""The whole pipeline under faults: nothing lost, nothing repeated, every subscriber exact.

Private NATS (JetStream, file store), Redis (AOF) and PostgreSQL on free ports; the
harness's publisher at a steady rate (with a share of malformed payloads) keeping its own
record of what NATS accepted; the ingestor, two archivers, the gateway and 20 SSE
subscribers (a quarter of them slow, two resuming with their last id every few seconds).
Faults are injected one at a time, each followed by the time until the whole chain has
caught up again (the recovery time), then at random (sometimes two at once). At the end,
judged against JetStream's per-feed streams joined with the publisher's record: every
seq of each feed is in PostgreSQL exactly once (a row, or a dead letter if malformed),
every subscriber got every seq of its feeds from 1 to the end exactly once, in order, with
no `gap` or `reset`, `fanout audit` exits 0, and every service stops with exit 0 on
SIGTERM. The table is printed and written to tests/faults/results/faults_<mode>.md (not
tracked; the published runs are bench/results/faults_short.md and faults_soak.md).

The Redis-loss scenarios of contract v2 (failover, empty Redis, eviction, SIGKILLs,
trimming ON) are in test_redis_loss.py.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from fanout.servers import Server
from tests.faults.driver import Fault, Run, Setup, run
from tests.faults.harness import Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def faults(pause_seconds: float) -> dict[str, Fault]:
    async def kill_service(r: Run, name: str) -> str:
        service: Service = r.p.services[name]
        service.kill()
        await asyncio.sleep(1.0)  # down for a second: the fault itself, not synchronisation
        service.start()
        await service.ready()
        return ""

    async def pause(server: Server) -> str:
        server.pause()
        try:
            await asyncio.sleep(pause_seconds)  # the length of the hang is the fault
        finally:
            server.resume()
        return f"paused {pause_seconds:g}s"

    async def restart(server: Server) -> str:
        await asyncio.to_thread(server.restart)
        return ""

    def archiver(r: Run) -> str:
        return random.choice([n for n in r.p.services if n.startswith("archiver")])

    return {
        "SIGKILL ingestor": lambda r: kill_service(r, "ingestor"),
        "SIGKILL archiver": lambda r: kill_service(r, archiver(r)),
        "SIGKILL gateway": lambda r: kill_service(r, "gateway"),
        "restart Redis": lambda r: restart(r.p.redis),
        "restart NATS": lambda r: restart(r.p.nats),
        "restart Postgres": lambda r: restart(r.p.postgres),
        "pause Redis": lambda r: pause(r.p.redis),
        "pause Postgres": lambda r: pause(r.p.postgres),
    }


async def test_the_pipeline_loses_and_repeats_nothing_under_faults(soak: bool) -> None:
    seed = int(os.environ.get("FANOUT_FAULTS_SEED", "6"))
    random.seed(seed)
    setup = Setup(
        name="faults",
        mode="soak" if soak else "short",
        rate=float(os.environ.get("FANOUT_FAULTS_RATE", "200" if soak else "50")),
        subscribers=20,
        slow=5,
        reconnecting=2,
        wanderers=0,
        recovery_timeout=180.0 if soak else 90.0,
        random_faults=0 if soak else int(os.environ.get("FANOUT_FAULTS_RANDOM", "2")),
        random_seconds=float(os.environ.get("FANOUT_FAULTS_SOAK_SECONDS", "600")) if soak else 0.0,
        pairs=True,
        seed=seed,
    )
    # soak: pauses longer than every client timeout (30 s)
    await run(setup, faults(35.0 if soak else 6.0))
