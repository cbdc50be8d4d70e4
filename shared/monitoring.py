"""The operations endpoints of a worker (ingestor, archiver): `/healthz`, `/readyz`,
`/metrics` on a small HTTP server beside the work loop.

- `/healthz`: 200 while the process runs its loop.
- `/readyz`: 200 when every check passes, else 503; JSON names each check's state. A
  check that does not answer within `check_timeout` (a paused server) is failing.
- `/metrics`: Prometheus text format.

Several workers of one kind can run on one host with the same settings: when the port
asked for is taken, the server listens on a free port instead and logs which (the
`ops endpoints listening` line carries the URL).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from shared.listening import bound_socket

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]


MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
OPS_BACKLOG = 128  # the ops port's listen queue: a few probes and scrapers, not a crowd


def metrics_registry() -> CollectorRegistry:
    """What /metrics serves: this process's metrics, or, in prometheus-client's
    multiprocess mode (PROMETHEUS_MULTIPROC_DIR, which a supervisor sets for its
    workers: `fanout gateway --workers N`), those of every process of the group."""
    directory = os.environ.get(MULTIPROC_DIR)
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


class OpsServer:
    def __init__(self, host: str, port: int, checks: Mapping[str, Check], check_timeout: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.checks = dict(checks)
        self.check_timeout = check_timeout
        self.registry = metrics_registry()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:  # bound here, not by aiohttp: a taken port is an OSError now (shared/listening.py)
            sock = bound_socket(self.host, self.port, backlog=OPS_BACKLOG)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or self.port == 0:
                raise
            log.warning(
                "ops port taken (another worker of this kind?); listening on a free port instead",
                extra={"taken": f"{self.host}:{self.port}"},
            )
            sock = bound_socket(self.host, 0, backlog=OPS_BACKLOG)
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        log.info("ops endpoints listening", extra={"url": f"http://{self.host}:{self.port}/metrics"})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        results: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                results[name] = "ok" if await asyncio.wait_for(check(), self.check_timeout) else "failing"
            except TimeoutError:
                results[name] = f"failing: no answer within {self.check_timeout:g}s"
            except Exception as exc:  # noqa: BLE001 - a check that raises is a failing check, reported
                results[name] = f"failing: {exc}"
        ok = all(v == "ok" for v in results.values())
        return web.Response(
            status=200 if ok else 503,
            text=json.dumps({"status": "ok" if ok else "not ready", "checks": results}),
            content_type="application/json",
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
