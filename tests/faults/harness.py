"""The fault suite's harness: a whole private pipeline, SSE subscribers, and the checks.

- `Pipeline` starts private NATS (JetStream, file store), Redis (AOF) and PostgreSQL on
  free ports (fanout/servers.py), then the services as subprocesses (`python -m fanout
  ingest|archive|gateway|feeds`), each with its ops port, and can SIGKILL, restart, pause
  and resume any of them.
- `Subscriber` is an SSE client that behaves like EventSource: on any disconnect it
  reconnects with `Last-Event-ID` = the last id it saw. Slow ones read in small pieces
  with pauses, so the gateway's per-client buffer overflows and they catch up on their own.
- `Ledger` reads the ground truth at the end (every message JetStream captured, the
  Redis streams, the catalogue) and counts stored, duplicated and lost messages; each
  subscriber is checked for gaps, duplicates and order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from fanout.servers import NatsServer, PostgresServer, RedisServer, free_port
from shared import codec
from shared.feeds import FEED_NAMES, FEEDS
from shared.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
KEY_PREFIX = "fanout"
JS_STREAM = "FEEDS"
SCHEMA = "fanout"


class HarnessError(AssertionError):
    pass


async def until(what: str, check: Callable[[], Awaitable[bool]], within: float, every: float = 0.1) -> float:
    """Poll `check` until true (there is nothing to await on foreign processes); return
    the seconds it took, or raise naming `what` after `timeout`."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return time.monotonic() - started
        if time.monotonic() - started > within:
            raise HarnessError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(every)


# --- services ---------------------------------------------------------------------------


class Service:
    """One service subprocess; its output goes to <logs>/<name>.log (appended across restarts)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path, ops: str | None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = logs / f"{name}.log"
        self.ops = ops  # base URL of /readyz, /metrics
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fanout", *self.argv],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def ready(self, within: float = 60) -> None:
        assert self.ops is not None
        ops = self.ops

        async def answers() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise HarnessError(f"{self.name} exited while starting:\n{self.log_tail()}")
            async with (
                aiohttp.ClientSession() as http,
                http.get(ops + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp,
            ):
                return resp.status == 200

        try:
            await until(f"{self.name} /readyz", answers, within)
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{self.log_tail()}") from None

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait: the exit code (None if it had to be killed)."""
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self.exit_codes.append(code)
        self.process = None
        return code

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"({self.name}: no log)"
        return f"--- {self.name} log tail ---\n" + "\n".join(text)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out


