"""`fanout ingest` (or `python -m services.ingestor`): NATS JetStream -> Redis streams."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.ingestor.consumer import Ingestor
from services.ingestor.jetstream import JetStreamUnavailable, LegacyStreamBusy
from services.ingestor.settings import IngestorSettings
from shared import logs
from shared.connections import redis_client
from shared.lifecycle import install_stop_signals
from shared.monitoring import OpsServer

log = logging.getLogger("services.ingestor")

DESCRIPTION = """\
Pull each feed from its own JetStream stream (<FANOUT_JS_STREAM>_<feed>, created or
updated at start) through a durable pull consumer, decode each protobuf payload, and
append it to its feed's Redis stream exactly once, at entry id <seq>-0 where seq is the
JetStream stream sequence (dedup key + XADD + meta in one Lua script per batch). Acks
NATS only after Redis answered. An undecodable or oversized payload keeps its seq as a
malformed entry (error, payload_b64). If Redis lost entries (restart, failover, DEL),
the hole is filled from JetStream with the same ids before the batch in hand.
SIGTERM finishes the batch in flight, acks it and exits 0.

Redis keys (prefix FANOUT_KEY_PREFIX): <prefix>:{<feed>}:stream (XRANGE it by seq),
<prefix>:{<feed>}:meta (epoch, seq, first_seq, last_id), <prefix>:{<feed>}:seen:<epoch>:<seq/128>
(dedup, FANOUT_DEDUP_TTL); the feeds are execution and sport_event.

Ops endpoints: /healthz /readyz /metrics on FANOUT_INGEST_HTTP.
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    IngestorSettings.add_arguments(parser)


async def serve(settings: IngestorSettings, stop: asyncio.Event) -> int:
    """Run the ingestor with its ops endpoints until `stop` is set; the exit code."""
    redis = redis_client(settings.redis_url)
    ingestor = Ingestor(settings, redis, stop)
    host, port = settings.http
    ops = OpsServer(host, port, {"nats": ingestor.nats_ready, "redis": ingestor.redis_ready})
    try:
        await ops.start()
    except OSError as exc:
        log.error(
            "cannot listen for the ops endpoints; set FANOUT_INGEST_HTTP to a free HOST:PORT",
            extra={"http": f"{host}:{port}", "error": str(exc)},
        )
        await redis.aclose()
        return 1
    try:
        await ingestor.run()
    except (JetStreamUnavailable, LegacyStreamBusy) as exc:
        log.error(str(exc))
        return 1
    finally:
        await ops.stop()
        await redis.aclose()
    return 0


def run(args: argparse.Namespace) -> int:
    settings = IngestorSettings.from_args(args)
    logs.configure("ingestor", settings.log_format, settings.log_level)

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        return await serve(settings, stop)

    return asyncio.run(main())


if __name__ == "__main__":
    from fanout.cli import main as cli_main

    sys.exit(cli_main(["ingest", *sys.argv[1:]]))
