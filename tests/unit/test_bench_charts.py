"""The SSE benchmark's charts (bench/charts.py) are drawn from a run's figures: against the
rate with the lab's clients, against the number of subscribers per viewer rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import charts

pytest.importorskip("matplotlib")


def _window(server: str, clients: int, rate: float, sustained: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "scenario": f"{clients} @ {rate}",
        "server": server,
        "clients": clients,
        "rate": rate,
        "delivered_per_s": clients * rate * (1.0 if sustained else 0.8),
        "p99_ms": 20.0 if sustained else 1500.0,
        "sustained": sustained,
        "restart_s": None,
        **extra,
    }


def _run() -> dict[str, Any]:
    windows = [
        _window(server, n, rate, sustained=not (server == "nchan" and rate >= 200))
        for server in ("nchan", "nchan2", "gateway", "gateway2")
        for n, rate in [
            (1000, 1),
            (1000, 5),
            (1000, 50),
            (1000, 100),
            (1000, 200),
            (10000, 1),
            (10000, 5),
            (30000, 1),
            (30000, 5),
        ]
    ]
    windows.append(_window("gateway", 30000, 5, restart_s=2.0))  # a storm: not drawn
    windows.append(_window("nchan", 1000, 100, sustained=False))  # a worse attempt: not drawn
    return {
        "started": "2026-12-03 09:00 UTC",
        "args": {"clients": 1000, "viewers": "1000,10000,30000"},
        "windows": windows,
    }


def test_both_charts_in_png_and_svg(tmp_path: Path) -> None:
    written = charts.write(_run(), tmp_path, "run")
    names = sorted(p.name for p in written)
    assert names == ["run_rate.png", "run_rate.svg", "run_subscribers.png", "run_subscribers.svg"]
    for path in written:
        assert path.stat().st_size > 1000
    assert (tmp_path / "run_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "run_subscribers.svg").read_text()
    assert "<svg" in svg and "gateway, 2 workers, 5 msg/s" in svg


def test_the_better_attempt_and_no_storm_is_drawn() -> None:
    best = charts._best(_run()["windows"])
    assert best["nchan", 1000, 100]["sustained"] is True
    assert best["gateway", 30000, 5]["restart_s"] is None


def test_a_run_without_viewers_has_only_the_rate_chart(tmp_path: Path) -> None:
    run = _run()
    run["args"]["viewers"] = ""
    assert sorted(p.name for p in charts.write(run, tmp_path)) == [
        "sse_fanout_rate.png",
        "sse_fanout_rate.svg",
    ]


def test_of_several_rounds_the_median_p99_is_drawn() -> None:
    rounds = [
        _window("gateway", 1000, 50, round=r, p99_ms=p99) for r, p99 in ((1, 30.0), (2, 12.0), (3, 90.0))
    ]
    again = _window("gateway", 1000, 50, round=2, sustained=False)  # round 2's worse attempt
    best = charts._best([*rounds, again])
    assert best["gateway", 1000, 50]["p99_ms"] == 30.0


def test_the_report_takes_the_round_with_the_median_p99() -> None:
    from bench import sse_fanout

    def window(round_: int, p99: float, attempt: int = 1, sustained: bool = True) -> sse_fanout.Window:
        return sse_fanout.Window(
            "1000 clients @ 50/s", "gateway", 1000, 50, 10, 500, 500_000,
            500_000 if sustained else 1000, 0, 0, 0, 0, 0, 5.0, p99, 40, 9.0, 80, 50, 1, 5, True,
            attempt=attempt, round=round_,
        )  # fmt: skip

    chosen = sse_fanout._by_scenario(
        [window(1, 40.0), window(2, 3000.0, sustained=False), window(2, 15.0, attempt=2), window(3, 90.0)]
    )
    assert chosen["1000 clients @ 50/s", "gateway"].p99_ms == 40.0


def test_rate_ticks_are_thinned_so_labels_do_not_run_together() -> None:
    ticks = [1, 5, 50, 100, 150, 200, 300, 400, 600, 800]
    assert charts._spaced(ticks) == [1, 5, 50, 100, 200, 400, 800]  # the top rate always labelled
    assert charts._spaced([1_000, 10_000, 30_000]) == [1_000, 10_000, 30_000]


def test_back_curve_gives_when_each_percent_of_the_subscribers_was_back() -> None:
    from bench import sse_fanout

    drop = 5_000_000_000
    # 201 subscribers back at 1.00, 1.01, ... 3.00 s after the first drop, in any order.
    back = [drop + 1_000_000_000 + 10_000_000 * i for i in range(201)][::-1]
    curve = sse_fanout.back_curve(back, drop)
    assert len(curve) == 101
    assert curve[0] == 1.0 and curve[100] == 3.0
    assert curve[50] == pytest.approx(2.0) and curve[90] == pytest.approx(2.8)  # 100 and 180 of 200 later
    assert sse_fanout.back_curve([], drop) == []


def test_storms_with_their_curves_get_a_chart_a_panel_per_rate(tmp_path: Path) -> None:
    run = _run()
    for server, rate, spread in (
        ("gateway2", 1, 4.0),
        ("nchan2", 1, 6.0),
        ("gateway2", 5, 5.0),
        ("nchan2", 5, 7.0),
    ):
        curve = [2.0 + spread * k / 100 for k in range(101)]
        run["windows"].append(_window(server, 30000, rate, restart_s=1.0, back_curve_s=curve))
    written = charts.write(run, tmp_path, "run")
    assert {"run_storms.png", "run_storms.svg"} <= {p.name for p in written}
    svg = (tmp_path / "run_storms.svg").read_text()
    assert "reconnect storm @ 1 msg/s" in svg and "reconnect storm @ 5 msg/s" in svg
    assert "gateway, 2 workers, 30,000" in svg and "nchan, 2 workers, 30,000" in svg
    assert set(charts._storms(run["windows"])) == {
        (1.0, "gateway2"),
        (1.0, "nchan2"),
        (5.0, "gateway2"),
        (5.0, "nchan2"),
    }
