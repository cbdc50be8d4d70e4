"""The fault suite's harness: a whole private pipeline, its own publisher, SSE subscribers,
and the judgement of every subscriber against an independent record (contract v2).

- `Pipeline` starts private NATS (JetStream, file store), Redis (AOF `everysec`, optionally
  a replica fed through a link that can be stalled) and PostgreSQL on free ports
  (fanout/servers.py), then the services as subprocesses (`python -m fanout ingest|archive|
  gateway`), each with its ops port. The services reach Redis through one `TcpProxy`
  (the endpoint): a failover moves the endpoint to the promoted replica, as a managed
  Redis's DNS name or virtual IP moves, so the services and their subscribers stay up.
- `Publisher` publishes both feeds to JetStream at a steady rate (with a share of
  malformed payloads) and keeps its own list: per feed, what NATS accepted (the PubAck's
  stream seq, the payload's digest, when it was sent), and what it could not confirm.
- `Subscriber` is an SSE client that behaves like EventSource: on any disconnect it
  reconnects with `Last-Event-ID` = the last id it saw; some reconnect now and then,
  some are sent away for a while (longer than the Redis hot window) and come back.
- `read_truth` reads what JetStream holds per feed stream (stream seq -> payload), joined
  with the publisher's list; `judge` holds every subscriber, PostgreSQL and Redis to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from fanout.servers import NatsServer, PostgresServer, RedisServer, TcpProxy, free_port
from services.sse_gateway import contract
from shared import codec
from shared.feeds import FEED_NAMES, FEEDS, js_stream_name
from shared.keys import Keys
from shared.proto import event_pb2, execution_pb2

ROOT = Path(__file__).resolve().parents[2]
KEY_PREFIX = "fanout"
JS_STREAM = "FEEDS"
JS_CONSUMER = "ingestor"
SCHEMA = "fanout"
KEYS = Keys(KEY_PREFIX)


class HarnessError(AssertionError):
    pass


async def until(what: str, check: Callable[[], Awaitable[bool]], within: float, every: float = 0.1) -> float:
    """Poll `check` until true (there is nothing to await on foreign processes); return
    the seconds it took, or raise naming `what` after `within`."""
    started = time.monotonic()
    last_error = ""
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except HarnessError:
            raise  # the check saw something that waiting will not mend (a process exited)
        except Exception as exc:  # noqa: BLE001 - a probe of a server that may be down: retried
            last_error = f" (last error: {type(exc).__name__}: {exc})"
        if time.monotonic() - started > within:
            raise HarnessError(f"timed out after {within:g}s waiting for {what}{last_error}")
        await asyncio.sleep(every)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
        return f"--- {self.name} log tail ({self.log_path}) ---\n" + "\n".join(text)

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
    """Private servers and the services. `replica`: a second Redis replicating the
    primary through `link` (a TcpProxy the failover stalls). `env_extra`: settings for
    every service (e.g. trimming ON)."""

    root: Path
    archivers: int = 2
    replica: bool = False
    env_extra: dict[str, str] = field(default_factory=dict)
    nats: NatsServer = field(init=False)
    redis: RedisServer = field(init=False)  # the current primary
    standby: RedisServer | None = field(init=False, default=None)  # the current replica
    endpoint: TcpProxy = field(init=False)  # the services' Redis address
    link: TcpProxy | None = field(init=False, default=None)  # replica -> primary
    postgres: PostgresServer = field(init=False)
    services: dict[str, Service] = field(default_factory=dict)
    gateway_port: int = 0

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.nats = NatsServer(self.root / "nats")
        self.redis = RedisServer(self.root / "redis-a", appendfsync="everysec")
        self.endpoint = TcpProxy(self.redis.port)
        if self.replica:
            self.link = TcpProxy(self.redis.port)
            self.standby = RedisServer(self.root / "redis-b", appendfsync="everysec",
                                       replica_of=("127.0.0.1", self.link.port))
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
            "REDIS_URL": self.endpoint.url,
            "DATABASE_URL": self.postgres.url,
            "FANOUT_KEY_PREFIX": KEY_PREFIX,
            "FANOUT_JS_STREAM": JS_STREAM,
            "FANOUT_JS_CONSUMER": JS_CONSUMER,
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
            **self.env_extra,
        }

    async def start_servers(self) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.nats.start),
            asyncio.to_thread(self.redis.start),
            asyncio.to_thread(self.postgres.start),
        )
        await asyncio.to_thread(self.endpoint.start)
        if self.link is not None and self.standby is not None:
            await asyncio.to_thread(self.link.start)
            await asyncio.to_thread(self.standby.start)
            await self.replica_in_sync()

    async def replica_in_sync(self, within: float = 60) -> None:
        standby = self.standby
        assert standby is not None

        async def linked() -> bool:
            info = await asyncio.to_thread(standby.info, "replication")
            return info.get("master_link_status") == "up"

        await until("the replica's link to its primary", linked, within)

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
        await ingest.ready()  # it creates the JetStream streams: before anything is published
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
        ops = free_port()  # the gateway's /metrics (and /readyz) port: never the shared default
        gw = self._service(
            "gateway",
            ["gateway"],
            {
                "FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{self.gateway_port}",
                "FANOUT_GATEWAY_OPS": f"127.0.0.1:{ops}",
            },
            f"http://127.0.0.1:{ops}",
        )
        gw.start()
        starting.append(gw)
        await asyncio.gather(*(s.ready() for s in starting))

    def stop_services(self) -> dict[str, int | None]:
        codes = {}
        for name in ("gateway", *(f"archiver-{i}" for i in range(1, self.archivers + 1)), "ingestor"):
            if name in self.services:
                service = self.services[name]
                service.stop()
                codes[name] = service.exit_codes[-1] if service.exit_codes else None
        return codes

    def stop_all(self) -> dict[str, int | None]:
        codes = self.stop_services()
        for server in (self.nats, self.redis, self.standby, self.postgres, self.endpoint, self.link):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        return codes

    async def not_ready(self) -> tuple[list[str], list[str]]:
        """The running services whose /readyz is not 200 (e.g. a feed reader that stopped),
        probed up to 3 times: (still red, red only at the first probe)."""
        red, transient = [], []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for name, service in self.services.items():
                if service.ops is None or not service.alive():
                    continue
                answers = []
                for attempt in range(3):
                    try:
                        async with http.get(service.ops + "/readyz") as resp:
                            if resp.status == 200:
                                break
                            answers.append(f"/readyz {resp.status} {(await resp.text())[:300]}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        answers.append(f"/readyz {type(exc).__name__}")
                    if attempt < 2:
                        await asyncio.sleep(0.5)  # a probe's interval, as an orchestrator's
                else:
                    red.append(f"{name}: {answers[-1]}")
                    continue
                if answers:
                    transient.append(f"{name}: the first probe after the run said {answers[0]}")
        return red, transient

    def dead_services(self) -> list[str]:
        return [n for n, s in self.services.items() if s.process is not None and not s.alive()]

    async def failover(self) -> None:
        """The primary is gone: promote the replica and move the endpoint to it; the old
        primary's data folder becomes the new replica (started by `restore_replica`)."""
        assert self.standby is not None and self.link is not None
        await asyncio.to_thread(self.standby.promote)
        self.endpoint.retarget(self.standby.port)
        self.redis, self.standby = self.standby, self.redis

    async def restore_replica(self) -> None:
        """Start the standby as a replica of the current primary (a full resync)."""
        assert self.standby is not None and self.link is not None
        self.link.retarget(self.redis.port)
        self.standby.replica_of = ("127.0.0.1", self.link.port)
        await asyncio.to_thread(self.standby.start)
        await self.replica_in_sync()

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
            "fanout_ingestor_replayed_total",
            "fanout_archiver_duplicates_total",
            "fanout_archiver_rows_total",
            "fanout_archiver_trimmed_total",
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

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(s.log_tail(lines) for s in self.services.values())