@dataclass
class Pipeline:
    root: Path
    rate: float  # messages per second per feed
    malformed_share: float = 0.02
    archivers: int = 2
    nats: NatsServer = field(init=False)
    redis: RedisServer = field(init=False)
    postgres: PostgresServer = field(init=False)
    services: dict[str, Service] = field(default_factory=dict)
    gateway_port: int = 0

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.nats = NatsServer(self.root / "nats")
        self.redis = RedisServer(self.root / "redis")
        self.postgres = PostgresServer(self.root / "postgres", database="fanout")
        self.gateway_port = free_port()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def env(self) -> dict[str, str]:
        keep = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FANOUT_", "NATS_", "REDIS_", "DATABASE_"))
        }
        return {
            **keep,
            "NATS_URL": self.nats.url,
            "REDIS_URL": self.redis.url,
            "DATABASE_URL": self.postgres.url,
            "FANOUT_KEY_PREFIX": KEY_PREFIX,
            "FANOUT_JS_STREAM": JS_STREAM,
            "FANOUT_DB_SCHEMA": SCHEMA,
            "FANOUT_LOG_FORMAT": "json",
            # Short timeouts, so that recovery after a crash is measured in seconds.
            "FANOUT_JS_ACK_WAIT": "5s",
            "FANOUT_ARCHIVE_CLAIM_IDLE": "5s",
            "FANOUT_ARCHIVE_BLOCK_MS": "1000",
            "FANOUT_ARCHIVE_TRIM_INTERVAL": "2s",
            "FANOUT_SLOW_CLIENT_TIMEOUT": "20s",
            "FANOUT_HEARTBEAT": "2s",
            "FANOUT_RETRY_MS": "200",
            "FANOUT_CLIENT_BUFFER": "100",  # slow subscribers overflow it and catch up on their own
        }

    async def start_servers(self) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.nats.start),
            asyncio.to_thread(self.redis.start),
            asyncio.to_thread(self.postgres.start),
        )

    def _service(self, name: str, argv: list[str], extra: dict[str, str], ops: str | None) -> Service:
        service = Service(name, argv, {**self.env(), **extra}, self.logs, ops)
        self.services[name] = service
        return service

    async def start_services(self) -> None:
        port = free_port()
        ingest = self._service(
            "ingestor", ["ingest"], {"FANOUT_INGEST_HTTP": f"127.0.0.1:{port}"}, f"http://127.0.0.1:{port}"
        )
        ingest.start()
        await ingest.ready()  # it creates the JetStream stream: before anything is published
        starting = [ingest]
        for i in range(1, self.archivers + 1):
            port = free_port()
            a = self._service(
                f"archiver-{i}",
                ["archive"],
                {"FANOUT_ARCHIVE_HTTP": f"127.0.0.1:{port}", "FANOUT_ARCHIVE_CONSUMER": f"archiver-{i}"},
                f"http://127.0.0.1:{port}",
            )
            a.start()
            starting.append(a)
        gw = self._service(
            "gateway", ["gateway"], {"FANOUT_GATEWAY_PORT": str(self.gateway_port)}, self.gateway_url
        )
        gw.start()
        starting.append(gw)
        await asyncio.gather(*(s.ready() for s in starting))

    async def start_simulator(self) -> None:
        port = free_port()
        sim = self._service(
            "simulator",
            ["feeds"],
            {
                "FANOUT_FEEDS_RATE": str(self.rate),
                "FANOUT_FEEDS_MALFORMED_SHARE": str(self.malformed_share),
                "FANOUT_FEEDS_SEED": "6",
                "FANOUT_FEEDS_HTTP": f"127.0.0.1:{port}",
            },
            f"http://127.0.0.1:{port}",
        )
        sim.start()
        await sim.ready()

    def stop_all(self) -> dict[str, int | None]:
        codes = {}
        for name in (
            "simulator",
            "gateway",
            *(f"archiver-{i}" for i in range(1, self.archivers + 1)),
            "ingestor",
        ):
            if name in self.services:
                service = self.services[name]
                service.stop()
                codes[name] = service.exit_codes[-1] if service.exit_codes else None
        for server in (self.nats, self.redis, self.postgres):
            with contextlib.suppress(Exception):
                server.stop()
        return codes

    def published_by_simulator(self) -> int | None:
        sim = self.services.get("simulator")
        if sim is None:
            return None
        lines = [x for x in sim.log_lines() if x.get("msg") == "published" and "published" in x]
        return sum(int(x["published"]) for x in lines) if lines else None

    async def metrics(self) -> dict[str, float]:
        """The counters that show the exactly-once paths were exercised (since each
        process's last start), summed over label values and processes."""
        wanted = (
            "fanout_gateway_catchups_total",
            "fanout_gateway_slow_disconnects_total",
            "fanout_gateway_gaps_total",
            "fanout_gateway_resets_total",
            "fanout_ingestor_redelivered_total",
            "fanout_ingestor_duplicates_total",
            "fanout_ingestor_dead_letters_total",
            "fanout_archiver_duplicates_total",
            "fanout_archiver_rows_total",
        )
        out: dict[str, float] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for service in self.services.values():
                if service.ops is None or service.process is None:
                    continue
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(service.ops + "/metrics") as resp:
                        text = await resp.text()
                    for line in text.splitlines():
                        name = line.split("{")[0].split(" ")[0]
                        if name in wanted:
                            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def log_tails(self) -> str:
        return "\n".join(s.log_tail() for s in self.services.values())


# --- subscribers ------------------------------------------------------------------------


@dataclass
class Received:
    epoch: str
    seq: int
    message_id: str


