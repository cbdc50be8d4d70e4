"""shared/lua/ingest_append.lua (contract v2) on fakeredis (with Lua): entries at the seq
JetStream gave them, each once, contiguous; holes reported; rebuilds from a start; epochs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ResponseError

from shared import codec, scripts
from shared.feeds import entry_id, message_id
from shared.keys import Keys

KEYS = Keys("unit")
FEED = "execution"
TTL = 3600
EPOCH = "1795862595094"


@pytest.fixture
async def r() -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


def _fields(seq: int, epoch: str = EPOCH) -> list[str]:
    return codec.entry_fields(
        message_id(epoch, seq),
        {"symbol": f"S{seq}", "price": "1.5"},
        "2026-11-28T09:00:00.000Z",
        "2026-11-28T09:00:00.001Z",
    )


async def append(
    r: Any, seqs: list[int], epoch: str = EPOCH, start: int = 0, feed: str = FEED
) -> list[tuple[str, int]]:
    """One script call for a batch of messages, as the ingestor makes it."""
    script = scripts.register(r, "ingest_append")
    messages = [(s, message_id(epoch, s), _fields(s, epoch)) for s in seqs]
    keys, args = scripts.ingest_append_call(KEYS, feed, epoch, messages, TTL, start)
    reply = await script(keys=keys, args=args)
    return [(eid.decode(), int(status)) for eid, status in reply]


async def entries(r: Any, feed: str = FEED) -> list[tuple[str, dict[str, str]]]:
    return [(i.decode(), codec.str_entry(f)) for i, f in await r.xrange(KEYS.stream(feed))]


async def meta(r: Any, feed: str = FEED) -> dict[str, str]:
    return codec.str_entry(await r.hgetall(KEYS.meta(feed)))


async def test_entries_are_appended_at_their_seq_in_order(r: Any) -> None:
    reply = await append(r, [1, 2, 3])
    stored = await entries(r)
    assert reply == [("1-0", 1), ("2-0", 1), ("3-0", 1)]
    assert [i for i, _ in stored] == ["1-0", "2-0", "3-0"]
    assert [f["seq"] for _, f in stored] == ["1", "2", "3"]
    assert list(stored[0][1]) == ["seq", "message_id", "symbol", "price", "broker_time", "ingest_time"]
    assert stored[2][1]["message_id"] == f"{EPOCH}.3"
    assert await meta(r) == {"epoch": EPOCH, "seq": "3", "last_id": "3-0", "first_seq": "1"}


async def test_a_duplicate_returns_the_original_id_and_appends_nothing(r: Any) -> None:
    await append(r, [1, 2])
    assert await append(r, [2, 3]) == [("2-0", 0), ("3-0", 1)]
    assert [f["seq"] for _, f in await entries(r)] == ["1", "2", "3"]
    assert (await meta(r))["seq"] == "3"


async def test_a_message_twice_in_one_batch_is_appended_once(r: Any) -> None:
    assert await append(r, [1, 1]) == [("1-0", 1), ("1-0", 0)]
    assert len(await entries(r)) == 1


async def test_a_seq_at_or_below_the_top_is_a_duplicate_after_its_dedup_key_expired(r: Any) -> None:
    await append(r, [1, 2, 3])
    await r.delete(KEYS.dedup(FEED, message_id(EPOCH, 2)))  # expired (or evicted)
    assert await append(r, [2]) == [("2-0", 0)]
    assert len(await entries(r)) == 3


async def test_a_hole_is_reported_and_nothing_after_it_is_appended(r: Any) -> None:
    await append(r, [1, 2])
    assert await append(r, [5, 6]) == [("2-0", -1), ("2-0", -1)]
    assert await append(r, [3, 5, 4]) == [("3-0", 1), ("3-0", -1), ("3-0", -1)]
    assert [i for i, _ in await entries(r)] == ["1-0", "2-0", "3-0"]
    assert (await meta(r))["seq"] == "3"


async def test_a_new_stream_starts_at_1_and_an_explicit_start_rebuilds_a_lost_one(r: Any) -> None:
    assert await append(r, [4]) == [("0-0", -1)]  # an empty stream starts at 1 unless told
    assert not await r.exists(KEYS.stream(FEED))
    # Redis lost the stream; seqs 1..3 are archived: rebuild from 4.
    assert await append(r, [3, 4, 5], start=4) == [("3-0", 0), ("4-0", 1), ("5-0", 1)]
    assert [i for i, _ in await entries(r)] == ["4-0", "5-0"]
    assert (await meta(r))["first_seq"] == "4"


async def test_a_hole_in_a_missing_stream_leaves_the_meta_as_it_was(r: Any) -> None:
    await append(r, [1, 2, 3])
    await r.delete(KEYS.stream(FEED))
    assert await append(r, [7]) == [("0-0", -1)]
    assert await meta(r) == {"epoch": EPOCH, "seq": "3", "last_id": "3-0", "first_seq": "1"}
    assert await append(r, [6, 7], start=6) == [("6-0", 1), ("7-0", 1)]
    assert await meta(r) == {"epoch": EPOCH, "seq": "7", "last_id": "7-0", "first_seq": "6"}


async def test_an_empty_stream_whose_meta_was_lost_is_rebuilt_not_taken_for_duplicates(r: Any) -> None:
    await append(r, [1, 2, 3])
    await r.xtrim(KEYS.stream(FEED), maxlen=0)  # archived and trimmed
    await r.delete(KEYS.meta(FEED))  # evicted: nothing names the epoch of top 3 any more
    newer = str(int(EPOCH) + 1000)  # the JetStream stream was recreated meanwhile
    assert await append(r, [1, 2], epoch=newer) == [("1-0", 1), ("2-0", 1)]
    assert [f["message_id"] for _, f in await entries(r)] == [f"{newer}.1", f"{newer}.2"]
    # Same epoch: a hole at top 0, and the caller rebuilds from the archived top.
    await r.xtrim(KEYS.stream(FEED), maxlen=0)
    await r.delete(KEYS.meta(FEED))
    assert await append(r, [4], epoch=newer) == [("0-0", -1)]
    assert await append(r, [3, 4], epoch=newer, start=3) == [("3-0", 1), ("4-0", 1)]


async def test_the_top_survives_trimming(r: Any) -> None:
    await append(r, [1, 2, 3])
    await r.xtrim(KEYS.stream(FEED), maxlen=0)
    assert await append(r, [3, 4]) == [("3-0", 0), ("4-0", 1)]
    assert [i for i, _ in await entries(r)] == ["4-0"]


async def test_a_dedup_key_that_outlived_its_entry_does_not_block_the_refill(r: Any) -> None:
    await append(r, [1, 2, 3])
    await r.delete(KEYS.stream(FEED))  # the stream evicted, its keys not
    assert await append(r, [3], start=3) == [("3-0", 1)]
    assert [f["message_id"] for _, f in await entries(r)] == [f"{EPOCH}.3"]


async def test_a_lost_meta_hash_is_rebuilt_with_the_epoch_of_the_newest_entry(r: Any) -> None:
    await append(r, [1, 2])
    await r.delete(KEYS.meta(FEED))
    assert await append(r, [3]) == [("3-0", 1)]
    m = await meta(r)
    assert (m["epoch"], m["seq"], m["first_seq"]) == (EPOCH, "3", "1")


async def test_a_newer_epoch_resets_the_stream_and_an_older_one_is_refused(r: Any) -> None:
    await append(r, [1, 2, 3])
    newer = str(int(EPOCH) + 1000)
    assert await append(r, [1], epoch=newer) == [("1-0", 1)]
    stored = await entries(r)
    assert [f["message_id"] for _, f in stored] == [f"{newer}.1"]
    assert (await meta(r))["epoch"] == newer
    with pytest.raises(ResponseError, match=f"STALE_EPOCH {newer}"):
        await append(r, [2], epoch=EPOCH)


async def test_dedup_hashes_hold_the_entry_id_with_the_ttl(r: Any) -> None:
    await append(r, [1, 2])
    key = KEYS.dedup(FEED, message_id(EPOCH, 1))
    assert key == KEYS.dedup(FEED, message_id(EPOCH, 2)) != KEYS.dedup(FEED, message_id(EPOCH, 130))
    assert (await r.hget(key, message_id(EPOCH, 1))).decode() == entry_id(1)
    assert (await r.hget(key, message_id(EPOCH, 2))).decode() == entry_id(2)
    assert 0 < await r.ttl(key) <= TTL


async def test_malformed_entries_keep_their_seq(r: Any) -> None:
    script = scripts.register(r, "ingest_append")
    bad = codec.malformed_fields(message_id(EPOCH, 2), "not protobuf", b"\xff", "t1", "t2")
    messages = [(1, message_id(EPOCH, 1), _fields(1)), (2, message_id(EPOCH, 2), bad)]
    keys, args = scripts.ingest_append_call(KEYS, FEED, EPOCH, messages, TTL)
    await script(keys=keys, args=args)
    stored = await entries(r)
    assert list(stored[1][1]) == ["seq", "message_id", "error", "payload_b64", "broker_time", "ingest_time"]
    assert codec.is_malformed(stored[1][1]) and not codec.is_malformed(stored[0][1])


async def test_feeds_are_independent(r: Any) -> None:
    await append(r, [1, 2], feed="execution")
    await append(r, [1], feed="sport_event")
    assert (await meta(r, "sport_event"))["seq"] == "1"
    assert (await meta(r, "execution"))["seq"] == "2"


async def test_the_restart_script_drops_the_stream_only_at_the_top_the_caller_saw(r: Any) -> None:
    restart = scripts.register(r, "ingest_restart")
    await append(r, [1, 2, 3])
    assert await restart(keys=[KEYS.stream(FEED)], args=[2]) == 0  # the top moved on: kept
    assert await r.exists(KEYS.stream(FEED))
    assert await restart(keys=[KEYS.stream(FEED)], args=[3]) == 1
    assert not await r.exists(KEYS.stream(FEED))
    assert await restart(keys=[KEYS.stream(FEED)], args=[3]) == 0  # already gone
    assert await append(r, [61], start=61) == [("61-0", 1)]
