"""Process lifecycle: one stop event set by SIGTERM/SIGINT, and bounded retries.

A service's main coroutine takes the stop event, stops taking new work when it is
set, finishes what is in flight, and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop)` until it returns; SIGTERM and SIGINT set `stop`. Exit code 0."""

    async def _main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await main(stop)

    asyncio.run(_main())
    return 0


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`, returning early (True) when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


class Backoff:
    """Exponential backoff with full jitter, capped: 0.1 s, 0.2 s, ... up to `cap` seconds."""

    __slots__ = ("attempt", "base", "cap")  # one per gateway subscriber: no dict each

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(delay / 2, delay)

    async def wait(self, stop: asyncio.Event) -> bool:
        """Sleep the next delay unless stopped first; True if stop was set."""
        return await wait_or_stop(stop, self.next_delay())
