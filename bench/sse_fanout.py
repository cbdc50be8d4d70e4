"""SSE fan-out, side by side in one run: nginx + nchan and the feed-fanout gateway.

    .venv/bin/python -m bench.sse_fanout                 # the full comparison, a few minutes
    .venv/bin/python -m bench.sse_fanout --servers nchan # one column only
    .venv/bin/python -m bench.sse_fanout --quick         # short windows, fewer ramp steps

Both servers get the same load client (bench/loadclient.py, in its own processes), the
same publish rate and events of the same shape and size:

- nchan (Debian's nginx + libnginx-mod-nchan, bench/nchan.conf: memory store, EventSource
  subscribers on /sub/execution, `--nchan-workers` worker processes, 1 by default like the
  one gateway process): the publisher POSTs each message to /pub/execution;
- the gateway (`fanout gateway`, a subprocess on a private redis-server): the publisher
  appends execution entries to the feed's stream with the ingestor's Lua script
  (shared/lua/ingest_append.lua), the publish time in executionEpoch (ns); the clients
  subscribe to /v1/stream?feeds=execution (from=latest).

Scenarios (each a window of seqs that every client must receive, lo..hi):
- memory per idle client: server RSS before and after 1,000 clients connect, / 1,000;
- 1,000 clients at 50 and at 100 msg/s; 100 clients at 1,000 msg/s;
- a ramp with 1,000 clients (rates from --ramp) up to the first rate a server does not
  sustain. Sustained: at least 99% of the expected deliveries arrived (no seq lost or
  still missing when the window closed: publishing time + a drain of --drain seconds)
  and p99 latency under 1 s.

Per window: delivered events/s (events received / (publish time + time to drain)),
latency p50/p99 (publish time -> the client's socket read, histogram of 100 µs buckets),
lost (a seq skipped by the stream: the server never sent it), duplicated, missing at the
end (not yet received when the window closed), server CPU (utime+stime of the process
tree from /proc: nginx master and workers; the gateway) and RSS, and the load client's
CPU. The machine has 2 cores shared by server, clients and publisher (and anything else
running), so treat figures as comparative, not absolute.

Many viewers (issue 10), server by server after the scenarios above:
- 1,000, 10,000 and 30,000 subscribers (--viewers) at 1 and 5 msg/s (--viewer-rates),
  with the memory per idle subscriber at each count;
- reconnect storms with the largest count, one per --storm-rates rate (1 and 5 msg/s):
  the server is restarted (SIGTERM, started again on the same port) while publishing
  goes on, so every subscriber is dropped at once and comes back like EventSource
  (after the server's `retry:`, with Last-Event-ID); reported: time from the first drop
  until half, 90% and every subscriber is connected again (and the whole curve, charted),
  attempts to come back that failed, and lost / duplicated / missing over the whole
  window (nchan's memory store forgets its messages when it restarts; its publisher
  waits while nginx is down).

Servers (--servers): `nchan` and `nchan2` (nginx with 1 and 2 worker processes),
`gateway` and `gateway2` (`fanout gateway` with FANOUT_GATEWAY_WORKERS 1 and 2), `lean`.

The open-file limit is raised at start (soft to hard, and above it where allowed), and
the load client spreads its connections over several loopback source addresses
(127.0.0.x) so the ephemeral ports of one address do not run out.

Writes the markdown table to bench/results/sse_fanout.md, the raw figures to
bench/results/sse_fanout.json and the charts (bench/charts.py) beside them as PNG and SVG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bench import harness, profile
from bench.harness import BenchError, Usage, percentile_ms, usage
from bench.loadclient import LoadClients
from bench.publishers import NchanPublisher, StreamPublisher, pace

RESULTS = harness.BENCH_DIR / "results"
SUSTAINED_SHARE = 0.99
SUSTAINED_P99_MS = 1000.0
SERVERS = ("nchan", "nchan2", "gateway", "gateway2", "lean")
FILES_SPARE = 500  # open files a server needs besides its subscribers' sockets
BACK_CURVE_POINTS = 101  # a storm's curve: when 0%, 1%, ... 100% of the subscribers were back
PEERS = {"gateway": "nchan", "gateway2": "nchan2", "lean": "nchan"}  # compared at the same worker count


class Target(Protocol):
    """A server under test: where to subscribe, how to publish, which process to watch."""

    name: str
    pid: int
    sub_url: str
    processes: int  # serving processes (nginx workers, gateway workers): each has its own open files

    async def last_seq(self) -> int: ...
    async def publish(self, count: int) -> None: ...
    async def settle(self) -> None: ...
    async def restart(self) -> float: ...


@dataclass
class Window:
    scenario: str
    server: str
    clients: int
    rate: float
    seconds: float  # publishing + draining
    published: int
    expected: int
    delivered: int
    lost: int
    duplicated: int
    missing: int
    closed: int
    unparsed: int
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_pct: float
    server_cpu_us_per_event: float | None
    server_rss_mb: float
    client_cpu_pct: float
    publisher_cpu_pct: float
    other_cpu_pct: float  # the rest of the machine: other engineers' runs, Redis, the kernel...
    drained: bool
    attempt: int = 1
    round: int = 1  # --repeat: which round of the fixed-rate windows
    restart_s: float | None = None  # reconnect storm: server stopped and listening again
    all_back_s: float | None = None  # reconnect storm: first drop -> every subscriber connected again
    back_p50_s: float | None = None  # reconnect storm: first drop -> half of them connected again
    back_p90_s: float | None = None
    retry_to_all_back_s: float | None = None  # reconnect storm: the first attempt to come back -> all back
    syn_drops: int = 0  # reconnect storm: connections the kernel's listen queue overflowed (ListenOverflows)
    failed_tries: int = 0  # reconnect storm: attempts to come back that failed (each costs a `retry:` more)
    back_curve_s: list[float] = field(default_factory=list)  # reconnect storm: see back_curve()
    dropped: int = 0
    back: int = 0

    @property
    def delivered_per_s(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def sustained(self) -> bool:
        got = self.delivered - self.duplicated
        return (
            self.expected > 0
            and got >= SUSTAINED_SHARE * self.expected
            and self.p99_ms is not None
            and self.p99_ms < SUSTAINED_P99_MS
        )


@dataclass
class Run:
    started: str
    args: dict[str, Any]
    idle_kb_per_client: dict[str, float] = field(default_factory=dict)
    idle_kb_by_count: dict[str, dict[int, float]] = field(default_factory=dict)  # server -> viewers -> KB
    windows: list[Window] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- the servers ---------------------------------------------------------------------


class Nchan:
    def __init__(self, name: str, server: harness.NchanServer, publisher: NchanPublisher) -> None:
        self.name = name
        self.processes = server.workers
        self.server = server
        assert server.proc is not None
        self.pid = server.proc.pid
        self.sub_url = f"http://127.0.0.1:{server.port}/sub/execution"
        self.publisher = publisher
        self._down = asyncio.Lock()  # held while nginx restarts: publishing waits

    async def last_seq(self) -> int:
        await self.publisher.settle()
        return self.publisher.last_seq

    async def settle(self) -> None:
        async with self._down:
            await self.publisher.settle()

    async def publish(self, count: int) -> None:
        async with self._down:
            await self.publisher.publish(count)

    async def restart(self) -> float:
        """Stop nginx and start it again on the same port; publishing waits meanwhile
        (nothing is published that nginx could not take)."""
        async with self._down:
            await self.publisher.settle()
            await self.publisher.disconnect()
            started = time.monotonic()
            await asyncio.to_thread(self.server.stop)
            self.pid = (await asyncio.to_thread(self.server.start)).pid
            took = time.monotonic() - started
            await self.publisher.connect()
        return took


class Gateway:
    def __init__(self, name: str, service: harness.FanoutProcess, publisher: StreamPublisher) -> None:
        self.name = name
        self.processes = service.listeners
        self.service = service
        assert service.proc is not None
        self.pid = service.proc.pid
        self.sub_url = f"http://127.0.0.1:{service.port}/v1/stream?feeds=execution"
        self.publisher = publisher

    async def last_seq(self) -> int:
        return await self.publisher.last_seq()

    async def settle(self) -> None:
        """Each append was awaited: nothing in flight."""

    async def publish(self, count: int) -> None:
        await self.publisher.publish(count)

    async def restart(self) -> float:
        """SIGTERM (every stream ends), then start it again on the same port; publishing
        to Redis goes on meanwhile, so the subscribers must resume exactly."""
        started = time.monotonic()
        await asyncio.to_thread(self.service.stop)
        self.pid = (await asyncio.to_thread(self.service.start)).pid
        return time.monotonic() - started


@asynccontextmanager
async def start_nchan(
    stack: AsyncExitStack, name: str, workers: int, connections: int
) -> AsyncIterator[Nchan]:
    server = stack.enter_context(harness.private_nchan(workers, connections))
    publisher = await stack.enter_async_context(NchanPublisher(server.port, "execution"))
    yield Nchan(name, server, publisher)


class Lean:
    name = "lean"
    processes = 1

    def __init__(self, port: int, pid: int, publisher: StreamPublisher) -> None:
        self.pid = pid
        self.sub_url = f"http://127.0.0.1:{port}/v1/stream?feeds=execution"
        self.publisher = publisher

    async def last_seq(self) -> int:
        return await self.publisher.last_seq()

    async def settle(self) -> None:
        """Each append was awaited: nothing in flight."""

    async def publish(self, count: int) -> None:
        await self.publisher.publish(count)

    async def restart(self) -> float:
        raise BenchError("lean (the reference) has no resume: no reconnect storm for it")


@asynccontextmanager
async def start_lean(stack: AsyncExitStack) -> AsyncIterator[Lean]:
    """bench/lean_fanout.py: the leanest Python fan-out, a reference for the gateway."""
    redis_url, _ = stack.enter_context(harness.private_redis())
    port = harness.free_port()
    prefix = f"lean{os.getpid()}"
    proc = stack.enter_context(
        harness.python_module(
            "bench.lean_fanout", ["--redis-url", redis_url, "--prefix", prefix, "--port", str(port)], port
        )
    )
    publisher = await stack.enter_async_context(StreamPublisher(redis_url, prefix))
    await publisher.publish(1)
    yield Lean(port, proc.pid, publisher)


@asynccontextmanager
async def start_gateway(
    stack: AsyncExitStack, name: str, log_dir: str, env: dict[str, str], workers: int
) -> AsyncIterator[Gateway]:
    redis_url, _ = stack.enter_context(harness.private_redis())
    port = harness.free_port()
    prefix = f"bench{os.getpid()}{name}"
    service = harness.FanoutProcess(
        "gateway",
        {
            "REDIS_URL": redis_url,
            "FANOUT_KEY_PREFIX": prefix,
            "FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{port}",
            "FANOUT_MAX_SUBSCRIBERS": "200000",
            "FANOUT_TOKENS": "",
            "FANOUT_LOG_LEVEL": "WARNING",
            "FANOUT_GATEWAY_WORKERS": str(workers),
            **env,
        },
        log_path=f"{log_dir}/{name}.log",
        port=port,
        listeners=workers,
    )
    service.start()
    stack.callback(service.stop)
    publisher = await stack.enter_async_context(StreamPublisher(redis_url, prefix))
    # The feed needs a stream before `from=latest` means anything: append one entry.
    await publisher.publish(1)
    yield Gateway(name, service, publisher)


# --- measuring -------------------------------------------------------------------------


async def quiesce(pid: int, limit_s: float = 30.0) -> None:
    """Wait (bounded) until the server is idle, below 10% CPU over half a second, so a
    window never starts while the previous one's backlog is still being sent."""
    deadline = time.monotonic() + limit_s
    before = usage(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = usage(pid)
        if now.cpu_percent_since(before) < 10:
            return
        before = now


async def measure(
    scenario: str,
    target: Target,
    pool: LoadClients,
    rate: float,
    duration: float,
    drain: float,
    profile_dir: str | None = None,
) -> Window:
    await quiesce(target.pid)
    base = await target.last_seq()
    total = max(1, round(rate * duration))
    await pool.window(base + 1, base + total)
    server0, busy0, self0 = usage(target.pid), harness.machine_busy_s(), harness.self_cpu_s()
    started = time.monotonic()
    sampling = _sample(target, scenario, duration, profile_dir)
    published, _ = await pace(target.publish, rate, duration)
    await target.settle()
    drained = await pool.wait_done(drain)
    seconds = time.monotonic() - started
    server1, busy1, self1 = usage(target.pid), harness.machine_busy_s(), harness.self_cpu_s()
    rep = await pool.report()
    await _summarize(sampling, target, scenario)
    if published != total:
        raise BenchError(f"{target.name}: published {published} of {total}")
    server, busy, own = (server0, server1), (busy0, busy1), (self0, self1)
    return _window(scenario, target, rate, seconds, published, rep, server, busy, own, drained)


Sampling = tuple[subprocess.Popen[bytes], Path] | None


def _sample(target: Target, scenario: str, seconds: float, profile_dir: str | None) -> Sampling:
    """With --profile, sample a gateway (its workers too) for `seconds` with py-spy."""
    if not profile_dir or isinstance(target, Nchan):
        return None
    raw = Path(profile_dir, f"{target.name} {scenario}.txt".replace("/", "per").replace(" ", "_"))
    sampler = profile.record(target.pid, seconds, raw)
    return (sampler, raw) if sampler is not None else None


async def _summarize(sampling: Sampling, target: Target, scenario: str) -> None:
    """Wait for the sampler to end, then write the profile's summary beside it."""
    if sampling is None:
        return
    sampler, raw = sampling
    await asyncio.to_thread(sampler.wait)
    await asyncio.to_thread(profile.write_summary, raw, f"{target.name}: {scenario}")


def _window(
    scenario: str,
    target: Target,
    rate: float,
    seconds: float,
    published: int,
    rep: dict[str, Any],
    server: tuple[Usage, Usage],
    busy: tuple[float, float],
    own: tuple[float, float],
    drained: bool,
    **extra: Any,
) -> Window:
    """A window's figures from the load client's report and the CPU read before and after
    (the server's, the machine's, this process's)."""
    server0, server1 = server
    cpu = server1.cpu_since(server0)
    delivered = rep["delivered"]
    publisher_s = own[1] - own[0]
    return Window(
        scenario=scenario,
        server=target.name,
        clients=rep["connections"],
        rate=rate,
        seconds=seconds,
        published=published,
        expected=published * rep["connections"],
        delivered=delivered,
        lost=rep["lost"],
        duplicated=rep["duplicated"],
        missing=rep["missing"],
        closed=rep["closed"],
        unparsed=rep["unparsed"],
        p50_ms=percentile_ms(rep["hist"], 0.50),
        p99_ms=percentile_ms(rep["hist"], 0.99),
        server_cpu_pct=server1.cpu_percent_since(server0),
        server_cpu_us_per_event=(cpu / delivered * 1e6) if delivered else None,
        server_rss_mb=server1.rss_bytes / 2**20,
        client_cpu_pct=100.0 * rep["cpu_s"] / seconds,
        publisher_cpu_pct=100.0 * publisher_s / seconds,
        other_cpu_pct=max(0.0, 100.0 * (busy[1] - busy[0] - cpu - rep["cpu_s"] - publisher_s) / seconds),
        drained=drained,
        **extra,
    )


async def storm(
    scenario: str,
    target: Target,
    pool: LoadClients,
    rate: float,
    duration: float,
    drop_at: float,
    drain: float,
    profile_dir: str | None = None,
) -> Window:
    """The reconnect storm: publish for `duration` s; `drop_at` s in, restart the server so
    every subscriber is dropped at once; they come back with Last-Event-ID."""
    await quiesce(target.pid)
    base = await target.last_seq()
    total = max(1, round(rate * duration))
    await pool.window(base + 1, base + total)
    await pool.reconnecting(True)
    busy0, self0 = harness.machine_busy_s(), harness.self_cpu_s()
    overflows0 = listen_overflows()
    started = time.monotonic()
    publishing = asyncio.create_task(pace(target.publish, rate, duration))
    sampling: Sampling = None
    try:
        await asyncio.sleep(drop_at)  # the scenario's timeline: publish a while before the drop
        restart_s = await target.restart()
        server0 = usage(target.pid)  # a new process: its CPU counts from here
        # The restarted server, from listening until publishing ends (the crowd comes back).
        sampling = _sample(target, scenario, duration - drop_at - restart_s, profile_dir)
        await pool.all_back(max(drain, 120.0))
        published, _ = await publishing
    finally:
        if not publishing.done():
            publishing.cancel()
    await _summarize(sampling, target, scenario)
    await target.settle()
    drained = await pool.wait_done(max(drain, 60.0))
    seconds = time.monotonic() - started
    server1, busy1, self1 = usage(target.pid), harness.machine_busy_s(), harness.self_cpu_s()
    rep = await pool.report()
    await pool.reconnecting(False)
    if published != total:
        raise BenchError(f"{target.name}: published {published} of {total}")
    curve = back_curve(rep["back_ns"], rep["first_drop_ns"])
    return _window(
        scenario,
        target,
        rate,
        seconds,
        published,
        rep,
        (server0, server1),
        (busy0, busy1),
        (self0, self1),
        drained,
        restart_s=restart_s,
        all_back_s=(rep["last_back_ns"] - rep["first_drop_ns"]) / 1e9 if rep["back"] else None,
        back_p50_s=curve[50] if curve else None,
        back_p90_s=curve[90] if curve else None,
        retry_to_all_back_s=(rep["last_back_ns"] - rep["first_try_ns"]) / 1e9
        if rep["first_try_ns"]
        else None,
        syn_drops=listen_overflows() - overflows0,
        failed_tries=sum(rep["failed"].values()),
        back_curve_s=curve,
        dropped=rep["dropped"],
        back=rep["back"],
    )


def storm_rates(args: argparse.Namespace) -> list[float]:
    return [float(r) for r in args.storm_rates.split(",") if r.strip()]


def back_curve(back_ns: Sequence[int], first_drop_ns: int, points: int = BACK_CURVE_POINTS) -> list[float]:
    """Seconds from the first drop until k% of the dropped subscribers were back, for k
    = 0, 100/(points-1), ... 100 (with 101 points, index k is k%; the storm chart's
    curve; [] when none came back)."""
    back = sorted((t - first_drop_ns) / 1e9 for t in back_ns)
    if not back:
        return []
    return [back[min(len(back) - 1, round(k * (len(back) - 1) / (points - 1)))] for k in range(points)]


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (each
    such client retries its SYN after 1, 3, 7... s), machine-wide."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f]
    for names, values in zip(rows[::2], rows[1::2], strict=True):
        if names[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(values[names.index("ListenOverflows")])
    return 0


async def connect(target: Target, clients: int, procs: int) -> LoadClients:
    pool = LoadClients(target.sub_url, clients, procs)
    await pool.start(connect_s=max(120.0, clients / 100))
    if pool.connected != clients:
        await pool.close()
        raise BenchError(f"{target.name}: only {pool.connected} of {clients} clients connected")
    return pool


def show(w: Window) -> None:
    print(
        f"  {w.scenario + _attempt(w):<26} {w.server:<8} "
        f"{w.delivered_per_s:>9,.0f} ev/s  "
        f"p50 {_ms(w.p50_ms):>7} p99 {_ms(w.p99_ms):>7}  lost {w.lost} dup {w.duplicated} "
        f"missing {w.missing}  cpu {w.server_cpu_pct:.0f}%  rss {w.server_rss_mb:.0f} MB  "
        f"client cpu {w.client_cpu_pct:.0f}% other {w.other_cpu_pct:.0f}%  "
        f"{'ok' if w.sustained else 'NOT SUSTAINED'}"
        + (
            f"  restart {w.restart_s:.1f} s, {w.back:,} of {w.dropped:,} dropped back in {_s(w.all_back_s)}"
            f" (half in {_s(w.back_p50_s)}, 90% in {_s(w.back_p90_s)}; first retry -> all back "
            f"{_s(w.retry_to_all_back_s)}; {w.syn_drops:,} SYNs dropped)"
            if w.restart_s is not None
            else ""
        ),
        flush=True,
    )


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:,.0f}")


async def run(args: argparse.Namespace) -> Run:
    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        raise BenchError(f"unknown servers {sorted(unknown)}: choose from {', '.join(SERVERS)}")
    scenarios = {x.strip() for x in args.scenarios.split(",") if x.strip()}
    viewers = sorted(int(v) for v in args.viewers.split(",") if v.strip()) if "viewers" in scenarios else []
    result = Run(started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), args=vars(args).copy())
    storm_only = [args.storm_subscribers] if "storm" in scenarios and not viewers else []
    most = max([args.clients, args.small_clients, *viewers, *storm_only])
    result.notes.append(harness.raise_open_files(2 * most + 2000))
    load1 = os.getloadavg()[0]
    result.notes.append(f"load average at start: {load1:.2f} (2 cores; other processes share them)")
    dirty = _dirty("services/sse_gateway", "shared")
    if dirty and any(x.startswith("gateway") for x in servers):
        result.notes.append(f"the gateway ran from a working tree with uncommitted changes in: {dirty}")
    dur, drain = args.duration, args.drain
    env = dict(e.split("=", 1) for e in args.gateway_env)
    async with AsyncExitStack() as stack:
        log_dir = tempfile.mkdtemp(prefix="bench-sse-")  # kept: the gateways' logs, for a look
        targets: list[Target] = []
        for name in servers:
            if name.startswith("nchan"):
                workers = 2 if name == "nchan2" else args.nchan_workers
                targets.append(
                    await stack.enter_async_context(start_nchan(stack, name, workers, most + 1000))
                )
            elif name.startswith("gateway"):
                workers = 2 if name == "gateway2" else 1
                targets.append(
                    await stack.enter_async_context(start_gateway(stack, name, log_dir, env, workers))
                )
            else:
                targets.append(await stack.enter_async_context(start_lean(stack)))
        pools: dict[str, LoadClients] = {}

        async def each(
            scenario: str,
            rate: float,
            seconds: float,
            only: set[str] | None = None,
            attempts: int = 2,
            rounds: int = 1,
        ) -> set[str]:
            """One window per server (a second one if the first was not sustained: on a
            shared machine one bad window can be noise), `rounds` times with the servers
            interleaved, their order reversed every other round; returns the servers that
            failed twice in a round."""
            failed = set()
            for r in range(1, rounds + 1):
                for t in targets if r % 2 else targets[::-1]:
                    if only is not None and t.name not in only:
                        continue
                    for attempt in range(1, attempts + 1):
                        w = await measure(scenario, t, pools[t.name], rate, seconds, drain, args.profile)
                        w.attempt, w.round = attempt, r
                        show(w)
                        result.windows.append(w)
                        if w.sustained:
                            break
                    else:
                        failed.add(t.name)
            return failed

        if "lab" in scenarios:
            # Memory per idle client, with the 1,000 clients the next scenarios use.
            print(f"connecting {args.clients} idle clients to each server", flush=True)
            for t in targets:
                await quiesce(t.pid)
                before = usage(t.pid).rss_bytes
                pools[t.name] = await connect(t, args.clients, args.client_procs)
                after = usage(t.pid).rss_bytes
                result.idle_kb_per_client[t.name] = (after - before) / args.clients / 1024
                print(
                    f"  {t.name}: {result.idle_kb_per_client[t.name]:.1f} KB per idle client "
                    f"(RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MB)",
                    flush=True,
                )

            print("warm-up (not reported)", flush=True)
            for t in targets:
                await measure("warm-up", t, pools[t.name], 50, 2, drain)

            print(f"{args.clients} clients", flush=True)
            going = {t.name for t in targets}
            for fixed in (50.0, 100.0):
                going -= await each(f"{args.clients} clients @ {fixed:g}/s", fixed, dur, rounds=args.repeat)
            if not args.no_ramp:
                for rate in [float(r) for r in args.ramp.split(",")]:
                    if rate <= 100:
                        continue
                    if not going:
                        break
                    scenario = f"ramp {args.clients} @ {rate:g}/s"
                    going -= await each(scenario, rate, args.ramp_duration, set(going))
            for pool in pools.values():
                await pool.close()

            small = args.small_clients
            print(f"{small} clients", flush=True)
            for t in targets:
                pools[t.name] = await connect(t, small, args.client_procs)
            await each(f"{small} clients @ {args.small_rate:g}/s", args.small_rate, dur)
            for pool in pools.values():
                await pool.close()
            pools.clear()

        if viewers or "storm" in scenarios:
            await viewers_and_storm(args, result, targets, viewers if viewers else [args.storm_subscribers],
                                    "storm" in scenarios, bool(viewers))  # fmt: skip
    for name in servers:
        if name.startswith("gateway"):
            result.notes.extend(await asyncio.to_thread(harness.log_errors, Path(log_dir, f"{name}.log")))
    return result


