"""Reading the PostgreSQL catalogue by position (the archiver owns the schema: see
services/archiver/store.py for the tables and their migrations).

Contract v2: every seq of a feed's epoch is in exactly one of the feed's table (`epoch`,
`seq`, unique together) or `dead_letter` (`feed`, `epoch`, `seq`: a payload the ingestor
could not decode, or an entry the archiver could not store). So "archived" means "in
the union of the two".
"""

from __future__ import annotations

from typing import Any


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted (schema names come from the settings)."""
    return '"' + name.replace('"', '""') + '"'


_CHUNK = 10_000


def _queries(schema: str, feed: str) -> tuple[str, str, str]:
    """(the lowest seq above $2, the feed table's next seqs, dead_letter's next seqs) for
    one epoch: $1 epoch, $2 after, $3 feed (dead_letter only). Each reads an index in seq
    order (feed table: unique (epoch, seq); dead_letter: (feed, epoch, seq)), with
    ORDER BY ... LIMIT so that the planner keeps to the index whatever the table's size."""
    s, t = quote_ident(schema), f"{quote_ident(schema)}.{quote_ident(feed)}"
    rows = f"SELECT seq FROM {t} WHERE epoch = $1 AND seq > $2 ORDER BY epoch, seq LIMIT {_CHUNK}"
    dead = (
        f"SELECT seq FROM {s}.dead_letter WHERE feed = $3 AND epoch = $1 AND seq > $2"
        f" ORDER BY feed, epoch, seq LIMIT {_CHUNK}"
    )
    low = (
        f"SELECT least((SELECT seq FROM {t} WHERE epoch = $1 AND seq > $2 ORDER BY epoch, seq LIMIT 1),"
        f" (SELECT seq FROM {s}.dead_letter WHERE feed = $3 AND epoch = $1 AND seq > $2"
        " ORDER BY feed, epoch, seq LIMIT 1))"
    )
    return low, rows, dead


async def archived_top(conn: Any, schema: str, feed: str, epoch: str, *, after: int | None = None) -> int:
    """The contiguous archived top of `feed` in `epoch`: the highest seq T such that
    every seq of the run that starts the epoch's catalogue is archived (a row of the
    feed's table or a dead_letter row of that feed and epoch, any source). 0 when
    nothing of the epoch is archived. The first seq not archived yet is T + 1.

    `after`: the run starts at `after + 1` instead of at the epoch's lowest archived seq
    (returns `after` when `after + 1` is not archived). The run is read in seq order,
    10,000 seqs per query, up to its first hole, so the cost grows with the run's
    length: pass `after` (e.g. JetStream's first retained seq - 1) to bound it.

    `conn` is an asyncpg connection (or pool). Raises asyncpg's errors when the catalogue
    cannot be read (no schema yet, a catalogue not migrated to contract v2, ...).
    """
    low_sql, rows_sql, dead_sql = _queries(schema, feed)
    low = await conn.fetchval(low_sql, epoch, 0 if after is None else after, feed)
    if low is None:
        return 0 if after is None else after
    if after is None:
        after = int(low) - 1
    elif int(low) != after + 1:
        return after
    top = after
    while True:
        feed_seqs = [int(r[0]) for r in await conn.fetch(rows_sql, epoch, top)]
        dead_seqs = [int(r[0]) for r in await conn.fetch(dead_sql, epoch, top, feed)]
        # Seqs past a full chunk's last one were not read from that source: stop there.
        limit = min(
            [chunk[-1] for chunk in (feed_seqs, dead_seqs) if len(chunk) == _CHUNK],
            default=None,
        )
        for seq in sorted(feed_seqs + dead_seqs):
            if limit is not None and seq > limit:
                break
            if seq > top + 1:
                return top  # the hole
            top = max(top, seq)  # (a seq in both tables is not a hole)
        if limit is None:
            return top
