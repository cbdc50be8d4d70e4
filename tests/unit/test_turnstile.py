"""The stream set-ups' turnstile (services/sse_gateway/turnstile.py): at most `per_turn`
callers through per turn of the event loop, in arrival order, none left behind."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from services.sse_gateway.turnstile import Turnstile


async def _crowd(turnstile: Turnstile, count: int) -> tuple[list[int], list[int]]:
    """`count` callers arriving in one turn: the order they got through, and how many
    had got through at each turn (a callback that reschedules itself once per turn)."""
    loop = asyncio.get_running_loop()
    passed: list[int] = []
    seen: list[int] = []

    def each_turn() -> None:
        seen.append(len(passed))
        if len(passed) < count:
            loop.call_soon(each_turn)

    async def caller(i: int) -> None:
        await turnstile.enter()
        passed.append(i)

    loop.call_soon(each_turn)
    await asyncio.gather(*(caller(i) for i in range(count)))
    return passed, seen


async def test_a_crowd_goes_through_a_few_per_turn_in_arrival_order() -> None:
    passed, seen = await _crowd(Turnstile(per_turn=4), 50)
    assert passed == list(range(50))
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(steps) <= 4 and len(seen) >= 50 // 4  # never more than 4 in a turn


async def test_alone_a_caller_passes_at_once() -> None:
    turnstile = Turnstile(per_turn=2)
    for _ in range(10):  # one at a time, each in a turn of its own
        await asyncio.wait_for(turnstile.enter(), 1)
        await asyncio.sleep(0)
    assert turnstile.waiting == 0


async def test_a_cancelled_waiter_holds_up_no_one() -> None:
    turnstile = Turnstile(per_turn=1)
    first, *middle, last = [asyncio.create_task(turnstile.enter()) for _ in range(4)]
    await asyncio.sleep(0)  # the first passed in that turn; the other three wait
    assert first.done() and turnstile.waiting == 3
    for task in middle:
        task.cancel()
    await asyncio.wait_for(last, 1)  # the next turn's room goes to the last, not to the cancelled
    assert all(t.cancelled() for t in middle) and turnstile.waiting == 0


def test_room_per_turn_is_at_least_one() -> None:
    with pytest.raises(ValueError):
        Turnstile(per_turn=0)
