"""The fault suite's own instruments: the judge catches what it must, and the stalled
replication link really makes a replica miss writes (SIGSTOP of the replica would not:
what the primary sent sits in the replica's socket buffer and is read on SIGCONT)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fanout.servers import RedisServer, TcpProxy
from tests.faults.harness import FeedTruth, Got, Sent, Subscriber, judge_subscriber, until

EPOCH = "1796280000000"


def truth(top: int, malformed: tuple[int, ...] = ()) -> dict[str, FeedTruth]:
    by_seq = {s: Sent(bytes(8), s in malformed, 0.0) for s in range(1, top + 1)}
    return {"execution": FeedTruth("execution", EPOCH, by_seq, top)}


def subscriber(seqs: list[int], *, epoch: str = EPOCH, malformed: tuple[int, ...] = ()) -> Subscriber:
    s = Subscriber("sub", ("execution",))
    s.received["execution"] = [
        Got("malformed" if q in malformed else "message", epoch, q, f"{epoch}.{q}", 0.0, "") for q in seqs
    ]
    return s


def test_the_judge_passes_exactly_every_seq_once_in_order() -> None:
    v = judge_subscriber(subscriber(list(range(1, 11)), malformed=(4,)), truth(10, malformed=(4,)))
    assert v.exact and v.events == 10, v


def test_the_judge_catches_a_missing_first_event_a_repeat_after_the_last_and_a_missing_tail() -> None:
    v = judge_subscriber(subscriber([*range(2, 11), 10]), truth(10))
    assert (v.missing, v.duplicates) == (1, 1), v
    assert "the first event(s) 1..1 never arrived" in v.details[0]
    assert "after the last expected one" in v.details[1]
    v = judge_subscriber(subscriber(list(range(1, 8))), truth(10))
    assert v.missing == 3 and "8..10 never arrived (the tail)" in v.details[0], v


def test_the_judge_catches_a_pair_across_an_epoch_a_wrong_kind_and_any_notice() -> None:
    s = subscriber(list(range(1, 6)))
    s.received["execution"].append(Got("message", "1796289999999", 6, "1796289999999.6", 0.0, ""))
    s.notices.append(("reset", '{"feed": "execution"}'))
    v = judge_subscriber(s, truth(6, malformed=(3,)))
    assert v.notices == 1 and not v.exact
    assert any("epoch '1796289999999'" in d for d in v.details), v.details
    assert any("seq 3 came as message, JetStream's payload is malformed" in d for d in v.details), v.details
    assert v.missing == 1  # seq 6 of the right epoch never came


def test_the_judge_fails_a_refusal_an_eventsource_would_not_survive() -> None:
    s = subscriber(list(range(1, 4)))
    s.refusals.append("HTTP 400: cursor ahead")
    v = judge_subscriber(s, truth(3))
    assert not v.exact and "would have stopped for good" in v.details[0]


async def test_a_stalled_then_cut_link_makes_the_promoted_replica_miss_writes(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    primary = await asyncio.to_thread(RedisServer(tmp_path / "a").start)
    link = await asyncio.to_thread(TcpProxy(primary.port).start)
    replica = await asyncio.to_thread(RedisServer(tmp_path / "b", replica_of=("127.0.0.1", link.port)).start)
    client: Any = Redis.from_url(primary.url)
    try:
        async def linked() -> bool:
            info = await asyncio.to_thread(replica.info, "replication")
            return info.get("master_link_status") == "up"

        await until("the replica's link", linked, 30)
        for i in range(1, 101):
            await client.xadd("s", {"i": i}, id=f"{i}-0")
        await client.execute_command("WAIT", 1, 5000)  # the replica acknowledged all 100
        link.stall()
        for i in range(101, 2101):
            await client.xadd("s", {"i": i}, id=f"{i}-0")
        await asyncio.to_thread(primary.kill)
        link.cut()
        await asyncio.to_thread(replica.promote)
        promoted = Redis.from_url(replica.url)
        try:
            assert await promoted.xlen("s") == 100  # the 2,000 written during the stall never arrived
            assert (await asyncio.to_thread(replica.info, "replication"))["role"] == "master"
        finally:
            await promoted.aclose()
    finally:
        await client.aclose()
        await asyncio.to_thread(replica.stop)
        await asyncio.to_thread(link.stop)
        await asyncio.to_thread(primary.stop)


def test_the_judge_fails_an_event_outside_its_schema() -> None:
    s = subscriber(list(range(1, 4)))
    data = '{"feed": "execution", "seq": 4, "message_id": "1796289999999.4", "error": 5}'  # error: not text
    s._dispatch({"event": "malformed", "id": "v2:execution.1796289999999.4", "data": data})
    v = judge_subscriber(s, truth(3))
    assert not v.exact and any("outside the event schemas" in d for d in v.details), v.details
