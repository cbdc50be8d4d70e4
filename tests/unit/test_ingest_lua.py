"""shared/lua/ingest_append.lua on fakeredis (with Lua): exactly-once appends per feed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from shared import codec, scripts
from shared.keys import Keys

KEYS = Keys("unit")
FEED = "execution"
TTL = 3600


@pytest.fixture
async def r() -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


def _message(i: int) -> list[str]:
    return codec.entry_fields(
        f"1000.{i}",
        {"symbol": f"S{i}", "price": "1.5"},
        "2026-11-28T09:00:00.000Z",
        "2026-11-28T09:00:00.001Z",
    )


async def append(
    r: Any, broker_seqs: list[int], epoch: str = "e1", feed: str = FEED
) -> list[tuple[str, int]]:
    """One script call for a batch of messages, as the ingestor makes it."""
    script = scripts.register(r, "ingest_append")
    keys = [KEYS.stream(feed), KEYS.meta(feed), *(KEYS.dedup(feed, f"1000.{s}") for s in broker_seqs)]
    args: list[Any] = [TTL, epoch]
    for s in broker_seqs:
        fields = _message(s)
        args += [s, len(fields), *fields]
    reply = await script(keys=keys, args=args)
    return [(entry_id.decode(), int(new)) for entry_id, new in reply]


async def entries(r: Any, feed: str = FEED) -> list[tuple[str, dict[str, str]]]:
    return [(i.decode(), codec.str_entry(f)) for i, f in await r.xrange(KEYS.stream(feed))]


async def meta(r: Any, feed: str = FEED) -> dict[str, str]:
    return codec.str_entry(await r.hgetall(KEYS.meta(feed)))


async def test_a_batch_is_appended_in_order_with_contiguous_seq(r: Any) -> None:
    reply = await append(r, [1, 2, 3])
    stored = await entries(r)
    assert [new for _, new in reply] == [1, 1, 1]
    assert [entry_id for entry_id, _ in reply] == [entry_id for entry_id, _ in stored]
    assert [f["seq"] for _, f in stored] == ["1", "2", "3"]
    assert list(stored[0][1]) == ["seq", "message_id", "symbol", "price", "broker_time", "ingest_time"]
    assert stored[2][1]["message_id"] == "1000.3"
    m = await meta(r)
    assert m == {"epoch": "e1", "seq": "3", "last_id": stored[2][0], "broker_seq": "3"}


async def test_a_duplicate_returns_the_original_id_and_appends_nothing(r: Any) -> None:
    first = await append(r, [1, 2])
    again = await append(r, [2, 3])
    assert again[0] == (first[1][0], 0)
    assert again[1][1] == 1
    stored = await entries(r)
    assert [f["message_id"] for _, f in stored] == ["1000.1", "1000.2", "1000.3"]
    assert [f["seq"] for _, f in stored] == ["1", "2", "3"]
    assert (await meta(r))["seq"] == "3"


async def test_a_message_twice_in_one_batch_is_appended_once(r: Any) -> None:
    reply = await append(r, [7, 7])
    assert reply[1] == (reply[0][0], 0)
    assert len(await entries(r)) == 1


async def test_a_batch_of_only_duplicates_changes_nothing(r: Any) -> None:
    await append(r, [1, 2])
    before = (await entries(r), await meta(r))
    assert [new for _, new in await append(r, [1, 2], epoch="e2")] == [0, 0]
    assert (await entries(r), await meta(r)) == before


async def test_broker_seq_is_the_highest_ingested(r: Any) -> None:
    await append(r, [5, 3])
    assert (await meta(r))["broker_seq"] == "5"
    await append(r, [4])
    assert (await meta(r))["broker_seq"] == "5"
    await append(r, [9])
    assert (await meta(r))["broker_seq"] == "9"


async def test_the_epoch_is_set_once(r: Any) -> None:
    await append(r, [1], epoch="first")
    await append(r, [2], epoch="second")
    assert (await meta(r))["epoch"] == "first"


async def test_dedup_keys_hold_the_entry_id_with_the_ttl(r: Any) -> None:
    [(entry_id, _)] = await append(r, [1])
    key = KEYS.dedup(FEED, "1000.1")
    assert (await r.get(key)).decode() == entry_id
    assert 0 < await r.ttl(key) <= TTL


async def test_feeds_are_independent(r: Any) -> None:
    await append(r, [1, 2], feed="execution")
    await append(r, [3], feed="dead_letter")
    assert [f["seq"] for _, f in await entries(r, "dead_letter")] == ["1"]
    assert (await meta(r, "dead_letter"))["seq"] == "1"
    assert (await meta(r, "execution"))["seq"] == "2"
