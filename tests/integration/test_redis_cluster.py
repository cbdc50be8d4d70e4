"""The hash-tag claim, proven on a real 3-node Redis Cluster started from redis-server
binaries: shared/lua/ingest_append.lua runs unchanged through RedisCluster with the
shared/keys.py keys (all of one call's keys share a slot), a call mixing two feeds' keys
is refused (CROSSSLOT), and different feeds live in different slots (and here, nodes)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from fanout.servers import RedisServer, find_binary, free_port, port_answers
from shared import codec, scripts
from shared.feeds import FEED_NAMES
from shared.keys import Keys

# One cluster for the module (starting one takes seconds); each test uses its own key prefix.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

DEADLINE = 60.0


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535 and not port_answers("127.0.0.1", port + 10000):
            return port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster() -> AsyncIterator[RedisCluster]:
    root = Path(tempfile.mkdtemp(prefix="fanout-cluster-"))
    nodes: list[RedisServer] = []
    client: RedisCluster | None = None
    try:
        for i in range(3):
            data = root / f"node{i}"
            node = RedisServer(
                data, port=_cluster_port(),
                extra_args=["--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf"),
                            "--appendonly", "no"],
            )
            nodes.append(await asyncio.to_thread(node.start))
        cli = find_binary(["redis-cli", "valkey-cli"], what="redis-cli")
        addresses = [f"{n.host}:{n.port}" for n in nodes]
        done = await asyncio.to_thread(
            subprocess.run,
            [str(cli), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=DEADLINE,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        startup = [ClusterNode(n.host, n.port) for n in nodes]
        client = RedisCluster(startup_nodes=startup, decode_responses=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        # The nodes agree on the slot map a moment after `--cluster create`; nothing to await.
        while (await client.cluster_info()).get("cluster_state") != "ok":
            assert loop.time() < deadline, "cluster never reached state ok"
            await asyncio.sleep(0.1)
        yield client
    finally:
        if client is not None:
            await client.aclose()
        for node in nodes:
            await asyncio.to_thread(node.stop)
        shutil.rmtree(root, ignore_errors=True)


def _args(messages: list[tuple[int, dict[str, str]]], message_ids: list[str]) -> list[str | int]:
    """The script's ARGV (contract v2: ttl, epoch, start, then per message seq, N, fields)."""
    calls = [
        (seq, message_id, codec.entry_fields(message_id, fields, "2026-11-28T09:00:00.000Z", "t"))
        for (seq, fields), message_id in zip(messages, message_ids, strict=True)
    ]
    return scripts.ingest_append_call(Keys(), "execution", "1795857719000", calls, 3600)[1]


SAMPLE = {
    "execution": {"symbol": "AAPL", "market": "NASDAQ", "price": "189.25", "quantity": "300",
                  "executionEpoch": "1795857719728", "stateSymbol": "CA"},
    "sport_event": {"sport": "FOOTBALL", "match_title": "Arsenal - Ajax", "data_event": "Goal by #9 (23')"},
}


async def test_ingest_script_runs_per_feed_on_a_cluster(cluster: RedisCluster) -> None:
    keys = Keys("cluster-append")
    script = cluster.register_script(scripts.source("ingest_append"))
    for feed in FEED_NAMES:
        ids = [f"1795857719000.{n}" for n in (1, 2, 3)]
        call_keys = [keys.stream(feed), keys.meta(feed), *(keys.dedup(feed, i) for i in ids)]
        assert len({key_slot(k.encode()) for k in call_keys}) == 1  # one slot per call
        messages = [(n, SAMPLE[feed]) for n in (1, 2, 3)]
        first = await script(keys=call_keys, args=_args(messages, ids))
        assert [flag for _, flag in first] == [1, 1, 1]
        again = await script(keys=call_keys, args=_args(messages, ids))  # a redelivery
        assert [entry_id for entry_id, _ in again] == [entry_id for entry_id, _ in first]
        assert [flag for _, flag in again] == [0, 0, 0]  # nothing appended
        entries: Any = await cluster.xrange(keys.stream(feed))
        assert [e[1]["seq"] for e in entries] == ["1", "2", "3"]
        assert entries[0][1]["message_id"] == ids[0]
        assert [e[0] for e in entries] == ["1-0", "2-0", "3-0"]
        assert await cluster.hget(keys.meta(feed), "seq") == "3"


async def test_keys_of_two_feeds_in_one_call_are_refused(cluster: RedisCluster) -> None:
    keys = Keys("cluster-mixed")
    script = cluster.register_script(scripts.source("ingest_append"))
    mixed = [keys.stream("execution"), keys.meta("sport_event"), keys.dedup("execution", "1.1")]
    with pytest.raises((RedisClusterException, ResponseError), match=r"(?i)slot"):
        await script(keys=mixed, args=_args([(1, SAMPLE["execution"])], ["1.1"]))
    # The server itself refuses it too (CROSSSLOT; redis-py drops the error code), sent straight
    # to a node that owns one of the keys.
    node = cluster.get_node_from_key(keys.stream("execution"))
    assert node is not None
    two_feeds = (keys.stream("execution"), keys.stream("sport_event"))
    with pytest.raises(ResponseError, match="don't hash to the same slot"):
        await node.execute_command("EVAL", "return 1", 2, *two_feeds)


async def test_feeds_land_in_different_slots_and_nodes(cluster: RedisCluster) -> None:
    keys = Keys()
    slots = {
        feed: {key_slot(k.encode()) for k in (keys.stream(feed), keys.meta(feed), keys.dedup(feed, "9.9"))}
        for feed in (*FEED_NAMES, "dead_letter")
    }
    assert all(len(s) == 1 for s in slots.values())  # each feed: one slot
    assert len({next(iter(s)) for s in slots.values()}) == len(slots)  # no two feeds share one
    owners = {feed: cluster.get_node_from_key(keys.stream(feed)) for feed in FEED_NAMES}
    assert owners["execution"] != owners["sport_event"]  # here the two feeds even sit on two nodes
    for feed in FEED_NAMES:
        reply = await cluster.execute_command("CLUSTER KEYSLOT", keys.stream(feed))
        assert reply == next(iter(slots[feed]))  # the server agrees with the client