# --- the publisher: the independent record ----------------------------------------------


def digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=8).digest()


@dataclass
class Sent:
    digest: bytes
    malformed: bool
    sent_at: float  # time.time() just before the publish


@dataclass
class Publisher:
    """Publishes both feeds to JetStream (`rate` messages/s per feed) and keeps, per feed,
    what NATS accepted (PubAck seq -> what was sent) and what it could not confirm."""

    nats_url: str
    rate: float
    malformed_share: float = 0.02
    seed: int = 6
    accepted: dict[str, dict[int, Sent]] = field(default_factory=lambda: {f: {} for f in FEED_NAMES})
    unconfirmed: dict[str, dict[bytes, Sent]] = field(default_factory=lambda: {f: {} for f in FEED_NAMES})
    wrong_stream: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    _n: int = 0

    def payload(self, feed: str, rng: random.Random) -> tuple[bytes, bool]:
        self._n += 1
        n = self._n
        if rng.random() < self.malformed_share:
            return f"\x00not protobuf: {feed} {n}".encode(), True
        if feed == "execution":
            msg: Any = execution_pb2.execution(
                symbol=rng.choice(["AAPL", "MSFT", "NVDA"]), market="NASDAQ", price=100 + n % 50,
                quantity=1 + n % 7, executionEpoch=n, stateSymbol="CA",
            )
        else:
            msg = event_pb2.event(sport=1 + n % 7, match_title=f"match {n}", data_event=f"event {n}")
        return msg.SerializeToString(), False

    async def run(self, stop: asyncio.Event) -> None:
        import nats

        async def count_error(exc: Exception) -> None:
            self.errors[f"connection: {type(exc).__name__}"] += 1

        nc = await nats.connect(self.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                connect_timeout=2, error_cb=count_error)
        js = nc.jetstream(timeout=3)
        try:
            await asyncio.gather(*(self._feed(js, feed, stop) for feed in FEED_NAMES))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)

    async def _feed(self, js: Any, feed: str, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.seed}-{feed}")
        expected_stream = js_stream_name(JS_STREAM, feed)
        in_flight = asyncio.Semaphore(500)
        tasks: set[asyncio.Task[None]] = set()

        async def one(payload: bytes, sent: Sent) -> None:
            try:
                ack = await js.publish(feed, payload)
            except Exception as exc:  # noqa: BLE001 - NATS down or slow: unknown whether it was stored
                self.errors[type(exc).__name__] += 1
                self.unconfirmed[feed][sent.digest] = sent
            else:
                if ack.stream != expected_stream:
                    self.wrong_stream.append(f"{feed} seq {ack.seq} went to stream {ack.stream}")
                self.accepted[feed][int(ack.seq)] = sent
            finally:
                in_flight.release()

        tick = 1.0 / self.rate
        next_at = time.monotonic()
        while not stop.is_set():
            payload, malformed = self.payload(feed, rng)
            await in_flight.acquire()
            t = asyncio.create_task(one(payload, Sent(digest(payload), malformed, time.time())))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            next_at += tick
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)  # the publishing rate
            elif delay < -1.0:
                next_at = time.monotonic()  # NATS was down: do not burst to make up for it
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def sent_at(self, feed: str, seq: int) -> float | None:
        s = self.accepted[feed].get(seq)
        return s.sent_at if s else None

    def count(self) -> int:
        return sum(len(a) for a in self.accepted.values())


