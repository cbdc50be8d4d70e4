"""`fanout gateway`: serve the feeds over Server-Sent Events (uvicorn + the Starlette app)."""

from __future__ import annotations

import argparse

from services.sse_gateway import workers
from services.sse_gateway.settings import GatewaySettings
from shared import logs
from shared.listening import bound_socket

DESCRIPTION = """\
Serve the feeds to subscribers over Server-Sent Events.

  curl -N 'http://127.0.0.1:8000/v1/stream?feeds=execution'
  curl -N -H 'Last-Event-ID: v2:execution.1795862595094.42' \\
       'http://127.0.0.1:8000/v1/stream?feeds=execution'

Every event's `id:` is a cursor; reconnecting with it resumes exactly after that event.
SIGTERM ends every stream cleanly and exits 0.

With --workers N (default: one per core) a supervisor binds the port and runs N worker
processes that share it, each with its own feed readers; a worker that dies is replaced
and its clients resume on the others (see services/sse_gateway/workers.py)."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    GatewaySettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = GatewaySettings.from_args(args)
    logs.configure("gateway", settings.log_format, settings.log_level)
    count = settings.workers or workers.default_workers()
    if count > 1:
        return workers.supervise(settings, count)
    try:
        # Listening before the gateway is imported (about half a second): a crowd coming
        # back to a restarted gateway waits in the backlog meanwhile, not refused (each
        # refusal costs an EventSource its whole `retry:` delay).
        sock = bound_socket(*settings.gateway_listen)
    except OSError as exc:
        return workers.cannot_listen(settings.gateway_listen, exc)
    # Imported here, not at the top: after the bind; and a supervisor imports it only once
    # it has set up the workers' metrics directory (prometheus-client reads it at import).
    from services.sse_gateway import server

    return server.serve(settings, sock)  # which closes it, as it does a worker's


if __name__ == "__main__":
    raise SystemExit(run(argparse.Namespace()))
