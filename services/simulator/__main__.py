"""`fanout feeds`: the command that runs the simulated upstream feeds."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from services.simulator.generator import DEFECTS, payloads
from services.simulator.publisher import Counts, publish_feed
from shared import logs
from shared.feeds import FEED_NAMES
from shared.lifecycle import install_stop_signals
from shared.monitoring import OpsServer
from shared.settings import Settings, SettingsError, nats_servers, parse_host_port, setting

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 10.0  # seconds to hand the buffered payloads to NATS at exit

DESCRIPTION = f"""\
Publish realistic protobuf `execution` and `event` messages on core NATS, as the upstream
feeds do, on the subjects <FANOUT_SUBJECT_PREFIX>execution and <FANOUT_SUBJECT_PREFIX>sport_event.

  fanout feeds                               a few messages per second per feed, until Ctrl-C
  fanout feeds --rate 20000 --count 1000000  a benchmark load: 1M messages per feed, then exit
  fanout feeds --malformed-share 0.01        1% bad payloads ({", ".join(DEFECTS)})
"""


def _optional_int(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise ValueError("expected a count of 0 or more (0: no limit)")
    return value or None


def _optional_host_port(text: str) -> tuple[str, int] | None:
    return parse_host_port(text) if text.strip() else None


@dataclass(frozen=True)
class SimulatorSettings(Settings):
    feeds: str = setting("FANOUT_FEEDS", ",".join(FEED_NAMES), "feeds to publish, comma-separated")
    rate: float = setting(
        "FANOUT_FEEDS_RATE", 3.0, "messages per second per feed (0: as fast as NATS takes them)"
    )
    count: int | None = setting(
        "FANOUT_FEEDS_COUNT", None, "messages per feed, then exit (0 or unset: run until stopped)",
        parse=_optional_int,
    )
    malformed_share: float = setting(
        "FANOUT_FEEDS_MALFORMED_SHARE", 0.0, "share (0..1) of the payloads that are malformed"
    )
    seed: int | None = setting(
        "FANOUT_FEEDS_SEED", None, "random seed, for a reproducible sequence", parse=int
    )
    http: tuple[str, int] | None = setting(
        "FANOUT_FEEDS_HTTP",
        None,
        "HOST:PORT of /healthz /readyz /metrics; if the port is taken, a free port is used and logged "
        "(unset: not served)",
        _optional_host_port,
    )

    @property
    def feed_list(self) -> list[str]:
        return [f.strip() for f in self.feeds.split(",") if f.strip()]

    def validate(self) -> None:
        super().validate()
        chosen = self.feed_list
        unknown = [f for f in chosen if f not in FEED_NAMES]
        if unknown or not chosen:
            known = ", ".join(FEED_NAMES)
            raise SettingsError(f"FANOUT_FEEDS={self.feeds!r}: expected one or more of {known}")
        if self.rate < 0:
            raise SettingsError(f"FANOUT_FEEDS_RATE={self.rate!r}: expected 0 or more messages per second")
        if not 0.0 <= self.malformed_share <= 1.0:
            raise SettingsError(f"FANOUT_FEEDS_MALFORMED_SHARE={self.malformed_share!r}: expected 0..1")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    SimulatorSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = SimulatorSettings.from_args(args)
    logs.configure("simulator", settings.log_format, settings.log_level)
    return asyncio.run(main(settings))


async def connect(url: str, stop: asyncio.Event) -> NATS | None:
    """Connect to NATS, retrying until it answers or `stop` is set (then None)."""

    async def error_cb(exc: Exception) -> None:
        log.warning("NATS connection error", extra={"url": url, "error": str(exc) or repr(exc)})

    connecting = asyncio.ensure_future(
        nats.connect(servers=nats_servers(url), error_cb=error_cb, max_reconnect_attempts=-1,
                     reconnect_time_wait=1, connect_timeout=2, name="fanout-feeds")
    )
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await connecting
    return None


async def main(settings: SimulatorSettings, stop: asyncio.Event | None = None) -> int:
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    nc = await connect(settings.nats_url, stop)
    if nc is None:
        log.info("stopped before NATS answered", extra={"url": settings.nats_url})
        return 0
    log.info(
        "publishing",
        extra={"feeds": settings.feed_list, "rate": settings.rate, "count": settings.count,
               "malformed_share": settings.malformed_share, "url": settings.nats_url},
    )
    counts = [Counts(feed) for feed in settings.feed_list]
    ops: OpsServer | None = None
    if settings.http is not None:

        async def nats_connected() -> bool:
            return bool(nc.is_connected)

        ops = OpsServer(*settings.http, {"nats": nats_connected})
        try:
            await ops.start()
        except OSError as exc:
            log.error("cannot listen for the ops endpoints; set FANOUT_FEEDS_HTTP to a free HOST:PORT",
                      extra={"http": settings.http, "error": str(exc)})
            await nc.close()
            return 1
    try:
        await asyncio.gather(
            *(
                publish_feed(
                    nc,
                    settings.subject(c.feed),
                    payloads(c.feed, seed=None if settings.seed is None else settings.seed + i,
                             malformed_share=settings.malformed_share),
                    c,
                    stop,
                    rate=settings.rate,
                    count=settings.count,
                )
                for i, c in enumerate(counts)
            )
        )
    finally:
        if ops is not None:
            await ops.stop()
        try:
            # Sends what is still buffered; bounded, for a NATS that is gone for good.
            await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT)
        except (TimeoutError, NatsError, OSError) as exc:
            log.warning("could not hand everything to NATS before exiting", extra={"error": repr(exc)})
            await nc.close()
    for c in counts:
        log.info(
            "published",
            extra={"feed": c.feed, "subject": settings.subject(c.feed), "published": c.published,
                   "malformed": c.malformed, "defects": c.defects, "failed": c.failed,
                   "seconds": round(c.seconds, 3), "msgs_per_s": round(c.rate)},
        )
    # Stopped by a signal: 0. A --count run that could not publish all of its count: 1.
    return 1 if settings.count is not None and any(c.failed for c in counts) else 0
