"""shared/catalogue.py against the real PostgreSQL, on the schema the archiver migrates."""

from __future__ import annotations

import asyncpg

from services.archiver.store import migrate
from shared.catalogue import _queries, archived_top
from shared.settings import Settings

E1, E2 = "1795000000000", "1795086400000"


_TYPED = {
    "sport_event": ("sport, match_title, data_event", "'GOLF', 'm', 'e'"),
    "execution": ("symbol, market, price, quantity, execution_epoch, state_symbol", "'A', 'B', 1, 1, 1, 'C'"),
}


async def _rows(pg: asyncpg.Connection, schema: str, feed: str, epoch: str, seqs: list[int]) -> None:
    names, values = _TYPED[feed]
    await pg.executemany(
        f'INSERT INTO "{schema}".{feed} (message_id, epoch, seq, stream_id, entry_ms, entry_n, broker_time,'
        f" ingest_time, {names}, message)"
        f" VALUES ($1, $2, $3::bigint, $3::text || '-0', $3::bigint, 0, now(), now(), {values}, '{{}}')",
        [(f"{epoch}.{seq}", epoch, seq) for seq in seqs],
    )


async def _dead(pg: asyncpg.Connection, schema: str, source: str, feed: str, epoch: str, seq: int) -> None:
    await pg.execute(
        f'INSERT INTO "{schema}".dead_letter (source, feed, message_id, stream_id, error, epoch, seq)'
        " VALUES ($1, $2, $3, $4, 'e', $5, $6)",
        source,
        feed,
        f"{epoch}.{seq}",
        f"{seq}-0",
        epoch,
        seq,
    )


async def test_archived_top_is_the_end_of_the_first_contiguous_run(
    base_settings: Settings, pg: asyncpg.Connection
) -> None:
    schema = base_settings.db_schema
    await migrate(pg, schema)
    assert await archived_top(pg, schema, "sport_event", E1) == 0  # nothing archived
    assert await archived_top(pg, schema, "sport_event", E1, after=40) == 40
    # E1: 1..10 rows, 11 malformed (ingestor), 12 poison (archiver), 13 row; 14 not yet
    # archived (a sibling batch holds it); 15..20 rows.
    await _rows(pg, schema, "sport_event", E1, [*range(1, 11), 13, *range(15, 21)])
    await _dead(pg, schema, "ingestor", "sport_event", E1, 11)
    await _dead(pg, schema, "archiver", "sport_event", E1, 12)
    # Noise that must not count: another feed's dead letter at seq 14, another epoch,
    # an old-layout dead letter without a position.
    await _dead(pg, schema, "ingestor", "execution", E1, 14)
    await _rows(pg, schema, "sport_event", E2, [1, 2, 3])
    await pg.execute(
        f'INSERT INTO "{schema}".dead_letter (source, feed, message_id, error)'
        " VALUES ('ingestor', $1, $2, 'e')",
        "sport_event",
        "ab12.14",
    )
    assert await archived_top(pg, schema, "sport_event", E1) == 13
    assert await archived_top(pg, schema, "sport_event", E2) == 3
    assert await archived_top(pg, schema, "execution", E1) == 14  # its run starts where its rows start
    assert await archived_top(pg, schema, "sport_event", E1, after=13) == 13  # 14 is not archived
    assert await archived_top(pg, schema, "sport_event", E1, after=14) == 20
    assert await archived_top(pg, schema, "sport_event", E1, after=5) == 13
    await _rows(pg, schema, "sport_event", E1, [14])
    assert await archived_top(pg, schema, "sport_event", E1) == 20
    # Rows that start late (JetStream dropped the first ones before they were archived).
    await _rows(pg, schema, "execution", E2, [500, 501, 502, 504])
    assert await archived_top(pg, schema, "execution", E2) == 502


async def test_archived_top_reads_long_runs_in_chunks_in_index_order(
    base_settings: Settings, pg: asyncpg.Connection
) -> None:
    schema = base_settings.db_schema
    await migrate(pg, schema)
    # 25,000 rows with a hole at 22,222 and dead letters inside: three chunks of reads.
    await _rows(pg, schema, "sport_event", E1, [s for s in range(1, 25_001) if s % 1000 and s != 22_222])
    for seq in range(1000, 25_001, 1000):
        await _dead(pg, schema, "ingestor", "sport_event", E1, seq)
    await pg.execute(f'ANALYZE "{schema}".sport_event')
    assert await archived_top(pg, schema, "sport_event", E1) == 22_221
    assert await archived_top(pg, schema, "sport_event", E1, after=22_222) == 25_000
    low, rows, dead = _queries(schema, "sport_event")
    for sql, args in ((low, (E1, 0, "sport_event")), (rows, (E1, 0)), (dead, (E1, 0, "sport_event"))):
        plan = "\n".join(r[0] for r in await pg.fetch(f"EXPLAIN (COSTS OFF) {sql}", *args))
        assert "Index" in plan and "Sort" not in plan, plan  # the index, in order, no sort
