"""Where an emptied Redis stream starts again when the catalogue is briefly unreadable:
retried (PostgreSQL restarting) rather than falling back at once to everything JetStream
retains (the fault suite measured 24-44 s of live delay for 40-60k retained messages)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from services.ingestor import jetstream, refill


async def test_the_rebuild_waits_for_the_catalogue_to_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []

    async def first_seq(nc: Any, handle: Any) -> int:
        return 1

    async def archived_top(url: str, schema: str, handle: Any, after: int) -> int:
        reads.append(after)
        if len(reads) < 3:
            raise OSError("connection refused")
        return 700

    monkeypatch.setattr(jetstream, "first_seq", first_seq)
    monkeypatch.setattr(refill, "archived_top", archived_top)
    handle: Any = SimpleNamespace(feed="execution", epoch="1795862595094")
    assert await refill.rebuild_start(None, "postgresql://-", "fanout", handle) == 701  # type: ignore[arg-type]
    assert reads == [0, 0, 0]


async def test_a_catalogue_that_stays_unreadable_falls_back_to_what_jetstream_retains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def first_seq(nc: Any, handle: Any) -> int:
        return 42

    async def archived_top(url: str, schema: str, handle: Any, after: int) -> int:
        raise OSError("connection refused")

    monkeypatch.setattr(jetstream, "first_seq", first_seq)
    monkeypatch.setattr(refill, "archived_top", archived_top)
    monkeypatch.setattr(refill, "CATALOGUE_PATIENCE", 0.5)
    handle: Any = SimpleNamespace(feed="execution", epoch="1795862595094")
    assert await refill.rebuild_start(None, "postgresql://-", "fanout", handle) == 42  # type: ignore[arg-type]