# --- subscribers ------------------------------------------------------------------------


@dataclass
class Got:
    kind: str  # "message" or "malformed"
    epoch: str
    seq: int
    message_id: str
    at: float  # time.time() of receipt
    cursor: str


@dataclass
class Subscriber:
    """An EventSource-like client of `/v1/stream`. `reconnect_every`: it drops its
    connection now and then and resumes with its last id; `away()`/`back()`: it is
    disconnected for a while (the harness does it across a fault)."""

    name: str
    feeds: tuple[str, ...]
    slow: bool = False
    reconnect_every: float | None = None
    wanders: bool = False  # sent away across faults (not a measure of live latency)
    last_id: str | None = None
    received: dict[str, list[Got]] = field(default_factory=dict)
    notices: list[tuple[str, str]] = field(default_factory=list)  # (event, data): gap, reset, unknown
    bad_ids: list[str] = field(default_factory=list)
    off_contract: list[str] = field(default_factory=list)  # data outside its event's JSON Schema
    refusals: list[str] = field(default_factory=list)  # non-200 answers: an EventSource stops for good
    connects: int = 0
    resumes: list[tuple[float, str | None]] = field(default_factory=list)  # (when, Last-Event-ID)
    errors: Counter[str] = field(default_factory=Counter)
    present: asyncio.Event = field(default_factory=asyncio.Event)
    _resp: aiohttp.ClientResponse | None = None

    def __post_init__(self) -> None:
        self.received = {f: [] for f in self.feeds}
        self.present.set()

    def last_seq(self, feed: str) -> int:
        got = self.received[feed]
        return got[-1].seq if got else 0

    def away(self) -> None:
        self.present.clear()
        if self._resp is not None:
            self._resp.close()

    def back(self) -> None:
        self.present.set()

    def reconnect(self) -> None:
        """Drop the connection now: it resumes at once with its last id."""
        if self._resp is not None:
            self._resp.close()

    async def run(self, base_url: str, stop: asyncio.Event) -> None:
        url = f"{base_url}/v1/stream?feeds={','.join(self.feeds)}"
        rng = random.Random(self.name)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=20)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                await self.present.wait()
                # What EventSource sends: the gateway answers it in-band (200) rather than
                # with a 4xx/5xx, after which an EventSource would never reconnect.
                headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
                if self.last_id:
                    headers["Last-Event-ID"] = self.last_id
                try:
                    async with http.get(url, headers=headers) as resp:
                        if resp.status != 200:
                            text = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                            self.errors[text] += 1
                            self.refusals.append(f"{text} (Last-Event-ID {self.last_id})")
                        else:
                            self.connects += 1
                            self.resumes.append((time.time(), self.last_id))
                            self._resp = resp
                            try:
                                await self._read(resp, stop, rng)
                            finally:
                                self._resp = None
                except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                    if self.present.is_set():
                        self.errors[type(exc).__name__] += 1
                # EventSource waits `retry` ms before reconnecting.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2 + rng.random() * 0.3)

    async def _read(self, resp: aiohttp.ClientResponse, stop: asyncio.Event, rng: random.Random) -> None:
        buf = b""
        event: dict[str, str] = {}
        reads = 0
        leave_at = (
            time.monotonic() + self.reconnect_every * rng.uniform(0.5, 1.5) if self.reconnect_every else None
        )
        while not stop.is_set() and self.present.is_set():
            if leave_at is not None and time.monotonic() > leave_at:
                return  # drop the connection; the loop resumes with the last id
            if self.slow:
                # A slow reader: small reads with pauses, and a stall now and then, long
                # enough for the gateway's buffer for it to overflow; faster on average
                # than the feeds, or it could never catch up.
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
        now = time.time()
        try:  # every event held to its published schema (services/sse_gateway/schemas)
            contract.validate_event(kind, event["data"])
        except contract.EventSchemaError as exc:
            self.off_contract.append(str(exc))
        if kind in self.received or kind == "malformed":
            data = json.loads(event["data"])
            feed = kind if kind in self.received else str(data.get("feed"))
            if feed not in self.received:
                self.notices.append((kind, event["data"]))
                return
            message_id = str(data["message_id"])
            seq = int(data["seq"])
            epoch = message_id.rpartition(".")[0]
            cursor = event.get("id", "")
            if cursor_part(cursor, feed) != (epoch, seq):
                self.bad_ids.append(f"{feed} seq {seq} ({message_id}) came with id {cursor!r}")
            self.received[feed].append(
                Got("malformed" if kind == "malformed" else "message", epoch, seq, message_id, now, cursor)
            )
        else:
            self.notices.append((kind, event["data"]))  # gap, reset, or anything unexpected


