"""The gateway's operations endpoints on their own address (FANOUT_GATEWAY_OPS, default
127.0.0.1:9103), never on the public port: `/metrics` (Prometheus), and `/healthz`,
`/readyz` (Redis answers and every feed reader reads), the same two the public port
keeps for load balancers. Like the ingestor's and the archiver's (shared.monitoring):
a taken port is replaced by a free one, logged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from shared.feeds import FEED_NAMES
from shared.monitoring import OpsServer


def server(host: str, port: int, state: Any) -> OpsServer:
    """The ops server of the app whose `state` holds `redis`, `hub` and `stop`."""

    async def redis() -> bool:
        return bool(await state.redis.ping())

    def reader(feed: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return bool(state.hub.ready(feed)) and not state.stop.is_set()

        return check

    checks: dict[str, Callable[[], Awaitable[bool]]] = {"redis": redis}
    checks.update({f"reader:{feed}": reader(feed) for feed in FEED_NAMES})
    return OpsServer(host, port, checks)
