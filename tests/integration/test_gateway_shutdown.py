"""The hub's shutdown cannot hang on a reader whose cancellation redis-py swallows.

redis-py 8.1 now and then swallows the cancellation of a task blocked in XREAD (the
XREAD just returns, 4-6 times in 200 by a colleague's count). These tests drive the
hub with a stand-in client whose XREAD always does that, or worse never returns at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from services.sse_gateway.hub import Hub
from shared.keys import Keys

pytestmark = pytest.mark.timeout(60)


class SwallowingRedis:
    """What the hub's reader calls, with an XREAD that swallows cancellation."""

    def __init__(self, *, forever: bool = False) -> None:
        self.forever = forever
        self.swallowed = 0
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()

    async def hmget(self, key: str, fields: list[str]) -> list[Any]:
        return ["1795862595094", "0"]

    async def hget(self, key: str, field: str) -> Any:
        return "1795862595094"

    async def xread(self, streams: dict[str, str], count: int, block: int) -> list[Any]:
        while True:
            self.blocked.set()
            try:
                await self.release.wait()
                return []
            except asyncio.CancelledError:
                self.swallowed += 1  # swallowed: as if the block ran out with nothing
                if not self.forever:
                    return []


async def test_close_returns_when_the_xread_swallows_the_cancellation() -> None:
    fake = SwallowingRedis()
    stop = asyncio.Event()  # not set: close() alone must stop the readers
    hub = Hub(fake, Keys("test:shutdown"), stop, block=60.0)  # type: ignore[arg-type]
    await hub.start()
    await fake.blocked.wait()
    await hub.close()
    assert fake.swallowed >= 1
    assert all(t.done() for t in asyncio.all_tasks() if t.get_name().startswith("hub-reader-"))


async def test_close_is_bounded_even_if_a_reader_never_stops(caplog: pytest.LogCaptureFixture) -> None:
    fake = SwallowingRedis(forever=True)
    stop = asyncio.Event()
    hub = Hub(fake, Keys("test:shutdown"), stop, block=0.2)  # type: ignore[arg-type]
    await hub.start()
    await fake.blocked.wait()
    readers = [t for t in asyncio.all_tasks() if t.get_name().startswith("hub-reader-")]
    with caplog.at_level(logging.WARNING, logger="services.sse_gateway.hub"):
        await hub.close()  # returns although the readers ignore every cancellation
    assert "feed readers did not stop in time" in caplog.text
    assert fake.swallowed >= 2  # cancelled again, not once and forgotten
    fake.release.set()  # let the stand-in return: the reader sees it is closing and ends
    await asyncio.wait(readers)
    assert all(t.done() and not t.cancelled() for t in readers)


class SwallowingXread:
    """The real client, except that XREAD swallows a cancellation (as redis-py 8.1 may)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.swallowed = 0
        self.reading = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def xread(self, *args: Any, **kwargs: Any) -> Any:
        self.reading.set()
        try:
            return await self.real.xread(*args, **kwargs)
        except asyncio.CancelledError:
            self.swallowed += 1
            return []


async def test_the_app_lifespan_stops_when_the_readers_swallow_cancellation(base_settings: Any) -> None:
    """The whole app shutdown (the lifespan: stop event set, then hub.close()) with readers
    whose XREAD swallows the cancellation: each sees the stop at once and ends; no hang."""
    import os

    from services.sse_gateway.app import create_app
    from services.sse_gateway.settings import GatewaySettings

    settings = GatewaySettings.from_env(
        os.environ, key_prefix=base_settings.key_prefix, db_schema=base_settings.db_schema, tokens="",
        reader_block=20.0,  # close to the 20 s bound: a reader that waited its block out fails it
    )
    app = create_app(settings)
    async with asyncio.timeout(20):
        async with app.router.lifespan_context(app):
            hub = app.state.hub
            proxy = hub.redis = SwallowingXread(hub.redis)
            await proxy.reading.wait()
        assert app.state.stop.is_set()
    assert proxy.swallowed >= 1