def cursor_part(cursor: str, feed: str) -> tuple[str, int] | None:
    """(epoch, seq) of `feed` in a v2 cursor `v2:execution.<epoch>.<seq>,sport_event...`."""
    version, _, body = cursor.partition(":")
    if version != "v2":
        return None
    for part in body.split(","):
        name, _, rest = part.partition(".")
        if name == feed:
            epoch, _, seq = rest.rpartition(".")
            return (epoch, int(seq)) if seq.isdigit() else None
    return None


def make_subscribers(
    count: int, slow: int, reconnecting: int, reconnect_every: float = 7.0
) -> list[Subscriber]:
    choices = [("execution",), ("sport_event",), ("execution", "sport_event")]
    return [
        Subscriber(
            f"sub{i:02d}", choices[i % 3], slow=i < slow,
            reconnect_every=reconnect_every if slow <= i < slow + reconnecting else None,
        )
        for i in range(count)
    ]


# --- progress: is everything JetStream held ingested, archived and delivered? ------------


class Probe:
    """Reads progress from the private servers (Redis directly on the current primary),
    reconnecting after their restarts."""

    def __init__(self, p: Pipeline) -> None:
        self.p = p
        self._nc: Any = None
        self._pg: Any = None

    async def close(self) -> None:
        for closer in (self._nc and self._nc.close, self._pg and self._pg.close):
            if closer:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(closer(), 5)

    async def _js(self) -> Any:
        import nats

        if self._nc is None or not self._nc.is_connected:
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
            self._nc = None
            self._nc = await nats.connect(self.p.nats.url, connect_timeout=2, allow_reconnect=False)
        return self._nc.jetstream(timeout=2)

    async def _postgres(self) -> Any:
        import asyncpg

        if self._pg is None or self._pg.is_closed():
            self._pg = None
            self._pg = await asyncpg.connect(self.p.postgres.url, timeout=2)
        return self._pg

    async def js_tops(self) -> dict[str, int]:
        try:
            js = await self._js()
            return {f: int((await js.stream_info(js_stream_name(JS_STREAM, f))).state.last_seq)
                    for f in FEED_NAMES}
        except Exception:
            self._nc = None
            raise

    async def redis_tops(self) -> dict[str, int]:
        """Per feed the seq of the stream's top (XINFO's last-generated-id)."""
        return await asyncio.to_thread(redis_tops, self.p.redis)

    async def archived(self, feed: str, epoch: str, upto: int) -> int:
        """How many seqs 1..upto of the epoch PostgreSQL holds (feed table + dead letters)."""
        try:
            pg = await self._postgres()
            return int(await pg.fetchval(
                f"SELECT count(DISTINCT seq) FROM (SELECT seq FROM {SCHEMA}.{feed} WHERE epoch = $1"
                f" UNION ALL SELECT seq FROM {SCHEMA}.dead_letter WHERE feed = $2 AND epoch = $1) u"
                " WHERE seq <= $3", epoch, feed, upto,
            ))
        except Exception:
            self._pg = None
            raise