async def _or_note(result: Run, server: str, window: Coroutine[Any, Any, Window]) -> Window | None:
    """A window, or None with a note when the server could not be measured (a storm after
    which not every subscriber came back within the bounds, a refused publish)."""
    try:
        return await window
    except BenchError as exc:
        result.notes.append(f"{server}: {exc}")
        print(f"  {server}: {exc}", flush=True)
        return None


async def viewers_and_storm(
    args: argparse.Namespace,
    result: Run,
    targets: list[Target],
    counts: list[int],
    with_storm: bool,
    with_windows: bool,
) -> None:
    """Server by server (one server's thousands of sockets at a time): each subscriber
    count at each viewer rate, the idle memory per subscriber at each count, and the
    reconnect storm with the largest count. With --repeat, the windows run that many
    rounds, the servers interleaved (order reversed every other round: each connects its
    subscribers again); memory and the storm are taken in the first round only."""
    rates = [float(r) for r in args.viewer_rates.split(",") if r.strip()]
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # per process: the hard limit here
    rounds = args.repeat if with_windows else 1
    for r in range(1, rounds + 1):
        for t in targets if r % 2 else targets[::-1]:
            if with_storm and isinstance(t, Lean) and not with_windows:
                continue
            fits = [n for n in counts if n <= t.processes * (files - FILES_SPARE)]
            if len(fits) < len(counts) and r == 1:
                result.notes.append(
                    f"{t.name}: {', '.join(f'{n:,}' for n in counts if n not in fits)} subscribers left out: "
                    f"its {t.processes} process(es) may hold {files:,} open files each (the hard limit "
                    "here, which this machine does not let a process raise)"
                )
            for n in fits:
                if not await _viewers(args, result, t, n, rates, files=files, first=r == 1, round_=r,
                                      with_windows=with_windows,
                                      with_storm=with_storm and r == 1 and n == fits[-1]):  # fmt: skip
                    break