@dataclass
class Subscriber:
    name: str
    feeds: tuple[str, ...]
    slow: bool = False
    last_id: str | None = None
    received: dict[str, list[Received]] = field(default_factory=dict)
    notices: list[tuple[str, str]] = field(default_factory=list)  # (event, data) of gap/reset
    connects: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.received = {f: [] for f in self.feeds}

    def last_seq(self, feed: str) -> int:
        got = self.received[feed]
        return got[-1].seq if got else 0

    async def run(self, base_url: str, stop: asyncio.Event) -> None:
        url = f"{base_url}/v1/stream?feeds={','.join(self.feeds)}"
        rng = random.Random(self.name)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=20)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
                try:
                    async with http.get(url, headers=headers) as resp:
                        if resp.status != 200:
                            self.errors[f"HTTP {resp.status}: {(await resp.text())[:200]}"] += 1
                        else:
                            self.connects += 1
                            await self._read(resp, stop, rng)
                except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                    self.errors[type(exc).__name__] += 1
                # EventSource waits `retry` ms before reconnecting.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2 + rng.random() * 0.3)

    async def _read(self, resp: aiohttp.ClientResponse, stop: asyncio.Event, rng: random.Random) -> None:
        buf = b""
        event: dict[str, str] = {}
        reads = 0
        while not stop.is_set():
            if self.slow:
                # A slow reader: small reads with pauses, and a stall now and then, long
                # enough for the gateway's buffer for it to overflow. Still faster on
                # average than the feeds at the soak rate (200 msg/s): with 512-byte reads
                # it was not (seed 11: 26k-70k events behind each slow one after the
                # 180 s final drain), and a reader slower than the feed never catches up.
                chunk = await resp.content.read(4096)
                reads += 1
                await asyncio.sleep(0.005)
                if reads % 400 == 0:
                    await asyncio.sleep(rng.uniform(2.0, 5.0))
            else:
                chunk = await resp.content.readany()
            if not chunk:
                return  # the server closed the stream
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r").decode()
                if not line:
                    self._dispatch(event)
                    event = {}
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    event[name] = value[1:] if value.startswith(" ") else value

    def _dispatch(self, event: dict[str, str]) -> None:
        if "id" in event:
            self.last_id = event["id"]
        kind = event.get("event", "message")
        if "data" not in event:
            return
        if kind in self.received:
            data = json.loads(event["data"])
            epoch = _epoch_of(event.get("id", ""), kind)
            self.received[kind].append(Received(epoch, int(data["seq"]), str(data["message_id"])))
        elif kind in ("gap", "reset"):
            self.notices.append((kind, event["data"]))

    def check(self) -> tuple[int, int, int, list[str]]:
        """(events, gaps, duplicates, details): seq must go up by one within an epoch."""
        gaps = dups = 0
        details: list[str] = []
        events = 0
        for feed, got in self.received.items():
            events += len(got)
            for prev, cur in itertools.pairwise(got):
                if cur.epoch != prev.epoch:
                    continue  # a reset: announced (checked with the notices)
                if cur.seq == prev.seq + 1:
                    continue
                if cur.seq <= prev.seq:
                    dups += 1
                    if len(details) < 5:
                        details.append(
                            f"{self.name} {feed}: seq {cur.seq} ({cur.message_id}) again after {prev.seq}"
                        )
                else:
                    gaps += cur.seq - prev.seq - 1
                    if len(details) < 5:
                        details.append(
                            f"{self.name} {feed}: seqs {prev.seq + 1}..{cur.seq - 1} never arrived"
                        )
        return events, gaps, dups, details


def _epoch_of(cursor: str, feed: str) -> str:
    # v1:execution.ab12cd34.1732770000123-0.42,sport_event....
    body = cursor.partition(":")[2]
    for part in body.split(","):
        name, _, rest = part.partition(".")
        if name == feed:
            return rest.partition(".")[0]
    return ""


def make_subscribers(count: int, slow_share: float) -> list[Subscriber]:
    choices = [("execution",), ("sport_event",), ("execution", "sport_event")]
    slow = max(1, round(count * slow_share))
    return [Subscriber(f"sub{i:02d}", choices[i % 3], slow=i < slow) for i in range(count)]