def redis_tops(server: RedisServer) -> dict[str, int]:
    out = {}
    for feed in FEED_NAMES:
        try:
            info: Any = server.call("XINFO", "STREAM", KEYS.stream(feed))
        except Exception as exc:  # a missing stream (lost, evicted) has no top
            if "no such key" in str(exc):
                out[feed] = 0
                continue
            raise
        fields = dict(zip(info[::2], info[1::2], strict=True)) if isinstance(info, list) else info
        last = fields.get(b"last-generated-id") or fields.get("last-generated-id") or b"0-0"
        out[feed] = int((last.decode() if isinstance(last, bytes) else str(last)).partition("-")[0])
    return out


def redis_first(server: RedisServer, feed: str) -> int | None:
    """The seq of the first entry Redis holds for a feed (None: no entry)."""
    first: Any = server.call("XRANGE", KEYS.stream(feed), "-", "+", "COUNT", "1")
    if not first:
        return None
    entry_id = first[0][0]
    return int((entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)).partition("-")[0])


async def caught_up(probe: Probe, subs: list[Subscriber], epochs: dict[str, str], within: float,
                    fast_only: bool = True) -> float:
    """Seconds until everything JetStream held at the call is in Redis, in PostgreSQL and
    delivered to the (fast, present) subscribers."""
    started = time.monotonic()
    tops: dict[str, int] = {}

    async def js_answers() -> bool:
        tops.update(await probe.js_tops())
        return True

    await until("JetStream to answer", js_answers, within)

    async def ingested() -> bool:
        have = await probe.redis_tops()
        return all(have[f] >= tops[f] for f in FEED_NAMES)

    def left() -> float:
        return max(1.0, within - (time.monotonic() - started))

    await until(f"Redis to hold every seq up to {tops}", ingested, left())

    async def archived() -> bool:
        for f in FEED_NAMES:
            if await probe.archived(f, epochs[f], tops[f]) < tops[f]:
                return False
        return True

    await until(f"PostgreSQL to hold every seq up to {tops}", archived, left(), every=0.3)

    async def delivered() -> bool:
        return not behind(subs, tops, fast_only)

    try:
        await until("the subscribers to catch up", delivered, left())
    except HarnessError as exc:
        raise HarnessError(f"{exc}; behind: {behind(subs, tops, fast_only)}") from None
    return time.monotonic() - started


def behind(subs: list[Subscriber], tops: dict[str, int], fast_only: bool) -> str:
    """Which subscribers are behind the tops, and how far (empty: none)."""
    out = []
    for s in subs:
        if (fast_only and s.slow) or not s.present.is_set():
            continue
        lag = {f: tops[f] - s.last_seq(f) for f in s.feeds if s.last_seq(f) < tops[f]}
        if lag:
            out.append(f"{s.name}{' (slow)' if s.slow else ''} lag {lag}, at "
                       f"{ {f: s.last_seq(f) for f in s.feeds} }, {s.connects} connects, "
                       f"errors {dict(s.errors.most_common(3))}")
    return "; ".join(out)


# --- the truth: JetStream's per-feed streams joined with the publisher's list ------------


@dataclass
class FeedTruth:
    feed: str
    epoch: str
    by_seq: dict[int, Sent]  # stream seq -> the message (digest, malformed, when sent)
    top: int


