"""The catalogue in PostgreSQL: versioned migrations and idempotent batch inserts.

Tables (in the schema `Settings.db_schema`): `execution` and `sport_event` (one row
per message, keyed by message id), `dead_letter` (what could not be decoded or stored)
and `schema_migrations`. See `MIGRATIONS` for the columns and indexes.

Every insert is idempotent: a redelivered entry conflicts on its message id (or on its
position, (epoch, seq)) and is skipped, so storing a batch twice leaves one row per
message.

Contract v2 (migration 2): a feed row's position is its JetStream (epoch, seq), unique
together; `entry_ms`/`entry_n` (the stream id `<seq>-0` split) are kept as plain
columns, no longer unique (a new epoch restarts the seqs). `dead_letter` rows carry the
`epoch` and `seq` of the entry they stand for, so every seq of an epoch is in exactly
one of the feed's table or `dead_letter` (`shared/catalogue.py` reads it that way).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Final

import asyncpg

from services.archiver.rows import DEAD_LETTER_COLUMNS, Row, columns
from shared.catalogue import quote_ident
from shared.connections import create_database_if_missing
from shared.feeds import FEED_NAMES

log = logging.getLogger(__name__)

_COMMON_DDL = """
    message_id text PRIMARY KEY,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    stream_id text NOT NULL,
    entry_ms bigint NOT NULL,
    entry_n bigint NOT NULL,
    broker_time timestamptz NOT NULL,
    ingest_time timestamptz NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now(),
"""


def _feed_table(name: str, typed: str) -> str:
    return f"""
CREATE TABLE {{s}}.{name} ({_COMMON_DDL}{typed},
    message jsonb NOT NULL
);
CREATE UNIQUE INDEX {name}_entry_idx ON {{s}}.{name} (entry_ms, entry_n);
CREATE INDEX {name}_broker_time_idx ON {{s}}.{name} (broker_time);
CREATE INDEX {name}_epoch_seq_idx ON {{s}}.{name} (epoch, seq);
"""


# (version, SQL with {s} for the quoted schema). Append only: never edit a released one.
MIGRATIONS: Final[list[tuple[int, str]]] = [
    (
        1,
        _feed_table(
            "execution",
            """    symbol text NOT NULL,
    market text NOT NULL,
    price real NOT NULL,
    quantity real NOT NULL,
    execution_epoch bigint NOT NULL,
    state_symbol text NOT NULL""",
        )
        + _feed_table(
            "sport_event",
            """    sport text NOT NULL,
    match_title text NOT NULL,
    data_event text NOT NULL""",
        )
        + """
CREATE TABLE {s}.dead_letter (
    id bigserial PRIMARY KEY,
    source text NOT NULL CHECK (source IN ('ingestor', 'archiver')),
    feed text NULL,
    message_id text NULL,
    subject text NULL,
    broker_seq bigint NULL,
    stream_id text NULL,
    error text NOT NULL,
    payload bytea NULL,
    fields jsonb NULL,
    broker_time timestamptz NULL,
    ingest_time timestamptz NULL,
    archived_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, message_id)
);
CREATE INDEX dead_letter_stream_idx ON {s}.dead_letter (feed, stream_id);
CREATE INDEX dead_letter_archived_at_idx ON {s}.dead_letter (archived_at);
""",
    ),
    (
        2,
        # Contract v2: positions come from JetStream. Fails (and the archiver keeps
        # retrying, logging the error) if old rows hold the same (epoch, seq) twice.
        "".join(
            f"""
DROP INDEX {{s}}.{name}_entry_idx;
DROP INDEX {{s}}.{name}_epoch_seq_idx;
CREATE UNIQUE INDEX {name}_epoch_seq_key ON {{s}}.{name} (epoch, seq);
"""
            for name in ("execution", "sport_event")
        )
        + """
