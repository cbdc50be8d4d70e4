"""One gateway process: the Starlette app under uvicorn, on a socket bound before it
starts. `fanout gateway` runs this itself with one worker; with several, the supervisor
(`workers.py`) imports this module once and forks each worker from there, which then
calls `serve` with its `Group` (its slot and the supervisor's shared counts)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib.util
import logging
import signal
import socket
from types import FrameType

import uvicorn

from services.sse_gateway.app import create_app
from services.sse_gateway.protocol import StreamProtocol
from services.sse_gateway.settings import GatewaySettings
from services.sse_gateway.workers import Group
from shared.listening import BACKLOG

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn, with its exit signal also setting the app's one stop event, so open
    streams end (uvicorn waits for connections to close before the lifespan ends)."""

    def __init__(self, config: uvicorn.Config, stop: asyncio.Event) -> None:
        super().__init__(config)
        self.stop = stop
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        super().handle_exit(sig, frame)


# Python's cyclic garbage collector, tuned for thousands of long-lived streams. With the
# default thresholds (700, 10, 10) a collection runs every 700 new containers, and each
# stream set-up makes dozens, while every live stream adds objects that the older
# generations traverse again and again: in a reconnect storm of 10,000 streams the
# collector took about a third of the set-up's CPU (357-576 µs per stream, 236-403 with
# these). A stream's objects go by reference count, not by the collector, so collecting
# less often costs little memory (tests/integration/test_http_hostile.py: thousands of
# connections opened and dropped leave nothing behind, with these thresholds).
GC_THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    """Freeze what start-up made (imports, the app: never garbage, no longer traversed)
    and collect less often (GC_THRESHOLDS). No collection first: it found about 60
    garbage objects of 70,000 and took 45 ms of every start, which a restart's
    reconnecting crowd waits for."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _after_shutdown(sig: int, frame: FrameType | None) -> None:
    """The SIGTERM uvicorn re-raises after its graceful shutdown: already handled."""


def serve(settings: GatewaySettings, sock: socket.socket, group: Group | None = None) -> int:
    """Serve on `sock` (bound and listening on `settings.gateway_listen`'s host, before
    this module was imported: connections made during the import wait in its backlog
    instead of being refused) until SIGTERM (or SIGINT), then close it; 0 after a clean
    shutdown. In a `group` (a worker of a supervisor), `sock` is one of the port's
    SO_REUSEPORT sockets."""
    if group is not None and group.slot > 0:
        # The ops port is the first worker's; the others take a free one (logged).
        settings = dataclasses.replace(settings, gateway_ops=(settings.gateway_ops[0], 0))
    # Port 0 became a free port: the app logs (and serves) the port bound, not 0.
    bound = (settings.gateway_listen[0], sock.getsockname()[1])
    settings = dataclasses.replace(settings, gateway_listen=bound)
    app = create_app(settings)
    if group is not None:
        app.state.subscribers.shared = group.counts
    config = uvicorn.Config(
        app,
        host=settings.gateway_listen[0],
        port=settings.gateway_listen[1],
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=StreamProtocol if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        backlog=BACKLOG,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
    )
    server = _Server(config, app.state.stop)
    tune_gc()
    # uvicorn re-raises the exit signal once it has shut down; with the default handler
    # that would kill the process after a clean shutdown (exit -15 instead of 0).
    signal.signal(signal.SIGTERM, _after_shutdown)
    with sock:
        server.run([sock])
    if not server.started:
        log.error("gateway did not start", extra={"url": settings.listen_url()})
        return 1
    return 0