async def stream_epochs(nats_url: str) -> dict[str, str]:
    """Per feed the epoch: its JetStream stream's creation time in Unix ms."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=10)
        return {f: _epoch(await js.stream_info(js_stream_name(JS_STREAM, f))) for f in FEED_NAMES}
    finally:
        await nc.close()


def _epoch(info: Any) -> str:
    created: dt.datetime = info.created
    return str((created - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1))


async def read_truth(nats_url: str, pub: Publisher) -> tuple[dict[str, FeedTruth], list[str]]:
    """Every message each feed's JetStream stream holds, checked against the publisher's
    list: (truth per feed, problems: NATS losing or inventing messages)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    problems: list[str] = []
    out: dict[str, FeedTruth] = {}
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=10)
        for feed in FEED_NAMES:
            name = js_stream_name(JS_STREAM, feed)
            info = await js.stream_info(name)
            top = int(info.state.last_seq)
            sub = await js.pull_subscribe(
                feed, stream=name,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
            )
            by_seq: dict[int, Sent] = {}
            while len(by_seq) < info.state.messages:
                for m in await sub.fetch(min(1000, info.state.messages - len(by_seq)), timeout=10):
                    d = digest(m.data)
                    seq = m.metadata.sequence.stream
                    sent = pub.accepted[feed].get(seq) or pub.unconfirmed[feed].get(d)
                    try:
                        codec.decode(FEEDS[feed], m.data)
                        malformed = False
                    except codec.BadPayload:
                        malformed = True
                    if sent is None or sent.digest != d:
                        problems.append(f"NATS: {name} seq {seq} holds a message the publisher did not send")
                        sent = Sent(d, malformed, 0.0)
                    by_seq[seq] = sent
            await sub.unsubscribe()
            missing = [s for s in range(1, top + 1) if s not in by_seq]
            if missing:
                problems.append(f"NATS: {name} lacks seqs {_spans(missing)} (file store lost them)")
            for seq, sent in pub.accepted[feed].items():
                if seq not in by_seq or by_seq[seq].digest != sent.digest:
                    problems.append(f"NATS: {name} seq {seq} was acked to the publisher but is not stored")
            out[feed] = FeedTruth(feed, _epoch(info), by_seq, top)
    finally:
        await nc.close()
    return out, problems


def _spans(seqs: Iterable[int]) -> str:
    """1,2,3,7,9,10 -> '1..3, 7, 9..10' (the first few spans)."""
    spans: list[list[int]] = []
    for s in sorted(seqs):
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    text = [f"{a}..{b}" if a != b else str(a) for a, b in spans[:8]]
    return ", ".join(text) + (f" (+{len(spans) - 8} more spans)" if len(spans) > 8 else "")


# --- the judgement ------------------------------------------------------------------------


@dataclass
class SubVerdict:
    events: int = 0
    missing: int = 0
    duplicates: int = 0
    wrong: int = 0  # another epoch, another message id, malformed <-> message
    notices: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.duplicates or self.wrong or self.notices)


def judge_subscriber(s: Subscriber, truth: dict[str, FeedTruth]) -> SubVerdict:
    """Per feed, every seq 1..top exactly once, in order, of the right epoch and kind;
    no notice. Each problem says who, what and where."""
    v = SubVerdict(notices=len(s.notices))
    for kind, data in s.notices[:3]:
        v.details.append(f"{s.name}: notice `event: {kind}` {data[:200]}")
    for bad in s.bad_ids[:3]:
        v.details.append(f"{s.name}: {bad}")
    v.wrong += len(s.bad_ids)
    for off in s.off_contract[:3]:
        v.details.append(f"{s.name}: outside the event schemas: {off}")
    v.wrong += len(s.off_contract)
    for refusal in s.refusals[:3]:
        v.details.append(f"{s.name}: {refusal}: an EventSource would have stopped for good")
    v.wrong += len(s.refusals)
    for feed, got in s.received.items():
        t = truth[feed]
        v.events += len(got)
        expect = 1
        for i, g in enumerate(got):
            where = f"{s.name} {feed} event #{i + 1}"
            if g.epoch != t.epoch:
                v.wrong += 1
                v.details.append(f"{where}: seq {g.seq} of epoch {g.epoch!r}, JetStream's epoch is {t.epoch}")
                continue
            if g.seq < expect:
                v.duplicates += 1
                after = " (after the last expected one)" if expect > t.top else ""
                v.details.append(f"{where}: seq {g.seq} again{after}, expected {expect}")
                continue
            if g.seq > t.top:
                v.wrong += 1
                v.details.append(f"{where}: seq {g.seq} beyond JetStream's top {t.top}")
                continue
            if g.seq > expect:
                v.missing += g.seq - expect
                what = "the first event(s)" if expect == 1 else "seqs"
                v.details.append(f"{where}: {what} {expect}..{g.seq - 1} never arrived (got {g.seq} next)")
            sent = t.by_seq.get(g.seq)
            if g.message_id != f"{t.epoch}.{g.seq}":
                v.wrong += 1
                v.details.append(f"{where}: seq {g.seq} came as message id {g.message_id}")
            if sent is not None and sent.malformed != (g.kind == "malformed"):
                v.wrong += 1
                v.details.append(f"{where}: seq {g.seq} came as {g.kind}, JetStream's payload is "
                                 f"{'malformed' if sent.malformed else 'valid'}")
            expect = g.seq + 1
        if expect <= t.top:
            v.missing += t.top - expect + 1
            v.details.append(f"{s.name} {feed}: seqs {expect}..{t.top} never arrived (the tail)")
    del v.details[8:]
    return v


