"""Bytes per message in Redis: what the hot window costs.

Appends N realistic messages per feed (the simulator's generators, decoded by the
ingestor's codec, appended by the ingestor's own Lua script in batches of 1,000) to a
private redis-server, then reads `INFO memory` and `MEMORY USAGE`:

- per message in all: (used_memory after - before) / messages;
- the stream entry alone: MEMORY USAGE of the feed streams / messages;
- the dedup hashes (one per 128 seqs, a listpack): the rest (meta hashes are two small keys).

With these, Redis memory at steady state is rate x (entry x FANOUT_RETENTION-or-MAXLEN
window + dedup key x FANOUT_DEDUP_TTL); `bench.soak --redis-memory` shows it level off.

    .venv/bin/python -m bench.redis_memory [-n 200000] [--out bench/results/redis_memory.md]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from bench.harness import private_redis, run_and_report
from services.simulator.generator import Executions, SportEvents
from shared import codec, scripts
from shared.connections import redis_client
from shared.feeds import EXECUTION, FEED_NAMES, SPORT_EVENT, message_id
from shared.keys import Keys

BATCH = 1000
DEDUP_TTL_S = 900


@dataclass(frozen=True)
class Memory:
    messages: int
    total_bytes: int
    stream_bytes: int
    dedup_keys: int
    seconds: float

    @property
    def per_message(self) -> float:
        return self.total_bytes / self.messages

    @property
    def per_entry(self) -> float:
        return self.stream_bytes / self.messages

    @property
    def per_dedup_entry(self) -> float:
        """A message's share of the dedup hashes (and the two meta hashes)."""
        return (self.total_bytes - self.stream_bytes) / self.messages


async def measure(count: int) -> Memory:
    rng = random.Random(7)
    generators: dict[str, Executions | SportEvents] = {
        EXECUTION.name: Executions(rng),
        SPORT_EVENT.name: SportEvents(rng),
    }
    keys = Keys("fanout")
    epoch = str(int(time.time() * 1000))
    with private_redis() as (url, _proc):
        redis = redis_client(url)
        script = scripts.register(redis, "ingest_append")
        before = int((await redis.info("memory"))["used_memory"])
        started = time.perf_counter()
        for feed in FEED_NAMES:
            generator = generators[feed]
            for first in range(1, count + 1, BATCH):
                now = codec.iso_ms(datetime.now(UTC))
                messages = []
                for seq in range(first, min(count, first + BATCH - 1) + 1):
                    fields = codec.decode(codec.feed_of(feed), generator.message().SerializeToString())
                    mid = message_id(epoch, seq)
                    messages.append((seq, mid, codec.entry_fields(mid, fields, now, now)))
                call_keys, args = scripts.ingest_append_call(keys, feed, epoch, messages, DEDUP_TTL_S)
                await script(keys=call_keys, args=args)
        seconds = time.perf_counter() - started
        after = int((await redis.info("memory"))["used_memory"])
        stream_bytes = 0
        for feed in FEED_NAMES:
            stream_bytes += int(await redis.memory_usage(keys.stream(feed), samples=0) or 0)
        dedup_keys = int(await redis.dbsize()) - 2 * len(FEED_NAMES)
        await redis.aclose()
    return Memory(count * len(FEED_NAMES), after - before, stream_bytes, dedup_keys, seconds)


def markdown(m: Memory) -> str:
    return "\n".join(
        [
            f"Redis memory, {m.messages:,} messages ({m.messages // len(FEED_NAMES):,} per feed), "
            f"appended in {m.seconds:.1f} s by the ingestor's Lua script:",
            "",
            "| figure | bytes |",
            "|---|---:|",
            f"| per message, all keys | {m.per_message:.0f} |",
            f"| per stream entry | {m.per_entry:.0f} |",
            f"| per message in the dedup hashes ({m.dedup_keys:,} hashes of 128) | {m.per_dedup_entry:.0f} |",
            "",
            "Steady state = rate x (entry x hot window + dedup key x FANOUT_DEDUP_TTL); e.g. "
            f"2,000 msg/s with the defaults (15 min each): "
            f"{2000 * 900 * m.per_message / 1e6:,.0f} MB.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=100_000, help="messages per feed")
    p.add_argument("--out", default="bench/results/redis_memory.md", help="the table's file (- for none)")
    args = p.parse_args(argv)
    result = run_and_report("redis_memory", lambda: measure(args.n), markdown, args.out)
    return 0 if result is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