# --- ground truth and counts ------------------------------------------------------------


@dataclass
class Truth:
    created_ms: int
    by_seq: dict[int, tuple[str, bool]]  # JetStream seq -> (feed, decodes)
    captured: int


async def read_jetstream(nats_url: str) -> Truth:
    """Every message the JetStream stream holds: its subject and whether it decodes."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(JS_STREAM)
        assert info.created is not None
        created_ms = int(info.created.timestamp() * 1000)
        sub = await js.pull_subscribe("", durable="fault-suite-check", stream=JS_STREAM)
        by_seq: dict[int, tuple[str, bool]] = {}
        remaining = info.state.messages
        while remaining > 0:
            msgs = await sub.fetch(min(1000, remaining), timeout=10)
            for m in msgs:
                feed = m.subject
                ok = True
                try:
                    codec.decode(FEEDS[feed], m.data)
                except codec.BadPayload:
                    ok = False
                except KeyError:
                    continue
                by_seq[m.metadata.sequence.stream] = (feed, ok)
                await m.ack()
            remaining -= len(msgs)
        await js.delete_consumer(JS_STREAM, "fault-suite-check")
        return Truth(created_ms, by_seq, info.state.messages)
    finally:
        await nc.close()


@dataclass
class Counts:
    captured: int = 0  # JetStream messages
    valid: int = 0
    malformed: int = 0
    stored: int = 0  # valid messages with exactly one catalogue row
    dead_lettered: int = 0  # malformed messages with a dead-letter row
    duplicates: int = 0
    lost: int = 0
    redis_duplicates: int = 0
    redis_missing: int = 0
    details: list[str] = field(default_factory=list)


async def count_everything(
    truth: Truth, redis_url: str, database_url: str
) -> tuple[Counts, dict[str, dict[tuple[str, int], str]]]:
    """Compare the ground truth with Redis and Postgres; also return, per feed, the
    message id at each (epoch, seq) as Redis holds it (for the subscriber checks)."""
    import asyncpg
    from redis.asyncio import Redis

    c = Counts(captured=truth.captured)
    keys = Keys(KEY_PREFIX)
    redis: Any = Redis.from_url(redis_url, socket_timeout=30)
    pg = await asyncpg.connect(database_url)
    at: dict[str, dict[tuple[str, int], str]] = {}
    try:
        in_redis: Counter[str] = Counter()
        for feed in (*FEED_NAMES, "dead_letter"):
            epoch = (await redis.hget(keys.meta(feed), "epoch") or b"").decode()
            at[feed] = {}
            for _, raw in await redis.xrange(keys.stream(feed)):
                entry = codec.str_entry(raw)
                in_redis[entry["message_id"]] += 1
                at[feed][(epoch, int(entry["seq"]))] = entry["message_id"]
        rows: Counter[str] = Counter()
        for feed in FEED_NAMES:
            for r in await pg.fetch(f"SELECT message_id FROM {SCHEMA}.{feed}"):
                rows[r["message_id"]] += 1
            dup = await pg.fetchval(
                f"SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {SCHEMA}.{feed}"
                " GROUP BY epoch, seq HAVING count(*) > 1) d"
            )
            c.duplicates += int(dup)
        dead: Counter[str] = Counter()
        for r in await pg.fetch(f"SELECT message_id FROM {SCHEMA}.dead_letter WHERE source = 'ingestor'"):
            dead[r["message_id"]] += 1
        for seq, (_feed, ok) in sorted(truth.by_seq.items()):
            mid = f"{truth.created_ms}.{seq}"
            if in_redis[mid] > 1:
                c.redis_duplicates += in_redis[mid] - 1
            elif in_redis[mid] == 0:
                c.redis_missing += 1
            if ok:
                c.valid += 1
                n = rows[mid]
            else:
                c.malformed += 1
                n = dead[mid]
            if n == 0 and rows[mid] + dead[mid] == 0:
                c.lost += 1
                if len(c.details) < 10:
                    c.details.append(
                        f"lost: JetStream seq {seq} ({mid}, {_feed}, {'valid' if ok else 'malformed'})"
                    )
            elif n == 0:
                c.lost += 1
                if len(c.details) < 10:
                    c.details.append(f"misfiled: {mid} stored as {'row' if rows[mid] else 'dead letter'}")
            else:
                if ok:
                    c.stored += 1
                else:
                    c.dead_lettered += 1
                c.duplicates += n - 1
        c.duplicates += c.redis_duplicates
    finally:
        await redis.aclose()
        await pg.close()
    return c, at


def check_contents(subscribers: list[Subscriber], at: dict[str, dict[tuple[str, int], str]]) -> list[str]:
    """Each event a subscriber got is the message Redis holds at that (epoch, seq)."""
    wrong = []
    for s in subscribers:
        for feed, got in s.received.items():
            for r in got:
                expected = at[feed].get((r.epoch, r.seq))
                if expected is not None and expected != r.message_id:
                    wrong.append(f"{s.name} {feed} seq {r.seq}: got {r.message_id}, stream has {expected}")
    return wrong


# --- the report -------------------------------------------------------------------------


@dataclass
class FaultRecord:
    name: str
    injected_at: float
    healed_at: float
    recovery: float | None = None  # seconds from heal to the whole chain caught up
    note: str = ""


def render(
    mode: str,
    faults: list[FaultRecord],
    counts: Counts,
    published: int | None,
    subscribers: list[Subscriber],
    audit_code: int | None,
    seconds: float,
    extra: list[str],
) -> str:
    out = [f"# Fault suite: last run ({mode} mode)", ""]
    out.append(f"Run: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {seconds:.0f} s.")
    out.append("")
    out.append("| measure | value |")
    out.append("| --- | --- |")
    kinds = Counter(f.name for f in faults)
    out.append(
        f"| faults injected | {len(faults)} ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}) |"
    )
    out.append(f"| published (simulator's count) | {published if published is not None else 'n/a'} |")
    out.append(
        f"| captured by JetStream | {counts.captured} ({counts.valid} valid, {counts.malformed} malformed) |"
    )
    out.append(f"| stored in Postgres exactly once | {counts.stored} of {counts.valid} |")
    out.append(f"| dead-lettered exactly once | {counts.dead_lettered} of {counts.malformed} |")
    out.append(f"| duplicates (Postgres + Redis) | {counts.duplicates} |")
    out.append(f"| lost | {counts.lost} |")
    out.append(
        f"| in Redis (not trimmed): missing / duplicated | {counts.redis_missing}"
        f" / {counts.redis_duplicates} |"
    )
    out.append(f"| `fanout audit` exit code | {audit_code} |")
    out.append("")
    out.append("Recovery: from the fault's end (service restarted and ready, server restarted or resumed)")
    out.append(
        "until everything JetStream held then is ingested, archived and delivered to every fast subscriber."
    )
    out.append("")
    out.append("| fault | injected | max duration (s) | max recovery (s) | mean recovery (s) |")
    out.append("| --- | --- | --- | --- | --- |")
    for kind in sorted(kinds):
        rec = [f.recovery for f in faults if f.name == kind and f.recovery is not None]
        dur = max(f.healed_at - f.injected_at for f in faults if f.name == kind)
        mx = f"{max(rec):.1f}" if rec else "n/a"
        mean = f"{sum(rec) / len(rec):.1f}" if rec else "n/a"
        out.append(f"| {kind} | {kinds[kind]} | {dur:.1f} | {mx} | {mean} |")
    out.append("")
    out.append("| subscriber | feeds | slow | connects | events | gaps | duplicates | gap/reset notices |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in subscribers:
        events, gaps, dups, _ = s.check()
        out.append(
            f"| {s.name} | {'+'.join(s.feeds)} | {'yes' if s.slow else ''} | {s.connects} | {events}"
            f" | {gaps} | {dups} | {len(s.notices)} |"
        )
    if extra:
        out.append("")
        out += [f"- {x}" for x in extra]
    return "\n".join(out) + "\n"
