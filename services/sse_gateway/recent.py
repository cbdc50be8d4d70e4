"""The hub's recent window of one feed: the last records it dispatched, for catch-up.

A subscriber that comes back (a reconnect, a restarted gateway, a drop to catch-up) is
most often a few entries behind the hub. Reading those from Redis costs a round trip
through the shared history pool per subscriber, and a crowd coming back at once queues
on that pool. The hub already built every record it dispatched (`history.Record`: the
entry's payload encoded once), so it keeps the last `limit` of them per feed, and a
subscriber behind by less than that takes its records from here, synchronously.

Invariant: the window holds records of ONE epoch, contiguous by seq (each one the
previous seq + 1), the newest being the last the hub dispatched. So when it holds
seq c+1 of the subscriber's epoch, the records it gives from there are exactly what
History would give (the handover rule by seq), and nothing can be missed between them
and the hub's live stream. A record that does not go on from the newest (another epoch,
a hole) starts the window again from that record; the hub also clears it on an epoch
change and on a hole (the members it sends to catch-up read History as before).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.sse_gateway.history import Record


class Recent:
    """At most `limit` records of one epoch, contiguous by seq (0: keeps nothing)."""

    __slots__ = ("_base", "_items", "epoch", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.epoch: str | None = None
        self._items: list[Record] = []
        self._base = 0  # index of the oldest record kept: trimming is amortized, not per add

    def __len__(self) -> int:
        return len(self._items) - self._base

    @property
    def first(self) -> int | None:
        """The oldest seq held, None when empty."""
        return self._items[self._base].seq if len(self) else None

    @property
    def last(self) -> int | None:
        """The newest seq held, None when empty."""
        return self._items[-1].seq if len(self) else None

    def clear(self) -> None:
        self.epoch = None
        self._items = []
        self._base = 0

    def add(self, epoch: str, record: Record) -> None:
        """The record the hub just dispatched: appended when it goes on from the newest in
        the same epoch; otherwise the window starts again from it."""
        if not self.limit:
            return
        if epoch != self.epoch or (len(self) and record.seq != self._items[-1].seq + 1):
            self.clear()
            self.epoch = epoch
        self._items.append(record)
        if len(self) > self.limit:
            self._base += 1
            if self._base >= self.limit:  # drop the trimmed head in one go, now and then
                del self._items[: self._base]
                self._base = 0

    def fill(self, epoch: str, records: Sequence[Record], upto: int) -> None:
        """Start again from `records` (oldest first), read when the reader started at seq
        `upto`: the contiguous run that ends exactly at `upto`, at most `limit` of them.
        Records that do not reach `upto` without a hole leave the window empty."""
        self.clear()
        if not self.limit or not records or records[-1].seq != upto:
            return
        start = len(records) - 1
        while start > 0 and records[start - 1].seq == records[start].seq - 1:
            start -= 1
        start = max(start, len(records) - self.limit)
        self.epoch = epoch
        self._items = list(records[start:])

    def after(self, epoch: str, seq: int, limit: int) -> list[Record] | None:
        """The records of `epoch` after seq `seq` (at most `limit`, oldest first): `[]` when
        `seq` is the newest held; None when the window cannot answer (another epoch, or
        seq + 1 outside what it holds): ask History."""
        if epoch != self.epoch or not len(self):
            return None
        first = self._items[self._base].seq
        if not first - 1 <= seq <= self._items[-1].seq:
            return None
        start = self._base + seq + 1 - first
        return self._items[start : start + limit]
