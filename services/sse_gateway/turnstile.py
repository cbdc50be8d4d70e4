"""A turnstile for stream set-ups: at most so many per turn of the event loop.

asyncio runs, in one turn, every callback that was ready when the turn began, and only
then polls the sockets again, the listening one included. When a crowd reconnects at once
(the gateway restarted, thousands of EventSources come back within a second), uvloop
accepts every pending connection in one go, and in the next turns each of their request
tasks sets up its stream: about 250 µs of Python each, so thousands of them make a turn
last a second or more. Meanwhile nobody accepts: the kernel's listen queue (at most
`net.core.somaxconn`, 4096 on many machines) fills, and every connection past it is
dropped and retried by the client's kernel after 1, 3, 7, 15 s. Measured with 10,000
subscribers: about 10,000 dropped SYNs, and the last subscriber back 6 s after the median
one.

Through the turnstile, at most `per_turn` set-ups start per turn, first come first
served; the others wait for the following turns, and between two turns the loop accepts
what arrived. The crowd then waits in this process, in order, instead of in the kernel's
retry timers. When there is no crowd, a set-up passes at once.
"""

from __future__ import annotations

import asyncio
from collections import deque

STREAM_SETUPS_PER_TURN = 32  # ~8 ms of set-ups per turn


class Turnstile:
    __slots__ = ("_passed", "_per_turn", "_turn_ends", "_waiting")

    def __init__(self, per_turn: int = STREAM_SETUPS_PER_TURN) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self._per_turn = per_turn
        self._passed = 0  # this turn
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._turn_ends = False  # the end of this turn is scheduled

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self) -> None:
        """Return once the caller may go: at once while this turn has room and nobody
        is waiting, else in a later turn, in arrival order."""
        if self._passed < self._per_turn and not self._waiting:
            self._passed += 1
            self._end_turn_later()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._end_turn_later()
        await fut  # cancelled: the future is done, and the next turn skips it

    def _end_turn_later(self) -> None:
        if not self._turn_ends:
            self._turn_ends = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """Runs in the next turn, after its socket poll: a new turn's worth of room,
        given first to those waiting."""
        self._turn_ends = False
        self._passed = 0
        while self._waiting and self._passed < self._per_turn:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                self._passed += 1
        if self._waiting or self._passed:
            self._end_turn_later()
