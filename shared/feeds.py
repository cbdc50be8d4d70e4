"""The two feeds: their names, NATS subjects and protobuf messages.

A feed's name is also its NATS subject (after an optional prefix), its Redis stream's
hash tag, its Postgres table and the `event:` of its SSE events.
"""

from __future__ import annotations

from dataclasses import dataclass
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

# Not a feed: where the messages that could not be decoded go, with the same
# append-once machinery (stream + meta + dedup keys) as a feed.
DEAD_LETTER: Final = "dead_letter"
