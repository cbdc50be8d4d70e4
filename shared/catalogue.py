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


def _archived_seqs(schema: str, feed: str) -> str:
    """The seqs of one feed's epoch in the catalogue, above a seq: $1 epoch, $2 after,
    $3 feed. Both halves are index range scans ordered by seq (feed table: unique
    (epoch, seq); dead_letter: (feed, epoch, seq)), merged in order."""
    s = quote_ident(schema)
    return (
        f"SELECT seq FROM {s}.{quote_ident(feed)} WHERE epoch = $1 AND seq > $2"
        f" UNION ALL SELECT seq FROM {s}.dead_letter WHERE feed = $3 AND epoch = $1 AND seq > $2"
    )


async def archived_top(conn: Any, schema: str, feed: str, epoch: str, *, after: int | None = None) -> int:
    """The contiguous archived top of `feed` in `epoch`: the highest seq T such that
    every seq of the run that starts the epoch's catalogue is archived (a row of the
    feed's table or a dead_letter row of that feed and epoch). 0 when nothing of the
    epoch is archived. The first seq not archived yet is `archived_top(...) + 1`.

    `after`: start the run at `after + 1` instead of at the epoch's lowest archived seq
    (returns `after` when `after + 1` is not archived). The query reads the run in seq
    order and stops at its first hole, so its cost grows with the run's length: pass
    `after` (e.g. JetStream's first retained seq - 1) to bound it.

    `conn` is an asyncpg connection (or pool). Raises asyncpg's errors when the catalogue
    cannot be read (no schema yet, an archiver not migrated to contract v2, ...).
    """
    union = _archived_seqs(schema, feed)
    if after is None:
        low = await conn.fetchval(f"SELECT min(seq) FROM ({union}) u", epoch, 0, feed)
        if low is None:
            return 0
        after = int(low) - 1
    else:
        first = await conn.fetchval(f"SELECT min(seq) FROM ({union}) u", epoch, after, feed)
        if first is None or int(first) != after + 1:
            return after
    # The first seq of the run whose successor is not archived; the window is computed
    # lazily over the merged index scans, so this stops at the first hole.
    top = await conn.fetchval(
        f"SELECT seq FROM (SELECT seq, lead(seq) OVER (ORDER BY seq) AS next FROM ({union}) u) g"
        " WHERE next IS NULL OR next > seq + 1 ORDER BY seq LIMIT 1",
        epoch,
        after,
        feed,
    )
    return after if top is None else int(top)
