"""The cursor: the `id:` of every event, from which a subscription resumes exactly.

Form (version 2), one part per subscribed feed, in the order of `shared.feeds.FEED_NAMES`:

    v2:execution.1795862595094.42,sport_event.1795862595101.17
       <feed>.<epoch>.<seq>

- `epoch` is the feed's JetStream stream's creation time in Unix ms; it changes only when
  that JetStream stream is recreated. `-` when the feed had no message yet: only
  `<feed>.-.0` is valid, and it resumes from the first entry of whatever epoch the feed
  has by then, with no reset.
- `seq` is the JetStream stream sequence of the last entry delivered (its Redis stream
  entry id is `<seq>-0`); the next one is seq + 1. Positions come from JetStream, so a
  cursor stays valid whatever Redis loses: resuming reads Redis while it holds seq + 1,
  else the PostgreSQL catalogue.

A cursor may name feeds the subscription does not ask for (a two-feed cursor used to
resume one feed): those parts are ignored. A subscribed feed the cursor does not name
starts at the request's `from=` (default `latest`).

A version 1 cursor (`v1:<feed>.<epoch>.<redis entry id>.<seq>`, positions made in Redis
before positions came from JetStream) cannot be mapped exactly: `parse` recognises it
and raises `LegacyCursor`; the gateway answers with an in-band `event: reset` (reason
`cursor_version`) and starts those feeds at `from=`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shared.feeds import FEED_NAMES

VERSION = "v2"
LEGACY_VERSION = "v1"
NO_EPOCH = "-"
MAX_LENGTH = 512
_SEQ_LIMIT = 2**63

# ASCII digits only ([0-9], not \d, which takes any Unicode digit that int() reads too), and
# fullmatch, not `^...$` (`$` also matches before a trailing newline).
_EPOCH = re.compile(r"[0-9]{1,20}")
_SEQ = re.compile(r"[0-9]{1,19}")
# A version 1 part: <feed>.<epoch>.<ms>-<n>.<seq> (its epochs were random text).
_V1_PART = re.compile(r"([a-z_]{1,32})\.([A-Za-z0-9_-]{1,64})\.[0-9]{1,20}-[0-9]{1,20}\.[0-9]{1,19}")


class CursorError(ValueError):
    """A cursor that cannot be used; the message says why."""


class LegacyCursor(Exception):
    """A well-formed version 1 cursor: answered in-band, never a 400."""

    def __init__(self, text: str, feeds: tuple[str, ...]) -> None:
        super().__init__(f"a {LEGACY_VERSION} cursor for {', '.join(feeds)}")
        self.text = text
        self.feeds = feeds


@dataclass(frozen=True, slots=True)
class Position:
    """Where a subscriber is in one feed: after the entry `seq` of `epoch`."""

    epoch: str
    seq: int

    @property
    def entry_id(self) -> str:
        """The Redis stream entry id of that entry (`0-0` before the first)."""
        return f"{self.seq}-0"

    def text(self, feed: str) -> str:
        return f"{feed}.{self.epoch}.{self.seq}"


def origin(epoch: str) -> Position:
    """Before the first entry of `epoch`."""
    return Position(epoch, 0)


def format(positions: Mapping[str, Position], feeds: Iterable[str]) -> str:
    return VERSION + ":" + ",".join(positions[f].text(f) for f in feeds)


def around(positions: Mapping[str, Position], feeds: Sequence[str], feed: str) -> tuple[bytes, bytes]:
    """`format(positions, feeds)` cut around `feed`'s seq, as bytes: `head + b"%d" % seq +
    tail` is the cursor with `feed` moved to `seq` of its epoch. For a run of one feed's
    entries (a catch-up batch): one join for the run instead of one per entry."""
    i = feeds.index(feed)
    head = "".join(positions[f].text(f) + "," for f in feeds[:i])
    tail = "".join("," + positions[f].text(f) for f in feeds[i + 1 :])
    return f"{VERSION}:{head}{feed}.{positions[feed].epoch}.".encode(), tail.encode()


def parse(text: str) -> dict[str, Position]:
    """The positions a cursor names, by feed. Raises CursorError naming what is wrong, or
    LegacyCursor for a well-formed version 1 cursor."""
    text = text.strip()
    if not text:
        raise CursorError("the cursor is empty")
    if len(text) > MAX_LENGTH:
        raise CursorError(f"the cursor is longer than {MAX_LENGTH} characters")
    version, sep, body = text.partition(":")
    if not sep:
        raise CursorError(f"expected `{VERSION}:<feed>.<epoch>.<seq>[,...]`, got {_show(text)}")
    if version == LEGACY_VERSION:
        raise _legacy(text, body)
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
        epoch, dot2, seq = rest.partition(".") if dot else ("", "", "")
        if not dot2 or "." in seq:
            raise CursorError(f"expected `{feed}.<epoch>.<seq>`, got {_show(part)}")
        if epoch != NO_EPOCH and not _EPOCH.fullmatch(epoch):
            raise CursorError(f"bad epoch {_show(epoch)} for {feed}: expected digits (ms) or `-`")
        if not _SEQ.fullmatch(seq) or int(seq) >= _SEQ_LIMIT:
            raise CursorError(f"bad seq {_show(seq)} for {feed}: expected a non-negative integer")
        if epoch == NO_EPOCH and int(seq) != 0:
            raise CursorError(f"{feed} has no epoch (`-`) yet names an entry: only `{feed}.-.0` is valid")
        positions[feed] = Position(epoch, int(seq))
    return positions


def _legacy(text: str, body: str) -> Exception:
    """LegacyCursor for a well-formed version 1 cursor, else a CursorError."""
    feeds: list[str] = []
    for part in body.split(","):
        match = _V1_PART.fullmatch(part)
        if not match or match[1] not in FEED_NAMES or match[1] in feeds:
            return CursorError(
                f"unreadable {LEGACY_VERSION} cursor part {_show(part)}; this gateway reads {VERSION} "
                f"cursors (`{VERSION}:<feed>.<epoch>.<seq>[,...]`)"
            )
        feeds.append(match[1])
    return LegacyCursor(text, tuple(f for f in FEED_NAMES if f in feeds))


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
