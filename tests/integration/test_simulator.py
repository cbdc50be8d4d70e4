"""`fanout feeds` against the real NATS: a --count run delivers exactly that count,
and SIGTERM stops a running simulator cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections import Counter
from typing import Any

import pytest

from services.simulator.__main__ import SimulatorSettings, main
from shared import codec
from shared.feeds import FEED_NAMES, FEEDS
from shared.settings import Settings

DEADLINE = 60.0  # seconds: generous on a shared 2-core machine; only a hang reaches it


async def _subscribe(nats: Any, settings: Settings, want: int | None = None) -> tuple[Counter[str], list[Any],
                                                                                     asyncio.Event]:
    got: Counter[str] = Counter()
    msgs: list[Any] = []
    enough = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        got[msg.subject.removeprefix(settings.subject_prefix)] += 1
        msgs.append(msg)
        if want is None or all(got[f] >= want for f in FEED_NAMES):
            enough.set()

    await nats.subscribe(
        f"{settings.subject_prefix}>", cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
    )
    await nats.flush()
    return got, msgs, enough


async def test_count_run_delivers_exactly_that_count(nats: Any, base_settings: Settings) -> None:
    n = 3000
    got, msgs, enough = await _subscribe(nats, base_settings, want=n)
    settings = SimulatorSettings.from_env(
        {}, **{**vars(base_settings), "rate": 0.0, "count": n, "malformed_share": 0.05, "seed": 1}
    )
    assert await main(settings, asyncio.Event()) == 0
    await asyncio.wait_for(enough.wait(), DEADLINE)
    await nats.flush()  # anything extra would have arrived before this PONG
    assert got == {feed: n for feed in FEED_NAMES}
    bad = 0
    for msg in msgs:
        feed = FEEDS[msg.subject.removeprefix(base_settings.subject_prefix)]
        try:
            codec.decode(feed, msg.data)
        except codec.BadPayload:
            bad += 1
    assert 0 < bad < len(msgs) // 4


async def test_rate_limited_run_of_one_feed(nats: Any, base_settings: Settings) -> None:
    got, _, _ = await _subscribe(nats, base_settings)
    settings = SimulatorSettings.from_env(
        {}, **{**vars(base_settings), "feeds": "sport_event", "rate": 500.0, "count": 40}
    )
    assert await main(settings, asyncio.Event()) == 0
    await nats.flush()
    assert got == {"sport_event": 40}


async def test_sigterm_stops_the_command_cleanly(nats: Any, base_settings: Settings) -> None:
    _, _, first = await _subscribe(nats, base_settings)
    env = {
        **os.environ,
        "NATS_URL": base_settings.nats_url,
        "FANOUT_SUBJECT_PREFIX": base_settings.subject_prefix,
        "FANOUT_LOG_FORMAT": "json",
        "FANOUT_FEEDS_RATE": "50",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fanout", "feeds", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.wait_for(first.wait(), DEADLINE)  # it is publishing
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    summary = [line for line in err.decode().splitlines() if '"msg": "published"' in line]
    assert len(summary) == 2, err.decode()
    assert "Traceback" not in err.decode()


async def test_unreachable_nats_waits_and_stops_on_signal(base_settings: Settings) -> None:
    settings = SimulatorSettings.from_env({}, **{**vars(base_settings), "nats_url": "nats://127.0.0.1:1"})
    stop = asyncio.Event()
    task = asyncio.create_task(main(settings, stop))
    await asyncio.sleep(0)  # let it start connecting
    assert not task.done()
    stop.set()
    assert await asyncio.wait_for(task, DEADLINE) == 0


async def test_ops_endpoints_and_metrics(nats: Any, base_settings: Settings) -> None:
    import aiohttp

    from services.simulator.__main__ import _optional_host_port

    port = _free_port()
    _, _, first = await _subscribe(nats, base_settings)
    settings = SimulatorSettings.from_env(
        {}, **{**vars(base_settings), "rate": 200.0, "http": _optional_host_port(f"127.0.0.1:{port}")}
    )
    stop = asyncio.Event()
    task = asyncio.create_task(main(settings, stop))
    try:
        await asyncio.wait_for(first.wait(), DEADLINE)  # publishing, so the endpoints are up
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 200
                assert (await r.json())["checks"] == {"nats": "ok"}
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        assert 'fanout_simulator_published_total{feed="execution"}' in text
    finally:
        stop.set()
        assert await asyncio.wait_for(task, DEADLINE) == 0
    assert _optional_host_port("") is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_nats_restart_mid_run_loses_nothing_it_counted(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import nats as nats_py

    from fanout.servers import NatsServer

    server = await asyncio.to_thread(NatsServer(tmp_path / "nats").start)
    nc = await nats_py.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await js.add_stream(name="SIM", subjects=["sim.>"])
        settings = SimulatorSettings.from_env(
            {}, nats_url=server.url, subject_prefix="sim.", rate=300.0, log_format="text"
        )
        stop = asyncio.Event()
        task = asyncio.create_task(main(settings, stop))

        async def stored() -> int:
            return int((await js.stream_info("SIM")).state.messages)

        seen = 0
        target = 100
        reached = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            nonlocal seen
            seen += 1
            if seen >= target:
                reached.set()

        await nc.subscribe("sim.>", cb=on_msg)
        await asyncio.wait_for(reached.wait(), DEADLINE)
        await asyncio.to_thread(server.restart)  # NATS goes away and comes back, same store
        target = seen + 200
        reached.clear()
        await asyncio.wait_for(reached.wait(), DEADLINE)  # flowing again, after the reconnects
        stop.set()
        with caplog.at_level(logging.INFO):
            assert await asyncio.wait_for(task, DEADLINE) == 0  # a signal, not an error: 0
        summary = [r for r in caplog.records if r.getMessage() == "published"]
        assert len(summary) == 2
        published = sum(int(getattr(r, "published")) for r in summary)  # noqa: B009
        failed = sum(int(getattr(r, "failed")) for r in summary)  # noqa: B009
        # What the simulator counts as published is what NATS got: buffered across the restart.
        assert await stored() == published
        assert failed == 0
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)