@dataclass
class StoreVerdict:
    stored: int = 0  # seqs in exactly one place, the right one
    dead_lettered: int = 0
    valid: int = 0
    malformed: int = 0
    lost: int = 0
    duplicates: int = 0
    misfiled: int = 0
    redis_problems: int = 0
    details: list[str] = field(default_factory=list)


async def judge_stores(truth: dict[str, FeedTruth], redis: RedisServer, database_url: str) -> StoreVerdict:
    """PostgreSQL: each (epoch, seq) exactly once in the feed table + dead_letter, valid
    ones as rows, malformed ones as dead letters. Redis: the hot window contiguous, ids
    `<seq>-0`, up to the top, the right message ids and epoch."""
    import asyncpg

    v = StoreVerdict()
    pg = await asyncpg.connect(database_url)
    try:
        for feed, t in truth.items():
            rows = Counter[int]()
            for r in await pg.fetch(f"SELECT seq, message_id, epoch FROM {SCHEMA}.{feed}"):
                if r["epoch"] != t.epoch:
                    v.duplicates += 1
                    v.details.append(f"PostgreSQL {feed}: row {r['message_id']} of epoch {r['epoch']}")
                    continue
                rows[int(r["seq"])] += 1
                if r["message_id"] != f"{t.epoch}.{r['seq']}":
                    v.misfiled += 1
                    v.details.append(f"PostgreSQL {feed}: seq {r['seq']} has message id {r['message_id']}")
            dead = Counter[int]()
            for r in await pg.fetch(
                f"SELECT seq, epoch, message_id FROM {SCHEMA}.dead_letter WHERE feed = $1", feed
            ):
                if r["epoch"] != t.epoch or r["seq"] is None:
                    v.duplicates += 1
                    v.details.append(f"PostgreSQL dead_letter {feed}: {r['message_id']} at epoch "
                                     f"{r['epoch']} seq {r['seq']}")
                    continue
                dead[int(r["seq"])] += 1
            lost, dups, misfiled = [], [], []
            for seq in range(1, t.top + 1):
                sent = t.by_seq.get(seq)
                malformed = bool(sent and sent.malformed)
                if malformed:
                    v.malformed += 1
                else:
                    v.valid += 1
                n = rows[seq] + dead[seq]
                if n == 0:
                    lost.append(seq)
                elif n > 1:
                    dups.append(seq)
                elif (dead[seq] == 1) != malformed:
                    misfiled.append(seq)
                elif malformed:
                    v.dead_lettered += 1
                else:
                    v.stored += 1
            beyond = [s for s in (*rows, *dead) if s > t.top or s < 1]
            v.lost += len(lost)
            v.duplicates += sum(rows[s] + dead[s] - 1 for s in dups) + len(beyond)
            v.misfiled += len(misfiled)
            spans = (("lost", lost), ("more than once", dups), ("misfiled (row <-> dead letter)", misfiled),
                     ("beyond the top", beyond))
            for what, seqs in spans:
                if seqs:
                    v.details.append(f"PostgreSQL {feed} epoch {t.epoch}: {what}: seqs {_spans(seqs)}")
    finally:
        await pg.close()
    for feed, t in truth.items():
        for problem in await asyncio.to_thread(_judge_redis, redis, feed, t):
            v.redis_problems += 1
            v.details.append(problem)
    return v


def _judge_redis(redis: RedisServer, feed: str, t: FeedTruth) -> list[str]:
    out = []
    meta: Any = redis.call("HGETALL", KEYS.meta(feed))
    pairs = meta.items() if isinstance(meta, dict) else zip(meta[::2], meta[1::2], strict=True)
    meta_d = {(k.decode() if isinstance(k, bytes) else k): (x.decode() if isinstance(x, bytes) else x)
              for k, x in pairs}
    if meta_d.get("epoch") != t.epoch:
        out.append(f"Redis {feed}: meta epoch {meta_d.get('epoch')!r}, JetStream's {t.epoch}")
    entries: Any = redis.call("XRANGE", KEYS.stream(feed), "-", "+")
    seqs = []
    for entry_id, raw in entries or []:
        raw_fields = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else raw
        fields = codec.str_entry(raw_fields)
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        seq = int(fields.get("seq", "-1"))
        seqs.append(seq)
        if eid != f"{seq}-0" or fields.get("message_id") != f"{t.epoch}.{seq}":
            out.append(f"Redis {feed}: entry {eid} has seq {seq}, message id {fields.get('message_id')}")
        sent = t.by_seq.get(seq)
        if sent is not None and sent.malformed != ("error" in fields):
            out.append(f"Redis {feed}: entry {eid} malformed={('error' in fields)}, JetStream's payload "
                       f"malformed={sent.malformed}")
    if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        holes = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
        out.append(f"Redis {feed}: the stream is not contiguous: holes {_spans(holes)}, "
                   f"{len(seqs) - len(set(seqs))} repeated")
    top = redis_tops(redis)[feed]  # trimming may have emptied the stream; its top stays
    if top != t.top or (seqs and seqs[-1] != t.top):
        end = seqs[-1] if seqs else "no entry"
        out.append(f"Redis {feed}: the stream's top is {top} (last entry: {end}), JetStream's {t.top}")
    return out[:6]


