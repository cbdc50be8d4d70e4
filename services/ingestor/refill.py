"""What Redis lost, read again from JetStream (contract v2, section 2).

A feed's Redis stream is contiguous: the Lua script appends seq N only right after
N-1. When Redis has lost writes (a restart without persistence, a failover to a replica
that lagged, eviction, a DEL) the script answers "hole" for the batch in hand, with the
stream's top. The ingestor then reads the missing seqs from JetStream, which still holds
them (acked or not: a stream keeps its messages for FANOUT_JS_MAX_AGE), and appends them
at the same seqs, with the same message ids, before the batch: every cursor a client
holds stays valid, and nothing is renumbered.

- top > 0: the missing range is top+1 .. (first seq of the batch) - 1. If JetStream no
  longer holds its start either (the seqs aged out, or were discarded by a stream limit,
  before any ingestor wrote them: the ingestors were down longer than JetStream keeps
  messages), nobody holds them: once the catalogue holds every seq Redis still has, the
  Redis stream is dropped and started again at JetStream's first retained seq (readers
  see a gap there, the only one possible). Until then the batch waits (nothing unarchived
  is ever dropped).
- top = 0 (the stream is missing or empty: Redis lost everything of this feed): the
  stream is rebuilt from S = the first seq not yet archived (what lies below S is in
  PostgreSQL), passed to the script as `start`. S comes from the catalogue (the
  contiguous archived top of the feed's table and its dead_letter rows for the epoch,
  + 1), bounded below by JetStream's first retained seq; if PostgreSQL cannot be read
  within a few seconds, S is JetStream's first retained seq (everything retained).

Several ingestors may fill the same hole at once: each append is a duplicate for all
but one, and the script's contiguity keeps the stream exact.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import nats
from nats.aio.client import Client as NATS

from services.ingestor import jetstream
from services.ingestor.jetstream import StreamHandle, parse_ack_subject
from services.ingestor.writer import Delivery
from shared import catalogue
from shared.lifecycle import Backoff

log = logging.getLogger(__name__)

# How long one read of the catalogue may take.
CATALOGUE_TIMEOUT = 3.0
# How long the catalogue is retried (a PostgreSQL restart) before the rebuild starts
# from JetStream's first retained seq instead: that fallback appends everything JetStream
# retains again, which takes far longer than waiting for a restart.
CATALOGUE_PATIENCE = 20.0


async def read_range(
    nc: NATS, handle: StreamHandle, first: int, last: int, chunk: int
) -> AsyncIterator[list[Delivery]]:
    """The messages first..last of a feed's stream, in order, `chunk` at a time; stops
    early when the stream holds no more of them (the caller sees the hole again)."""
    js = nc.jetstream(timeout=5.0)
    async with jetstream.reader(js, handle.stream, "refill", first) as sub:
        seq = first
        while seq <= last:
            try:
                msgs = await sub.fetch(min(chunk, last - seq + 1), timeout=2)
            except nats.errors.TimeoutError:
                return  # nothing more retained
            out = []
            for m in msgs:
                s = int(m.metadata.sequence.stream)
                if s > last:
                    break
                out.append(Delivery(m.subject, m.data, s, 1, parse_ack_subject(m.reply)[2], m.reply))
            if not out:
                return
            yield out
            seq = out[-1].stream_seq + 1


async def rebuild_start(nc: NATS, database_url: str, schema: str, handle: StreamHandle) -> int:
    """S: where a feed's emptied Redis stream starts again (see the module docstring).

    The catalogue is retried for CATALOGUE_PATIENCE (PostgreSQL restarting); only if it
    stays unreadable does the rebuild start at JetStream's first retained seq."""
    retained = await jetstream.first_seq(nc, handle)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CATALOGUE_PATIENCE
    backoff = Backoff(base=0.2, cap=2.0)
    while True:
        try:
            return await archived_top(database_url, schema, handle, retained - 1) + 1
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = exc
        delay = backoff.next_delay()
        if loop.time() + delay >= deadline:
            break
        await asyncio.sleep(delay)  # a retry delay: nothing to await for PostgreSQL's return
    log.warning(
        "the catalogue cannot be read: rebuilding the Redis stream from JetStream's first retained seq",
        extra={
            "feed": handle.feed,
            "epoch": handle.epoch,
            "start": retained,
            "waited_s": CATALOGUE_PATIENCE,
            "error": str(error) or type(error).__name__,
        },
    )
    return retained


async def archived_top(database_url: str, schema: str, handle: StreamHandle, after: int) -> int:
    """The catalogue's contiguous top of the feed's epoch from `after` + 1 (`after` when
    that seq is not archived), within CATALOGUE_TIMEOUT. Raises asyncpg's errors,
    OSError or TimeoutError when the catalogue cannot be read."""

    async def read() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return await catalogue.archived_top(conn, schema, handle.feed, handle.epoch, after=after)
        finally:
            await conn.close()

    return await asyncio.wait_for(read(), CATALOGUE_TIMEOUT)