async def _viewers(
    args: argparse.Namespace,
    result: Run,
    t: Target,
    n: int,
    rates: list[float],
    *,
    files: int,
    first: bool,
    round_: int,
    with_windows: bool,
    with_storm: bool,
) -> bool:
    """`n` subscribers on one server: their idle memory (`first` round), the windows at each
    rate, the storm; False when they could not all connect."""
    procs = max(args.client_procs, -(-n // (files - FILES_SPARE)))
    await quiesce(t.pid)
    before = usage(t.pid).rss_bytes
    again = f" (round {round_})" if round_ > 1 else ""
    print(f"{t.name}: connecting {n:,} subscribers{again}", flush=True)
    try:
        pool = await connect(t, n, procs)
    except BenchError as exc:  # one server's limit: the others' figures still count
        if first:
            result.notes.append(f"{t.name}: {n:,} subscribers left out: {exc}")
        print(f"  {exc}", flush=True)
        return False
    try:
        if first:
            await quiesce(t.pid)
            after = usage(t.pid).rss_bytes
            kb = (after - before) / n / 1024
            result.idle_kb_by_count.setdefault(t.name, {})[n] = kb
            print(f"  {t.name}: {kb:.1f} KB per idle subscriber at {n:,}", flush=True)
        if with_windows:
            await measure(f"warm-up {n}", t, pool, rates[0], 1, args.drain)
            for rate in rates:
                scenario = f"{n:,} subscribers @ {rate:g}/s"
                w = await measure(scenario, t, pool, rate, args.viewer_duration, args.drain, args.profile)
                w.round = round_
                show(w)
                result.windows.append(w)
        for rate in storm_rates(args) if with_storm and not isinstance(t, Lean) else []:
            stormy = await _or_note(result, t.name, storm(
                f"reconnect storm, {n:,} subscribers @ {rate:g}/s",
                t,
                pool,
                rate,
                args.storm_duration,
                args.storm_drop_at,
                args.drain,
                args.profile,
            ))  # fmt: skip
            if stormy is None:
                break  # not every subscriber came back: the next storm would not start from all
            show(stormy)
            result.windows.append(stormy)
    finally:
        await pool.close()
    return True


# --- the report ------------------------------------------------------------------------


def markdown(run: Run) -> str:
    lines = [
        "# SSE fan-out: feed-fanout gateway vs nginx + nchan",
        "",
        f"Run {run.started}, commit {_commit()}, `python -m bench.sse_fanout"
        f"{' --quick' if run.args.get('quick') else ''}`; {os.cpu_count()} cores shared by server, "
        f"load client ({run.args['client_procs']} processes) and publisher. nchan: nginx with 1 worker "
        "process, nchan2: 2 workers; gateway: `fanout gateway` with one worker, gateway2: 2 workers"
        + (
            "; `lean` = bench/lean_fanout.py (a reference: the leanest Python fan-out, no features)."
            if "lean" in run.args["servers"]
            else "."
        ),
        "",
        "| scenario | server | delivered ev/s | expected ev/s | p50 ms | p99 ms | lost | dup "
        "| missing at end | server CPU % | server µs/event | server RSS MB | client CPU % | other CPU % "
        "| sustained |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for w in run.windows:
        lines.append(
            f"| {w.scenario}{_attempt(w)} | {w.server} | "
            f"{w.delivered_per_s:,.0f} | {w.rate * w.clients:,.0f} | "
            f"{_ms(w.p50_ms)} | {_ms(w.p99_ms)} | {w.lost} | {w.duplicated} | {w.missing} | "
            f"{w.server_cpu_pct:.0f} | {_ms(w.server_cpu_us_per_event)} | {w.server_rss_mb:.0f} | "
            f"{w.client_cpu_pct:.0f} | {w.other_cpu_pct:.0f} | "
            f"{'(storm)' if w.restart_s is not None else 'yes' if w.sustained else 'NO'} |"
        )
    storms = [w for w in run.windows if w.restart_s is not None]
    if storms:
        lines += [
            "",
            "Reconnect storms: the server restarted (SIGTERM, started again on the same port) while "
            "every subscriber listened; they come back like EventSource (after the server's `retry:`, "
            "else Chromium's default of 3 s, with Last-Event-ID). Half, 90% and all back are counted "
            "from the first drop (what a viewer sees); first retry -> all back from the first attempt "
            "to come back (the server's share). SYNs dropped: the kernel's ListenOverflows meanwhile; "
            "failed tries: attempts to come back that failed (refused, timed out), each costing "
            "that subscriber another `retry:`.",
            "",
            "| scenario | server | restart s | dropped | back | first drop -> half back | 90% back "
            "| all back | first retry -> all back | SYNs dropped | failed tries | lost | dup "
            "| missing at end | p50 ms | p99 ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for w in storms:
            lines.append(
                f"| {w.scenario} | {w.server} | {w.restart_s:.1f} | {w.dropped:,} | {w.back:,} | "
                f"{_s(w.back_p50_s)} | {_s(w.back_p90_s)} | {_s(w.all_back_s)} | "
                f"{_s(w.retry_to_all_back_s)} | {w.syn_drops:,} | {w.failed_tries:,} | "
                f"{w.lost} | {w.duplicated} | {w.missing} | {_ms(w.p50_ms)} | {_ms(w.p99_ms)} |"
            )
    servers = list(dict.fromkeys(w.server for w in run.windows)) or list(run.idle_kb_per_client)
    others = [x for x in servers if PEERS.get(x) in servers]
    lines += [
        "",
        "| figure | " + " | ".join(servers) + "".join(f" | {x} / {PEERS[x]}" for x in others) + " |",
        "|---|" + "---:|" * (len(servers) + len(others)),
    ]

    def row(label: str, values: dict[str, float | None], digits: int = 0) -> None:
        cells = [_num(values.get(x), digits) for x in servers]
        cells += [_ratio(values.get(x), values.get(PEERS[x])) for x in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    by = _by_scenario(run.windows)
    scenarios = list(dict.fromkeys(w.scenario for w in run.windows))
    for scenario in scenarios:
        found = {x: by[scenario, x] for x in servers if (scenario, x) in by}
        row(f"{scenario}: delivered ev/s", {x: w.delivered_per_s for x, w in found.items()})
    for scenario in scenarios:
        found = {x: by[scenario, x] for x in servers if (scenario, x) in by}
        row(f"{scenario}: p99 ms", {x: w.p99_ms for x, w in found.items()}, 1)
    for scenario in scenarios:
        found = {x: by[scenario, x] for x in servers if (scenario, x) in by}
        row(f"{scenario}: server CPU µs/event", {x: w.server_cpu_us_per_event for x, w in found.items()}, 1)
    for scenario in scenarios:
        found = {x: by[scenario, x] for x in servers if (scenario, x) in by}
        if any(w.restart_s is not None for w in found.values()):
            row(f"{scenario}: first drop -> half back, s", {x: w.back_p50_s for x, w in found.items()}, 2)
            row(f"{scenario}: first drop -> all back, s", {x: w.all_back_s for x, w in found.items()}, 2)
            row(f"{scenario}: first retry -> all back, s",
                {x: w.retry_to_all_back_s for x, w in found.items()}, 2)  # fmt: skip
            row(f"{scenario}: lost + duplicated + missing", {x: float(w.lost + w.duplicated + w.missing)
                                                             for x, w in found.items()})  # fmt: skip
    clients = run.args["clients"]
    best = {
        x: max(
            (w for w in run.windows if w.server == x and w.sustained and w.clients == clients),
            key=lambda w: w.rate,
            default=None,
        )
        for x in servers
    }
    if any(best.values()):
        row(f"highest sustained rate, {clients:,} clients (msg/s)", {x: w.rate for x, w in best.items() if w})
        row("sustained deliveries/s at that rate", {x: w.delivered_per_s for x, w in best.items() if w})
    if run.idle_kb_per_client:
        row("memory per idle client (KB)", dict(run.idle_kb_per_client), 1)
    for n in sorted({n for per in run.idle_kb_by_count.values() for n in per}):
        row(
            f"memory per idle subscriber at {n:,} (KB)",
            {x: per.get(n) for x, per in run.idle_kb_by_count.items()},
            1,
        )
    ramp_top = max((float(r) for r in run.args["ramp"].split(",")), default=0)
    lines += [
        "",
        "Delivered ev/s = events received by all clients / (publishing time + time to drain). "
        f"Sustained = at least {SUSTAINED_SHARE:.0%} of the expected events received and p99 under "
        f"{SUSTAINED_P99_MS:.0f} ms. The ramp stops for a server at its first rate not sustained "
        f'(top step {ramp_top:g} msg/s), so "highest sustained" is a lower bound between ramp steps. '
        "Lost = seqs the stream skipped; missing at end = not yet received when the window closed "
        f"({run.args['drain']:g} s after publishing ended). Latency = the client's socket read - the "
        "publish time stamped in the event (same clock). Server CPU = utime+stime of the process tree "
        "over the window (100% = one core); other CPU = the machine's busy time (/proc/stat) less "
        "server, load client and publisher: other work on the shared machine (and Redis for the "
        "gateway), a measure of how noisy the window was. A window not sustained is run once "
        "more (marked `again`; the ratios use the better of the two) before it counts as not "
        "sustained (and the ramp stops for that server)."
        + (
            f" The 1,000-client windows at 50 and 100 msg/s and the many-viewers windows ran "
            f"{run.args['repeat']} rounds, the servers interleaved (order reversed every other round); "
            "the summary takes each server's round with the median p99."
            if run.args.get("repeat", 1) > 1
            else ""
        ),
    ]
    lines += [f"- {note}" for note in run.notes]
    return "\n".join(lines) + "\n"


def _attempt(w: Window) -> str:
    return (" (again)" if w.attempt > 1 else "") + (f" (round {w.round})" if w.round > 1 else "")


def _by_scenario(windows: list[Window]) -> dict[tuple[str, str], Window]:
    """Per (scenario, server), the window its figures come from: of two attempts the better
    one; of several rounds (--repeat), the round with the median p99."""
    best: dict[tuple[str, str, int], Window] = {}
    for w in windows:
        key = (w.scenario, w.server, w.round)
        if key not in best or _better(w, best[key]):
            best[key] = w
    rounds: dict[tuple[str, str], list[Window]] = {}
    for (scenario, server, _), w in best.items():
        rounds.setdefault((scenario, server), []).append(w)
    return {key: _median_p99(ws) for key, ws in rounds.items()}


def _median_p99(windows: list[Window]) -> Window:
    def rank(w: Window) -> tuple[bool, float]:
        return not w.sustained, w.p99_ms if w.p99_ms is not None else float("inf")

    ranked = sorted(windows, key=rank)
    return ranked[(len(ranked) - 1) // 2]


def _better(a: Window, b: Window) -> bool:
    return (a.sustained, a.delivered_per_s) > (b.sustained, b.delivered_per_s)


def _num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _dirty(*paths: str) -> str:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=harness.REPO,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""
    return ", ".join(line[3:] for line in out.splitlines())


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=harness.REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.sse_fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--servers",
        default="nchan,nchan2,gateway,gateway2",
        help="comma-separated: nchan, nchan2 (2 nginx workers), gateway, gateway2 (2 gateway workers), "
        "lean (bench/lean_fanout.py, a reference Python fan-out)",
    )
    p.add_argument(
        "--scenarios",
        default="lab,viewers,storm",
        help="comma-separated: lab (1,000 clients at 50/100/ramp, 100 clients at 1,000/s), "
        "viewers (--viewers at --viewer-rates), storm (the reconnect storm)",
    )
    p.add_argument("--viewers", default="1000,10000,30000", help="subscriber counts of the viewers scenarios")
    p.add_argument("--viewer-rates", default="1,5", help="msg/s of the viewers scenarios")
    p.add_argument(
        "--viewer-duration", type=float, default=12, help="seconds of publishing per viewers window"
    )
    p.add_argument(
        "--storm-subscribers", type=int, default=30000, help="subscribers of the storm without --viewers"
    )
    p.add_argument(
        "--storm-rates",
        default="1,5",
        help="msg/s during the reconnect storms, one storm per rate (the same subscribers, back each time)",
    )
    p.add_argument("--storm-duration", type=float, default=20, help="seconds of publishing in the storm")
    p.add_argument(
        "--storm-drop-at", type=float, default=4, help="seconds into the storm when the server restarts"
    )
    p.add_argument(
        "--clients", type=int, default=1000, help="clients for the idle-memory, 50/100 msg/s and ramp runs"
    )
    p.add_argument("--small-clients", type=int, default=100, help="clients for the high-rate run")
    p.add_argument("--small-rate", type=float, default=1000, help="msg/s for the high-rate run")
    p.add_argument("--duration", type=float, default=15, help="seconds of publishing per scenario")
    p.add_argument(
        "--ramp", default="150,200,300,400,600,800,1200", help="ramp rates (msg/s) after 50 and 100"
    )
    p.add_argument("--ramp-duration", type=float, default=10, help="seconds of publishing per ramp step")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the 1,000-client windows at 50 and 100 msg/s and of the many-viewers windows, "
        "the servers interleaved; the summary takes each server's round with the median p99 (a "
        "shared machine's noise)",
    )
    p.add_argument("--no-ramp", action="store_true")
    p.add_argument("--drain", type=float, default=5, help="seconds after publishing to wait for stragglers")
    p.add_argument("--client-procs", type=int, default=2, help="load client processes")
    p.add_argument("--nchan-workers", type=int, default=1, help="nginx worker processes")
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for `fanout gateway` (repeatable)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="sample the gateway with py-spy during each window and, from its restart, the storm; raw "
        "profiles and summaries go to DIR",
    )
    p.add_argument("--quick", action="store_true", help="5 s windows, 3 s ramp steps, 5 s viewer windows")
    p.add_argument("--out", default=str(RESULTS / "sse_fanout.md"), help="markdown output ('-': none)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.ramp_duration, args.viewer_duration = 5.0, 3.0, 5.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = harness.run_and_report("sse_fanout", lambda: run(args), markdown, args.out)
    if result is None:
        return 1
    if args.out != "-":
        out = Path(args.out)
        out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "started": result.started,
                    "args": result.args,
                    "idle_kb_per_client": result.idle_kb_per_client,
                    "idle_kb_by_count": result.idle_kb_by_count,
                    "windows": [
                        asdict(w) | {"delivered_per_s": w.delivered_per_s, "sustained": w.sustained}
                        for w in result.windows
                    ],
                    "notes": result.notes,
                },
                indent=1,
            )
        )
        print(f"written to {out.with_suffix('.json')}")
        try:
            from bench import charts

            for path in charts.write(json.loads(out.with_suffix(".json").read_text()), out.parent, out.stem):
                print(f"written to {path}")
        except ImportError as exc:
            print(f"no charts: {exc} (install the bench extra: pip install -e '.[bench]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
