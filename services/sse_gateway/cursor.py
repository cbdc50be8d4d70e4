"""The cursor: the `id:` of every event, from which a subscription resumes exactly.

Form (version 1), one part per subscribed feed, in the order of `shared.feeds.FEED_NAMES`:

    v1:execution.ab12cd34.1732770000123-0.42,sport_event.ef56ab78.1732769999000-2.17
       <feed>.<epoch>.<redis stream entry id>.<seq>

- `epoch` is the feed stream's epoch (its meta hash); `-` when the feed had none yet
  (nothing was ever appended: only `<feed>.-.0-0.0`, which resumes from the first entry
  of whatever epoch the feed has by then, with no reset). A different epoch than the
  feed's current one means the stream was reset: the subscriber gets the rest of its old
  epoch from the catalogue if it is there, then an `event: reset`, then the current
  epoch from its first entry.
- the entry id is the last entry delivered (what `redis-cli XRANGE` shows); `0-0` before
  the first entry.
- `seq` is that entry's `seq` field: the next entry must carry seq + 1, which makes gap
  detection exact across Redis and the Postgres catalogue.

A cursor may name feeds the subscription does not ask for (a two-feed cursor used to
resume one feed): those parts are ignored. A subscribed feed the cursor does not name
starts at the request's `from=` (default `latest`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shared.feeds import FEED_NAMES

VERSION = "v1"
NO_EPOCH = "-"
ORIGIN_ID = "0-0"
MAX_LENGTH = 512

# ASCII digits only ([0-9], not \d, which takes any Unicode digit that int() reads too), and
# fullmatch, not `^...$` (`$` also matches before a trailing newline).
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_SEQ = re.compile(r"[0-9]{1,19}")
_U64 = 2**64 - 1


class CursorError(ValueError):
    """A cursor that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a subscriber is in one feed: after entry `entry_id`, whose seq is `seq`."""

    epoch: str
    entry_id: str
    seq: int

    @property
    def id_key(self) -> tuple[int, int]:
        return entry_key(self.entry_id)

    def text(self, feed: str) -> str:
        return f"{feed}.{self.epoch}.{self.entry_id}.{self.seq}"


def origin(epoch: str) -> Position:
    """Before the first entry of `epoch`."""
    return Position(epoch, ORIGIN_ID, 0)


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


def id_before(entry_id: str) -> str:
    """The greatest stream id below `entry_id`, so an exclusive XRANGE from it includes the entry."""
    ms, n = entry_key(entry_id)
    if n > 0:
        return f"{ms}-{n - 1}"
    if ms > 0:
        return f"{ms - 1}-{_U64}"
    return ORIGIN_ID


def format(positions: Mapping[str, Position], feeds: Iterable[str]) -> str:
    return VERSION + ":" + ",".join(positions[f].text(f) for f in feeds)


def parse(text: str) -> dict[str, Position]:
    """The positions a cursor names, by feed. Raises CursorError naming what is wrong."""
    text = text.strip()
    if not text:
        raise CursorError("the cursor is empty")
    if len(text) > MAX_LENGTH:
        raise CursorError(f"the cursor is longer than {MAX_LENGTH} characters")
    version, sep, body = text.partition(":")
    if not sep:
        raise CursorError(f"expected `{VERSION}:<feed>.<epoch>.<entry id>.<seq>[,...]`, got {_show(text)}")
    if version != VERSION:
        raise CursorError(f"unsupported cursor version {_show(version)}; this gateway reads {VERSION}")
    positions: dict[str, Position] = {}
    for part in body.split(","):
        feed, dot, rest = part.partition(".")
        if feed not in FEED_NAMES:
            raise CursorError(
                f"unknown feed {_show(feed)} in the cursor; known feeds: {', '.join(FEED_NAMES)}"
            )
        if feed in positions:
            raise CursorError(f"feed {feed} appears twice in the cursor")
        pieces = rest.rsplit(".", 2) if dot else []
        if len(pieces) != 3:
            raise CursorError(f"expected `{feed}.<epoch>.<entry id>.<seq>`, got {_show(part)}")
        epoch, entry_id, seq = pieces
        if epoch != NO_EPOCH and not _EPOCH.fullmatch(epoch):
            raise CursorError(f"bad epoch {_show(epoch)} for {feed}: expected letters, digits, _ or -")
        match = _ENTRY_ID.fullmatch(entry_id)
        if not match or int(match[1]) > _U64 or int(match[2]) > _U64:
            raise CursorError(f"bad stream entry id {_show(entry_id)} for {feed}: expected <ms>-<n>")
        if not _SEQ.fullmatch(seq) or int(seq) >= 2**63:
            raise CursorError(f"bad seq {_show(seq)} for {feed}: expected a non-negative integer")
        if epoch == NO_EPOCH and (int(seq) != 0 or entry_id != ORIGIN_ID):
            raise CursorError(f"{feed} has no epoch (`-`) yet names an entry: only `{feed}.-.0-0.0` is valid")
        positions[feed] = Position(epoch, f"{int(match[1])}-{int(match[2])}", int(seq))
    return positions


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
