"""Ingestor drain rate: JetStream prefilled with N messages of both feeds -> Redis streams.

    .venv/bin/python -m bench.ingest              # 200k messages, the local NATS and Redis
    .venv/bin/python -m bench.ingest -n 50000 --batch 500

Prefills fresh JetStream streams (one per feed, with their own names, subjects and Redis
key prefix, removed afterwards) with core publishes, then measures, on the same streams,
one after another:

1. `fanout ingest` as its own process (the real thing: decode, Lua append, ack), from
   its first appended entry to the last;
2. nats-py's plain `fetch(batch)` + `msg.ack()` loop on a second durable consumer per
   feed, the two feeds side by side (NATS only, no Redis): the client-bound reference;
3. the ingestor's lean pull loop with acks but no Redis, on a third consumer per feed.

Prints msgs/s for each and their ratios. Figures are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig
from redis.asyncio import Redis

from services.ingestor import jetstream
from services.ingestor.consumer import PullLoop
from services.ingestor.settings import IngestorSettings
from shared.connections import redis_client
from shared.feeds import FEED_NAMES, js_stream_name
from shared.keys import Keys
from shared.proto import event_pb2, execution_pb2

ROOT = Path(__file__).resolve().parents[1]


def payloads(count: int = 512) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        if i % 2:
            msg = execution_pb2.execution(
                symbol=f"SYM{i % 50}",
                market="NASDAQ",
                price=100 + i / 8,
                quantity=1 + i % 9,
                executionEpoch=1764321212345 + i,
                stateSymbol="CA",
            )
            out.append(("execution", msg.SerializeToString()))
        else:
            ev = event_pb2.event(
                sport=1 + i % 7,
                match_title=f"Team {i % 30} vs Team {i % 17}",
                data_event=f"point scored at minute {i % 90}",
            )
            out.append(("sport_event", ev.SerializeToString()))
    return out


async def prefill(nc: NATS, settings: IngestorSettings, n: int) -> float:
    variants = payloads()
    started = time.perf_counter()
    for i in range(n):
        feed, data = variants[i % len(variants)]
        await nc.publish(settings.subject(feed), data)
        if i % 2000 == 1999:
            await nc.flush()
    await nc.flush()
    while await _stored(nc, settings) < n:  # noqa: ASYNC110 (no event for it)
        await asyncio.sleep(0.05)
    return n / (time.perf_counter() - started)


async def _stored(nc: NATS, settings: IngestorSettings) -> int:
    js = nc.jetstream()
    return sum([(await js.stream_info(_stream(settings, feed))).state.messages for feed in FEED_NAMES])


def _stream(settings: IngestorSettings, feed: str) -> str:
    return js_stream_name(settings.js_stream, feed)


async def run_ingestor(settings: IngestorSettings, redis: Redis, n: int) -> float:
    keys = Keys(settings.key_prefix)
    streams = [keys.stream("execution"), keys.stream("sport_event")]
    env = dict(os.environ)
    env.update(
        NATS_URL=settings.nats_url,
        REDIS_URL=settings.redis_url,
        FANOUT_KEY_PREFIX=settings.key_prefix,
        FANOUT_SUBJECT_PREFIX=settings.subject_prefix,
        FANOUT_JS_STREAM=settings.js_stream,
        FANOUT_INGEST_BATCH=str(settings.batch),
        FANOUT_INGEST_HTTP="127.0.0.1:0",
        FANOUT_LOG_FORMAT="json",
    )
    with tempfile.TemporaryFile() as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fanout.cli", "ingest", env=env, cwd=ROOT, stdout=log, stderr=log
        )

        async def count() -> int:
            return sum([int(await redis.xlen(s)) for s in streams])

        first = 0
        while (first := await count()) == 0:
            if proc.returncode is not None:
                raise SystemExit(f"the ingestor exited with {proc.returncode}")
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        cpu0, redis0 = _cpu(proc.pid), await _redis_cpu(redis)
        done = first
        while done < n:
            await asyncio.sleep(0.02)
            done = await count()
        elapsed = time.perf_counter() - t0
        CPU["ingestor"] = _cpu(proc.pid) - cpu0
        CPU["redis-server"] = await _redis_cpu(redis) - redis0
        CPU["elapsed"] = elapsed
        proc.send_signal(signal.SIGTERM)
        rc = await proc.wait()
        if rc != 0 or done != n:
            log.seek(0)
            raise SystemExit(f"ingestor exit {rc}, {done}/{n} entries\n{log.read().decode()[-3000:]}")
    return (n - first) / elapsed


CPU: dict[str, float] = {}


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run_fetch(nc: NATS, settings: IngestorSettings, n: int, batch: int) -> float:
    js = nc.jetstream()

    async def drain(stream: str) -> None:
        await js.add_consumer(
            stream,
            ConsumerConfig(durable_name="bench-fetch", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
        )
        sub = await js.pull_subscribe_bind("bench-fetch", stream=stream)
        pending = (await js.stream_info(stream)).state.messages
        got = 0
        while got < pending:
            try:
                msgs = await sub.fetch(batch, timeout=2)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            got += len(msgs)
        await nc.flush()
        await sub.unsubscribe()

    started = time.perf_counter()
    await asyncio.gather(*(drain(_stream(settings, feed)) for feed in FEED_NAMES))
    return n / (time.perf_counter() - started)


async def run_lean(nc: NATS, settings: IngestorSettings, n: int, batch: int) -> float:
    lean = IngestorSettings.from_env({}, **{**_values(settings), "js_consumer": "bench-lean"})
    handles = await jetstream.setup(nc, lean)

    async def drain(handle: jetstream.StreamHandle) -> None:
        loop = PullLoop(nc, handle, batch)
        await loop.start()
        pending = (await nc.jetstream().stream_info(handle.stream)).state.messages
        got = 0
        while got < pending:
            loop.arrived.clear()
            await loop.top_up()
            if not loop.buffer:
                await asyncio.wait_for(loop.arrived.wait(), 5)
                continue
            for d in loop.take():
                await nc.publish(d.reply, b"+ACK")
                got += 1
            await nc.flush()
        await loop.close()

    started = time.perf_counter()
    await asyncio.gather(*(drain(h) for h in handles.values()))
    return n / (time.perf_counter() - started)


def _values(settings: IngestorSettings) -> dict[str, object]:
    from dataclasses import fields

    return {f.name: getattr(settings, f.name) for f in fields(settings)}


async def main(args: argparse.Namespace) -> int:
    tag = uuid.uuid4().hex[:8]
    settings = IngestorSettings.from_env(
        os.environ,
        key_prefix=f"bench:{tag}",
        subject_prefix=f"bench{tag}.",
        js_stream=f"BENCH{tag}",
        batch=args.batch,
    )
    nc = await nats.connect(settings.nats_url)
    redis = redis_client(settings.redis_url)
    try:
        await jetstream.setup(nc, settings)  # streams and the ingestor's consumers, before the prefill
        names = ", ".join(_stream(settings, feed) for feed in FEED_NAMES)
        print(f"prefilling {args.n} messages into JetStream streams {names} ...", flush=True)
        publish_rate = await prefill(nc, settings, args.n)
        ingest = await run_ingestor(settings, redis, args.n)
        fetch = await run_fetch(nc, settings, args.n, args.batch)
        lean = await run_lean(nc, settings, args.n, args.batch)
    finally:
        for feed in FEED_NAMES:
            try:
                await nc.jetstream().delete_stream(_stream(settings, feed))
            except nats.js.errors.NotFoundError:
                pass
        await nc.close()
        async for key in redis.scan_iter(match=f"{settings.key_prefix}:*", count=5000):
            await redis.delete(key)
        await redis.aclose()
    rows = [
        ("core publish (prefill)", publish_rate, ""),
        ("fanout ingest (process: decode + Lua + ack)", ingest, f"{ingest / fetch:.2f}x fetch"),
        (f"nats-py fetch({args.batch}) + ack, no Redis", fetch, "1.00x fetch"),
        ("lean pull loop + ack, no Redis", lean, f"{lean / fetch:.2f}x fetch"),
    ]
    print(f"\n{args.n} messages, batch {args.batch}")
    print(f"{'path':<46} {'msgs/s':>10}  ratio")
    for name, rate, ratio in rows:
        print(f"{name:<46} {rate:>10,.0f}  {ratio}")
    target = "meets" if ingest >= 20_000 else "BELOW"
    print(f"\ningestor: {ingest:,.0f} msg/s ({target} the 20,000 msg/s target)")
    drained = ingest * CPU["elapsed"]
    print(
        f"while draining: ingestor {CPU['ingestor'] / CPU['elapsed']:.0%} of a core "
        f"({drained / CPU['ingestor']:,.0f} msgs per CPU-second), "
        f"redis-server {CPU['redis-server'] / CPU['elapsed']:.0%} of a core; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=200_000, help="messages to prefill (default 200000)")
    parser.add_argument("--batch", type=int, default=1000, help="ingest/fetch batch size (default 1000)")
    return asyncio.run(main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