ALTER TABLE {s}.dead_letter ADD COLUMN epoch text NULL, ADD COLUMN seq bigint NULL;
CREATE INDEX dead_letter_position_idx ON {s}.dead_letter (feed, epoch, seq);
""",
    ),
]

# How the archiver's connections show in pg_stat_activity.
APPLICATION_NAME: Final = "fanout-archiver"

# Errors caused by the data of a row, not by the server: the row is poison. asyncpg
# raises ValueError/OverflowError/TypeError when it cannot encode a value (COPY).
DATA_ERRORS: Final = (
    ValueError,
    OverflowError,
    TypeError,
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)
# Errors that mean "the server is unreachable or restarting": retry later. asyncpg's
# client-side errors belong here: InterfaceError and InternalClientError (not an
# InterfaceError) are what a connection whose server went away mid-conversation raises,
# e.g. "cannot switch to state 15; another operation (2) is in progress" when the
# server's FATAL (shutdown, pg_terminate_backend) was read before the socket closed.
TRANSIENT_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresError,
)
STORE_ERRORS: Final = (*DATA_ERRORS, *TRANSIENT_ERRORS)


def is_data_error(exc: BaseException) -> bool:
    return isinstance(exc, DATA_ERRORS)


def leaves_connection_clean(exc: BaseException) -> bool:
    """True if a connection that raised `exc` is in a known state and can be reused: only
    an error the server reported about the data (its transaction was rolled back by the
    server's error and the `transaction()` block). Anything else (client-side errors, a
    lost or half-read connection, a timeout, a cancellation) leaves it in an unknown state."""
    return isinstance(exc, asyncpg.PostgresError) and is_data_error(exc)


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"fanout.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Bring `schema` up to the latest version; returns the versions applied now.

    One transaction holding an advisory lock per schema: two archivers starting at
    once apply each migration once, the second finding nothing to do.
    """
    s = quote_ident(schema)
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.schema_migrations "
            "(version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {s}.schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql.replace("{s}", s))
            await conn.execute(f"INSERT INTO {s}.schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    if applied:
        log.info("catalogue migrated", extra={"schema": schema, "versions": applied})
    return applied


def _count(status: str) -> int:
    """Rows from a command status such as `INSERT 0 42`."""
    return int(status.rsplit(" ", 1)[-1])


class Store:
    """A connection pool to the catalogue and the statements the archiver runs."""

    def __init__(self, database_url: str, schema: str, *, method: str = "copy", pool_size: int = 8) -> None:
        if method not in {"copy", "staged", "unnest", "executemany"}:
            raise ValueError(f"unknown insert method {method!r}")
        self.database_url = database_url
        self.schema = schema
        self.method = method
        self.pool_size = pool_size
        self._s = quote_ident(schema)
        self._pool: asyncpg.Pool | None = None
        self._insert_sql = {feed: self._feed_insert_sql(feed) for feed in FEED_NAMES}

    async def open(self) -> None:
        """Connect (raises if the server is unreachable), create the database if the server
        lacks it, and migrate the schema."""
        if self._pool is None:
            await create_database_if_missing(self.database_url)
            self._pool = await asyncpg.create_pool(
                self.database_url,
                min_size=1,
                max_size=self.pool_size,
                command_timeout=60,
                timeout=10,
                server_settings={"application_name": APPLICATION_NAME},
            )
        async with self.connection() as conn:
            await migrate(conn, self.schema)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Store.open() was not called")
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection that goes back to the pool only in a known state.

        If the block raises anything but a data error reported by the server, the
        connection is terminated, not reused: its protocol may be mid-way through a
        statement or have read a FATAL from a server going away (asyncpg's pool would
        hand it out again, and its next statement raises InternalClientError). If the
        block succeeded, a failure to reset the connection on release (the pool then
        terminates it) is logged, not raised: the work was committed.
        """
        conn = await self.pool.acquire()
        try:
            yield conn
        except BaseException as exc:
            if not leaves_connection_clean(exc):
                conn.terminate()  # also hands its slot back to the pool
            with contextlib.suppress(Exception):
                await self.pool.release(conn)  # a no-op once terminated
            raise
        try:
            await self.pool.release(conn)
        except Exception as exc:  # noqa: BLE001 - the pool terminated it; the work is done
            log.warning(
                "postgres connection could not be reset after use; discarded",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )

    async def ping(self) -> bool:
        async with self.connection() as conn:
            return bool(await conn.fetchval("SELECT 1", timeout=2))

    def _feed_insert_sql(self, feed: str) -> str:
        cols = columns(feed)
        names = ", ".join(cols)
        if self.method in {"copy", "staged"}:
            source = f"SELECT {names} FROM pg_temp._archive_{feed}"
        elif self.method == "unnest":
            types = _column_types(feed)
            arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, 1))
            source = f"SELECT * FROM unnest({arrays})"
        else:
            source = "VALUES (" + ", ".join(f"${i}" for i in range(1, len(cols) + 1)) + ")"
        # No conflict target: a row already there by message id (a redelivery) or by
        # position (epoch, seq) is skipped alike; the second is logged (_seq_conflicts).
        return f"INSERT INTO {self._s}.{feed} ({names}) {source} ON CONFLICT DO NOTHING"

    async def insert_feed(self, feed: str, rows: Sequence[Row]) -> int:
        """Insert rows of `feed` in one transaction; returns how many were new."""
        return (await self.insert_entries(feed, rows, ()))[0]

    async def insert_entries(
        self, feed: str, rows: Sequence[Row], dead_letters: Sequence[Row]
    ) -> tuple[int, int]:
        """Insert rows of `feed` and dead-letter rows (the feed's malformed entries) in
        one transaction; returns how many of each were new (the others were already
        there). Raises a DATA_ERRORS error if a row is bad.

        `copy` (the default): COPY straight into the table, the fast path when nothing
        is there yet; if a row is already there (a redelivery), the transaction is
        rolled back and the batch goes the `staged` way: COPY into a temporary table,
        then INSERT ... SELECT ... ON CONFLICT DO NOTHING.
        """
        if not rows and not dead_letters:
            return 0, 0
        if self.method == "copy" and rows:
            try:
                async with self.connection() as conn, conn.transaction():
                    await conn.copy_records_to_table(
                        feed, records=rows, columns=columns(feed), schema_name=self.schema
                    )
                    dead = await self._insert_dead_letters(conn, dead_letters)
                return len(rows), dead
            except asyncpg.UniqueViolationError:
                pass  # some are there already: skip those
        async with self.connection() as conn, conn.transaction():
            inserted = await self._insert_feed_rows(conn, feed, rows) if rows else 0
            return inserted, await self._insert_dead_letters(conn, dead_letters)

    async def _insert_feed_rows(self, conn: asyncpg.Connection, feed: str, rows: Sequence[Row]) -> int:
        sql = self._insert_sql[feed]
        if self.method in {"copy", "staged"}:
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS _archive_{feed} "
                f"(LIKE {self._s}.{feed} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            await conn.copy_records_to_table(
                f"_archive_{feed}", records=rows, columns=columns(feed), schema_name="pg_temp"
            )
            inserted = _count(await conn.execute(sql))
            if inserted < len(rows):
                await self._seq_conflicts(conn, feed)
            return inserted
        if self.method == "unnest":
            return _count(await conn.execute(sql, *zip(*rows, strict=True)))
        # executemany reports no row counts: skipped duplicates are counted as
        # inserted. For comparison in bench/archive.py only.
        await conn.executemany(sql, rows)
        return len(rows)

    async def _seq_conflicts(self, conn: asyncpg.Connection, feed: str) -> None:
        """Log the staged rows skipped because another message holds their (epoch, seq):
        not a redelivery (that one has the same message id) but two messages claiming one
        position, which contract v2 rules out (message id = `<epoch>.<seq>`)."""
        clash = await conn.fetch(
            f"SELECT t.message_id, t.epoch, t.seq, f.message_id AS held_by FROM pg_temp._archive_{feed} t"
            f" JOIN {self._s}.{feed} f ON f.epoch = t.epoch AND f.seq = t.seq"
            " WHERE f.message_id <> t.message_id LIMIT 20"
        )
        if clash:
            log.error(
                "rows skipped: their (epoch, seq) is held by another message",
                extra={
                    "feed": feed,
                    "rows": [
                        f"{r['message_id']} at {r['epoch']}/{r['seq']} (held by {r['held_by']})"
                        for r in clash
                    ],
                },
            )

    async def insert_dead_letters(self, rows: Sequence[Row]) -> int:
        """Insert dead-letter rows in one transaction; a row already there (same source
        and message id, or same source, feed, epoch and stream entry) is skipped."""
        if not rows:
            return 0
        async with self.connection() as conn, conn.transaction():
            return await self._insert_dead_letters(conn, rows)

    async def _insert_dead_letters(self, conn: asyncpg.Connection, rows: Sequence[Row]) -> int:
        if not rows:
            return 0
        names = ", ".join(DEAD_LETTER_COLUMNS)
        params = ", ".join(f"${i}::{t}" for i, t in enumerate(_DEAD_LETTER_TYPES, 1))
        sql = (
            f"INSERT INTO {self._s}.dead_letter ({names}) SELECT {params} "
            f"WHERE NOT EXISTS (SELECT 1 FROM {self._s}.dead_letter "
            "WHERE source = $1 AND feed IS NOT DISTINCT FROM $2 AND stream_id = $6"
            " AND epoch IS NOT DISTINCT FROM $12) "
            "ON CONFLICT (source, message_id) DO NOTHING"
        )
        inserted = 0
        for row in rows:
            inserted += _count(await conn.execute(sql, *row))
        return inserted

    async def count(self, table: str) -> int:
        async with self.connection() as conn:
            return int(await conn.fetchval(f"SELECT count(*) FROM {self._s}.{quote_ident(table)}"))


_DEAD_LETTER_TYPES: Final = (
    "text",
    "text",
    "text",
    "text",
    "bigint",
    "text",
    "text",
    "bytea",
    "jsonb",
    "timestamptz",
    "timestamptz",
    "text",
    "bigint",
)
_COMMON_TYPES: Final = ("text", "text", "bigint", "text", "bigint", "bigint", "timestamptz", "timestamptz")
_TYPED: Final[dict[str, tuple[str, ...]]] = {
    "execution": ("text", "text", "real", "real", "bigint", "text"),
    "sport_event": ("text", "text", "text"),
}


def _column_types(feed: str) -> tuple[str, ...]:
    return (*_COMMON_TYPES, *_TYPED[feed], "jsonb")
