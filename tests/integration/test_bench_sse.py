"""The SSE benchmark still runs end to end, in miniature, against the servers it compares
(the gateway, and nchan when Debian's nginx + nchan are installed): every client gets
every event once. It asserts what the benchmark's figures rest on (counts),
never a timing."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from bench import profile, sse_fanout

pytestmark = pytest.mark.slow

HAS_NCHAN = shutil.which("nginx") is not None and os.path.exists("/usr/lib/nginx/modules/ngx_nchan_module.so")


def test_every_client_gets_every_event_once_from_every_server() -> None:
    servers = ["gateway"] + (["nchan"] if HAS_NCHAN else [])
    args = sse_fanout.parse_args(
        ["--servers", ",".join(servers), "--scenarios", "lab", "--clients", "20", "--small-clients", "5",
         "--small-rate", "200", "--duration", "1", "--no-ramp", "--client-procs", "1", "--drain", "20",
         "--repeat", "2", "--out", "-"]
    )  # fmt: skip
    run = asyncio.run(sse_fanout.run(args))

    assert {w.server for w in run.windows} == set(servers)
    assert set(run.idle_kb_per_client) == set(servers)
    for w in run.windows:
        assert w.clients == (20 if "20 clients" in w.scenario else 5)
        assert (w.lost, w.duplicated, w.missing, w.closed, w.unparsed) == (0, 0, 0, 0, 0), w
        assert w.delivered == w.expected == w.published * w.clients, w
    for server in servers:  # --repeat 2: the fixed-rate windows twice each, the others once
        rounds = sorted(
            w.round for w in run.windows if w.server == server and "20 clients @ 50/s" in w.scenario
        )
        assert rounds[0] == 1 and rounds[-1] == 2, rounds
        assert {w.round for w in run.windows if w.server == server and "5 clients" in w.scenario} == {1}
    text = sse_fanout.markdown(run)
    assert "| figure |" in text and "memory per idle client" in text and "ran 2 rounds" in text


def test_viewers_and_the_reconnect_storm_count_every_event_once() -> None:
    """The many-viewers windows and the reconnect storm in miniature: every subscriber is
    dropped by the server's restart and comes back with Last-Event-ID; the gateway's have
    every event once. nchan's memory store forgets its messages when nginx restarts, so a
    subscriber may miss what was published before it came back: its counts must add up."""
    servers = ["gateway"] + (["nchan"] if HAS_NCHAN else [])
    args = sse_fanout.parse_args(
        ["--servers", ",".join(servers), "--scenarios", "viewers,storm", "--viewers", "10,40",
         "--viewer-rates", "20", "--viewer-duration", "1", "--storm-rates", "10,20", "--storm-duration", "6",
         "--storm-drop-at", "1", "--client-procs", "2", "--drain", "20", "--out", "-"]
    )  # fmt: skip
    run = asyncio.run(sse_fanout.run(args))

    storms = [w for w in run.windows if w.restart_s is not None]
    assert sorted((w.server, w.rate) for w in storms) == sorted((x, r) for x in servers for r in (10.0, 20.0))
    for w in run.windows:
        assert w.clients in (10, 40), w
        assert w.expected == w.published * w.clients, w
        assert w.delivered - w.duplicated + w.lost + w.missing == w.expected, w
        if w.server == "gateway" or w.restart_s is None:
            assert (w.lost, w.duplicated, w.missing, w.unparsed) == (0, 0, 0, 0), w
    for w in storms:
        assert w.clients == w.dropped == w.back == 40, w
        assert w.all_back_s is not None and w.back_p50_s is not None and w.back_p90_s is not None
        assert 0 < w.back_p50_s <= w.back_p90_s <= w.all_back_s, w  # counted from the first drop
        assert w.retry_to_all_back_s is not None and 0 <= w.retry_to_all_back_s < w.all_back_s, w
        curve = w.back_curve_s  # when 0%, 1%, ... 100% were back: from the first back to the last
        assert len(curve) == 101 and curve == sorted(curve), w
        assert (curve[50], curve[90], curve[100]) == (w.back_p50_s, w.back_p90_s, w.all_back_s), w
        assert w.failed_tries == 0, w  # the restarted server listened before anyone came back
    assert {n for per in run.idle_kb_by_count.values() for n in per} == {10, 40}
    text = sse_fanout.markdown(run)
    assert "Reconnect storms" in text and "memory per idle subscriber at 40" in text


def test_stream_setup_measures_every_server_and_each_way_in() -> None:
    """bench/stream_setup.py in miniature: each server's streams open and close, and a
    resumed gateway stream counts as open only once the entries it missed are in."""
    from bench import stream_setup

    servers = ["gateway", "lean"] + (["nchan"] if HAS_NCHAN else [])
    args = stream_setup.parse_args(
        ["--servers", ",".join(servers), "--streams", "60", "--rounds", "2", "--out", "-"]
    )
    rounds = asyncio.run(stream_setup.run(args))

    expected = {
        ("gateway", "from=latest"),
        ("gateway", f"resumed, {stream_setup.BEHIND} behind"),
        ("lean", "new subscriber"),
    }
    if HAS_NCHAN:
        expected.add(("nchan", "new subscriber"))
    assert {(r.server, r.mode) for r in rounds} == expected
    assert len(rounds) == 2 * len(expected)
    for r in rounds:
        assert r.streams == 60 and r.setup_us >= 0 and r.end_us >= 0 and r.open_s > 0, r  # /proc ticks: 10 ms
    text = stream_setup.markdown(rounds, args)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]  # after the header
    assert sorted((row[0].removeprefix("| "), row[1]) for row in rows) == sorted(expected)  # one row each


@pytest.mark.skipif(profile.py_spy() is None, reason="py-spy is not installed (not a dependency)")
def test_stream_setup_profiles_the_gateway_while_its_streams_open(tmp_path: Path) -> None:
    """--profile: py-spy's samples of the gateway opening streams, summarized beside them."""
    from bench import stream_setup

    argv = ["--servers", "gateway", "--streams", "2000", "--rounds", "1", "--out", "-"]
    args = stream_setup.parse_args([*argv, "--profile", str(tmp_path)])
    asyncio.run(stream_setup.run(args))

    summaries = sorted(p.name for p in tmp_path.glob("*.md"))
    assert summaries == ["gateway_from-latest_1.md", "gateway_resumed_1.md"]
    for name in summaries:
        text = (tmp_path / name).read_text()
        assert "samples" in text.splitlines()[2]
        assert "(services/sse_gateway/app.py)" in text  # the route that opens a stream was sampled
