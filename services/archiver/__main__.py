"""`fanout archive`: Redis streams -> the PostgreSQL catalogue, each message exactly once."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.archiver.service import Archiver
from services.archiver.settings import ArchiverSettings
from shared import lifecycle, logs
from shared.monitoring import OpsServer

log = logging.getLogger("services.archiver")

DESCRIPTION = """\
Archive every feed stream from Redis into the PostgreSQL catalogue through a consumer
group: batches stored in one transaction, acknowledged only after the commit,
redeliveries skipped by message id and position (epoch, seq), so each message gets
exactly one row (malformed payloads one dead_letter row). Creates and upgrades the
catalogue schema at start. Several archivers can run side by side; entries left by a
dead one are claimed after FANOUT_ARCHIVE_CLAIM_IDLE. A stream that vanishes (Redis
lost it) gets its consumer group back and is archived on. Trims each stream to the hot
window: archived entries older than FANOUT_RETENTION (by broker_time) or beyond
FANOUT_STREAM_MAXLEN. Ops endpoints: /healthz /readyz /metrics on FANOUT_ARCHIVE_HTTP.
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    ArchiverSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = ArchiverSettings.from_args(args)
    logs.configure("archiver", settings.log_format, settings.log_level)
    status = 0

    async def main(stop: asyncio.Event) -> None:
        nonlocal status
        status = await serve(settings, stop)

    lifecycle.run(main)
    return status


async def serve(settings: ArchiverSettings, stop: asyncio.Event) -> int:
    archiver = Archiver(settings)
    host, port = settings.http
    ops = OpsServer(host, port, {"redis": archiver.redis_ok, "postgres": archiver.postgres_ok})
    try:
        await ops.start()
    except OSError as exc:
        log.error("cannot serve the ops endpoints", extra={"address": f"{host}:{port}", "error": str(exc)})
        return 1
    try:
        await archiver.run(stop)
    except Exception:
        log.exception("archiver failed")
        return 1
    finally:
        await ops.stop()
    log.info("archiver stopped")
    return 0


if __name__ == "__main__":
    from fanout.cli import main as cli_main

    sys.exit(cli_main(["archive", *sys.argv[1:]]))
