"""The two feeds: their names, NATS subjects and protobuf messages.

A feed's name is also its NATS subject (after an optional prefix), its Redis stream's
hash tag, its Postgres table and the `event:` of its SSE events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from google.protobuf.message import Message

from shared.proto import event_pb2, execution_pb2


@dataclass(frozen=True, slots=True)
class Feed:
    name: str
    message: type[Message]


EXECUTION: Final = Feed("execution", execution_pb2.execution)
SPORT_EVENT: Final = Feed("sport_event", event_pb2.event)

FEEDS: Final[dict[str, Feed]] = {f.name: f for f in (EXECUTION, SPORT_EVENT)}
FEED_NAMES: Final[tuple[str, ...]] = tuple(FEEDS)


def js_stream_name(base: str, feed: str) -> str:
    """The JetStream stream that captures one feed (`FEEDS_execution`): its sequence
    numbers are the feed's `seq`, its creation time (ms) the feed's epoch."""
    return f"{base}_{feed}"


def epoch_of(created: datetime) -> str:
    """A feed's epoch from its JetStream stream's creation time (nats-py's `StreamInfo.created`):
    Unix ms as decimal text, floored, in integer arithmetic."""
    return str((created - _UNIX) // timedelta(milliseconds=1))


_UNIX = datetime(1970, 1, 1, tzinfo=UTC)


def message_id(epoch: str, seq: int) -> str:
    """`<epoch>.<seq>`: the JetStream stream's creation time (ms) and sequence."""
    return f"{epoch}.{seq}"


def entry_id(seq: int) -> str:
    """A message's Redis stream entry id: its seq (`redis-cli XRANGE key 100 200`)."""
    return f"{seq}-0"


def id_key(stream_id: str) -> tuple[int, int]:
    """Any Redis stream id `<ms>-<n>` (or `<ms>`) as a pair that orders like Redis orders
    ids: the one stream-id parser (a feed entry's is `(seq, 0)`)."""
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n or 0)


def seq_of_entry_id(entry_id: str | bytes) -> int:
    """The seq of an entry id `<seq>-0` (raises ValueError for anything else)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    seq, dash, n = text.partition("-")
    if not dash or not seq.isascii() or not seq.isdigit() or n != "0":
        raise ValueError(f"not a feed entry id: {text!r}")
    return int(seq)


# Not a feed: where the messages that could not be decoded go, with the same
# append-once machinery (stream + meta + dedup keys) as a feed.
DEAD_LETTER: Final = "dead_letter"
