"""Where a subscription without a cursor starts (`subscriber.start_positions`): a new
viewer `from=latest` joins where the hub's reader is, without reading Redis; while the
reader is not running, the top is read from Redis."""

from __future__ import annotations

from typing import Any

from services.sse_gateway.cursor import NO_EPOCH, Position
from services.sse_gateway.subscriber import start_positions


class _Hub:
    def __init__(self, positions: dict[str, Position], ready: bool) -> None:
        self.positions = positions
        self._ready = ready

    def ready(self, feed: str) -> bool:
        return self._ready


class _History:
    """Redis's top of each feed; counts the reads."""

    def __init__(self, tops: dict[str, tuple[str, int] | None]) -> None:
        self.tops = tops
        self.reads: list[str] = []

    async def top(self, feed: str) -> tuple[str, int] | None:
        self.reads.append(feed)
        return self.tops[feed]


async def test_a_new_viewer_starts_where_the_hub_reader_is_without_a_redis_read() -> None:
    # Redis already holds seq 45 (appended, not yet read by the hub): it comes to the viewer live.
    history = _History({"execution": ("1733000000000", 45), "sport_event": ("1733000000001", 7)})
    hub = _Hub(
        {"execution": Position("1733000000000", 41), "sport_event": Position("1733000000001", 7)}, True
    )
    got = await start_positions(history, hub, ("execution", "sport_event"), {}, "latest")  # type: ignore[arg-type]
    assert got == {"execution": Position("1733000000000", 41), "sport_event": Position("1733000000001", 7)}
    assert history.reads == []


async def test_while_the_reader_is_not_running_latest_is_read_from_redis() -> None:
    history = _History({"execution": ("1733000000000", 45)})
    hub = _Hub({"execution": Position("1733000000000", 41)}, False)
    got = await start_positions(history, hub, ("execution",), {}, "latest")  # type: ignore[arg-type]
    assert got == {"execution": Position("1733000000000", 45)} and history.reads == ["execution"]


async def test_an_empty_feed_is_read_from_redis_and_a_cursor_is_taken_as_it_is() -> None:
    history = _History({"execution": None, "sport_event": ("1733000000001", 9)})
    hub: Any = _Hub({"execution": Position(NO_EPOCH, 0), "sport_event": Position("1733000000001", 9)}, True)
    resume = {"sport_event": Position("1733000000001", 3)}
    got = await start_positions(history, hub, ("execution", "sport_event"), resume, "latest")  # type: ignore[arg-type]
    assert got["sport_event"] == Position("1733000000001", 3)
    assert got["execution"].epoch == NO_EPOCH and history.reads == ["execution"]