# --- the report -------------------------------------------------------------------------


@dataclass
class FaultRecord:
    name: str
    injected_at: float  # time.time()
    healed_at: float
    recovery: float | None = None  # seconds from heal to the whole chain caught up
    note: str = ""
    latency: tuple[int, float, float] | None = None  # (events, p50 ms, p99 ms) during the window
    from_postgres: int = 0  # subscribers that came back below Redis's first entry


def live_latency(
    subs: list[Subscriber], pub: Publisher, start: float, end: float
) -> tuple[int, float, float]:
    """Publish -> SSE receipt of the events published within [start, end], as received by
    the fast subscribers that were connected (not sent away): (events, p50 ms, p99 ms)."""
    values = []
    for s in subs:
        if s.slow or s.reconnect_every or s.wanders:
            continue
        for feed, got in s.received.items():
            for g in got:
                sent = pub.sent_at(feed, g.seq)
                if sent is not None and start <= sent <= end:
                    values.append((g.at - sent) * 1000)
    if not values:
        return 0, 0.0, 0.0
    return len(values), percentile(values, 0.5), percentile(values, 0.99)


def render(mode: str, faults: list[FaultRecord], stores: StoreVerdict, truth: dict[str, FeedTruth],
           pub: Publisher, subscribers: list[tuple[Subscriber, SubVerdict]], audit_code: int | None,
           seconds: float, extra: list[str]) -> str:
    out = [f"# Fault suite: last run ({mode} mode)", ""]
    out.append(f"Run: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {seconds:.0f} s.")
    out.append("")
    out.append("| measure | value |")
    out.append("| --- | --- |")
    kinds = Counter(f.name for f in faults)
    out.append(
        f"| faults injected | {len(faults)} ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}) |"
    )
    out.append(f"| published (acked by JetStream / unconfirmed) | {pub.count()} / "
               f"{sum(len(u) for u in pub.unconfirmed.values())} |")
    out.append("| in JetStream per feed (top seq) | "
               + ", ".join(f"{f} {t.top} (epoch {t.epoch})" for f, t in truth.items()) + " |")
    out.append(f"| stored in PostgreSQL exactly once | {stores.stored} of {stores.valid} |")
    out.append(f"| dead-lettered exactly once | {stores.dead_lettered} of {stores.malformed} |")
    out.append(f"| lost / duplicated / misfiled in PostgreSQL | {stores.lost} / {stores.duplicates} /"
               f" {stores.misfiled} |")
    out.append(f"| Redis hot window problems | {stores.redis_problems} |")
    out.append(f"| `fanout audit` exit code | {audit_code} |")
    out.append("")
    out.append("Recovery: from the fault's end until everything JetStream held then is in Redis, in")
    out.append("PostgreSQL and delivered to every fast subscriber. Latency: publish -> SSE receipt of")
    out.append("the events published from the fault's start to the recovery, at the connected fast")
    out.append("subscribers. From PostgreSQL: subscribers that came back below Redis's first entry.")
    out.append("")
    out.append("| fault | at (s) | duration (s) | recovery (s) | events | p50 ms | p99 ms | from PostgreSQL |"
               " note |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    t0 = faults[0].injected_at if faults else 0.0
    for f in faults:
        rec = "-" if f.recovery is None else f"{f.recovery:.1f}"
        n, p50, p99 = f.latency or (0, 0.0, 0.0)
        out.append(f"| {f.name} | {f.injected_at - t0:.0f} | {f.healed_at - f.injected_at:.1f} | {rec} | {n}"
                   f" | {p50:.0f} | {p99:.0f} | {f.from_postgres} | {f.note.strip()[:160]} |")
    out.append("")
    out.append("| subscriber | feeds | kind | connects | events | missing | duplicates | wrong | notices |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, v in subscribers:
        kind = "slow" if s.slow else "reconnecting" if s.reconnect_every else "wanderer" if s.wanders else ""
        out.append(f"| {s.name} | {'+'.join(s.feeds)} | {kind} | {s.connects} | {v.events} | {v.missing}"
                   f" | {v.duplicates} | {v.wrong} | {v.notices} |")
    if extra:
        out.append("")
        out += [f"- {x}" for x in extra]
    return "\n".join(out) + "\n"
