"""Hostile HTTP clients against a real gateway process (`fanout gateway` on a free port,
isolated Redis prefix, tokens configured): malformed and hostile Last-Event-ID values and
query parameters get a 4xx JSON answer, never a 500 or a traceback; thousands of
connections opened and dropped leave nothing behind; clients that never read do not make
the gateway's memory grow without bound; missing or wrong tokens are 401/403.

The gateway's RSS is read from /proc/<pid>/status and printed (`-s` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared import codec, scripts
from shared.connections import redis_client
from shared.feeds import FEEDS, message_id
from shared.keys import Keys
from shared.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "g00d-t0ken"
EXEC_ONLY = "exec-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Gateway:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    settings: Settings
    log: Path
    ops: str = ""  # base URL of the ops port (/metrics)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


EPOCH = "1764321212345"


def _append_calls(
    settings: Settings, feed: str, count: int, start: int = 0, pad: int = 0
) -> Iterator[tuple[list[str], list[str | int]]]:
    """(keys, args) of ingest_append calls appending `count` entries at seqs `start` + 1
    on (contiguous, as JetStream numbers them), 200 per call."""
    keys = Keys(settings.key_prefix)
    per_call = 200
    for base in range(start, start + count, per_call):
        n = min(per_call, start + count - base)
        messages = []
        for i in range(base, base + n):
            if feed == "execution":
                own = {
                    "symbol": "AAPL",
                    "market": "NASDAQ",
                    "price": "189.25",
                    "quantity": "300",
                    "executionEpoch": str(1764321212345 + i),
                    "stateSymbol": "CA" + "x" * pad,
                }
            else:
                own = {
                    "sport": "BASKETBALL",
                    "match_title": "Lakers vs Celtics",
                    "data_event": "x" * (pad + 5),
                }
            mid = message_id(EPOCH, i + 1)
            entry = codec.entry_fields(mid, own, "2026-11-28T09:13:32.123Z", "2026-11-28T09:13:32.125Z")
            messages.append((i + 1, mid, entry))
        yield scripts.ingest_append_call(keys, feed, EPOCH, messages, 3600)


async def append(redis: Any, settings: Settings, feed: str, count: int, start: int = 0, pad: int = 0) -> None:
    script = scripts.register(redis, "ingest_append")
    for keys, args in _append_calls(settings, feed, count, start, pad):
        await script(keys=keys, args=args)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """ONE gateway process for the whole module (a start costs a second or two)."""
    import redis as redis_sync

    settings = Settings.from_env(
        os.environ, key_prefix=f"test:hostile{uuid.uuid4().hex[:8]}", db_schema=f"h{uuid.uuid4().hex[:8]}"
    )
    client = redis_sync.Redis.from_url(settings.redis_url)
    script = client.register_script(scripts.source("ingest_append"))
    for feed in FEEDS:
        for keys, args in _append_calls(settings, feed, 5):
            script(keys=keys, args=args)
    port, ops = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "FANOUT_KEY_PREFIX": settings.key_prefix,
        "FANOUT_DB_SCHEMA": settings.db_schema,
        "FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "FANOUT_GATEWAY_OPS": f"127.0.0.1:{ops}",
        "FANOUT_TOKENS": f"{TOKEN}=*;{EXEC_ONLY}=execution",
        "FANOUT_LOG_FORMAT": "json",
        "FANOUT_CLIENT_BUFFER": "200",
        "FANOUT_SLOW_CLIENT_TIMEOUT": "5s",
        "FANOUT_HEARTBEAT": "1s",
    }
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = _spawn(env, log)
    gw = Gateway(f"http://127.0.0.1:{port}", port, process, settings, log, f"http://127.0.0.1:{ops}")
    try:
        _wait_ready(gw)
        yield gw
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
            client.delete(key)
        client.close()


@pytest.fixture(autouse=True)
def no_tracebacks(gateway: Gateway) -> Iterator[None]:
    """What the gateway logged during each test holds no traceback."""
    start = len(gateway.log_text())
    yield
    errors = [line for line in gateway.log_text()[start:].splitlines() if "Traceback" in line]
    if errors:
        raise AssertionError(f"the gateway logged {len(errors)} tracebacks; the first:\n{errors[0][:3000]}")


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fanout", "gateway"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(gw: Gateway) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        assert gw.process.poll() is None, gw.log_text()
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(gw.url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.1)  # a foreign process: nothing to await


async def raw_request(
    port: int, request: bytes, read_timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return (status, headers, the first body bytes). Status 0: the
    server closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = b""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionResetError):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        if not head:
            return 0, {}, b""
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        body = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            body = await asyncio.wait_for(reader.read(4096), 2)
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def get(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


HOSTILE_CURSORS = [
    "garbage",
    "v2:",
    "v3:execution.1764321212345.1",
    "v2:execution",
    "v2:execution.1764321212345",
    "v2:execution.1764321212345.x",
    "v2:execution.1764321212345.-5",
    "v2:execution.-1.1",
    "v2:execution.1764321212345.99999999999999999999999",
    "v2:execution.99999999999999999999999.1",
    "v2:execution.ab12cd34.1",  # a v1-style epoch
    "v2:nosuchfeed.1764321212345.1",
    "v2:execution.1764321212345.1,execution.1764321212345.2",
    "v2:execution.'; DROP TABLE execution; --.1",
    "v2:execution.<script>alert(1)</script>.1",
    "v2:execution.1764321212345.1" + "," * 5000,
    "v2:" + ",".join(f"execution.1764321212345.{i}" for i in range(500)),
    "v2:exécution.1764321212345.1",
    "v2:execution.\u202e1764321212345.1",
    "v2:execution.1764321212345.1\x00",
    # v1 that is not a well-formed v1 cursor (a well-formed one is answered in-band)
    "v1:",
    "v1:execution",
    "v1:execution.ab12cd34.1-0",
    "v1:execution.ab12cd34.x-y.z",
    "v1:nosuchfeed.ab12cd34.1-0.1",
    "v1:execution.'; DROP TABLE execution; --.1-0.1",
    "v1:execution.ab12cd34.1-0.1" + "," * 5000,
    "%00%0d%0a",
    "../../../../etc/passwd",
    "${jndi:ldap://127.0.0.1/a}",
    "x" * 4000,
]


@pytest.mark.parametrize("value", HOSTILE_CURSORS, ids=range(len(HOSTILE_CURSORS)))
async def test_hostile_cursors_are_a_400_json(gateway: Gateway, value: str) -> None:
    async with aiohttp.ClientSession() as http:
        for how in ("header", "query", "query2"):
            if how == "header":
                if any(ord(c) < 32 for c in value):
                    continue  # not sendable as a header by a conforming client; see the raw test
                kwargs: dict[str, Any] = {"headers": {**AUTH, "Last-Event-ID": value}}
                url = gateway.url + "/v1/stream"
            else:
                name = "last_event_id" if how == "query" else "lastEventID"
                kwargs = {"headers": AUTH, "params": {name: value}}
                url = gateway.url + "/v1/stream"
            async with http.get(url, **kwargs) as resp:
                assert 400 <= resp.status < 500, (how, value[:80], resp.status)
                assert resp.headers["content-type"].startswith("application/json"), (how, value[:80])
                body = await resp.json()
                assert body.get("error") and "Traceback" not in str(body)


# Non-ASCII digits, which `\\d` and int() accept: never a 5xx (they are a 400: only ASCII
# 0-9 is a cursor digit).
LENIENT_CURSORS = [f"v2:execution.{EPOCH}.\uff11", f"v2:execution.{EPOCH}.\u0663"]


@pytest.mark.parametrize("value", LENIENT_CURSORS, ids=["fullwidth", "arabic-indic"])
async def test_non_ascii_digits_in_a_cursor_are_never_a_server_error(gateway: Gateway, value: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/v1/stream", headers=AUTH, params={"last_event_id": value}
        ) as resp:
            assert resp.status in (200, 400), resp.status
            if resp.status == 200:
                first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
                assert first  # the stream started (with a heartbeat, retry hint or an event)


# Well-formed cursors that are no error: a v1 cursor (answered in-band with a reset, the
# stream starting at `from=`), and a cursor far ahead of what Redis holds in the feed's
# epoch (Redis may have lost data and be refilling: the stream waits, with heartbeats).
ODD_BUT_VALID_CURSORS = [
    "v1:execution.ep0ch001.9999999999999-0.99999",
    f"v2:execution.{EPOCH}.99999999",
    "v2:execution.1000000000000.5",  # an epoch that is not the feed's: the rest of it, then a reset
]


@pytest.mark.parametrize("value", ODD_BUT_VALID_CURSORS, ids=["v1", "ahead", "other-epoch"])
async def test_well_formed_cursors_are_answered_in_band_never_a_4xx(gateway: Gateway, value: str) -> None:
    headers = {**AUTH, "Last-Event-ID": value}
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.url + "/v1/stream?feeds=execution", headers=headers) as resp,
    ):
        assert resp.status == 200
        head = b""
        while head.count(b"\n\n") < 3:  # retry hint, start id, then a notice or a heartbeat
            head += await asyncio.wait_for(resp.content.readany(), 10)
    if value.startswith("v1:"):
        assert b"event: reset" in head and b'"reason":"cursor_version"' in head
    elif "1000000000000" in value:
        assert b"event: reset" in head and b'"reason":"epoch"' in head
    else:
        assert b": heartbeat" in head and b"event:" not in head


HOSTILE_QUERIES = [
    {"feeds": "nosuchfeed"},
    {"feeds": "execution,nosuchfeed"},
    {"feeds": "x" * 20000},
    {"feeds": "exécution"},
    {"feeds": "execution'; DROP TABLE execution; --"},
    {"feeds": "execution\x00"},
    {"feeds": "execution", "symbol": "x" * 20000},
    {"feeds": "sport_event", "symbol": "AAPL"},  # a filter for a feed not subscribed
    {"feeds": "sport_event", "sport": "CURLING"},
    {"feeds": "sport_event", "sport": "basketball' OR '1'='1"},
    {"feeds": "execution", "from": "yesterday"},
    {"feeds": "execution", "from": "9999-99-99T99:99:99Z"},
    {"feeds": "execution", "from": "x" * 10000},
    {"feeds": "execution", "from": "2026-11-28T09:13:32.123Z\u202e"},
]


@pytest.mark.parametrize("params", HOSTILE_QUERIES, ids=range(len(HOSTILE_QUERIES)))
async def test_hostile_query_parameters_are_a_4xx_json(gateway: Gateway, params: dict[str, str]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.url + "/v1/stream", params=params, headers=AUTH) as resp,
    ):
        assert 400 <= resp.status < 500, (params, resp.status)
        assert resp.headers["content-type"].startswith("application/json")
        assert (await resp.json()).get("error")


async def test_accepted_but_odd_values_stream_normally(gateway: Gateway) -> None:
    """Unicode and injection text as a filter VALUE is data, not an error (no event matches);
    a feed named many times is that feed once."""
    async with aiohttp.ClientSession() as http:
        for params in (
            {"feeds": "execution", "symbol": "'; DROP TABLE execution; --"},
            {"feeds": "execution", "symbol": "株式会社"},
            {"feeds": "execution", "market": "<b>"},
            {"feeds": ",".join(["execution"] * 2000)},  # the same feed named 2000 times
        ):
            async with http.get(gateway.url + "/v1/stream", params=params, headers=AUTH) as resp:
                assert resp.status in (200, 400), params
                if resp.status == 400:
                    assert (await resp.json()).get("error")


RAW = [
    get("/v1/stream", {**AUTH, "Last-Event-ID": "v1:\xff\xfe"}),
    get("/v1/stream?feeds=%ff%fe%00", AUTH),
    get("/v1/stream?feeds=execution&last_event_id=%00%0d%0aSet-Cookie:%20x=1", AUTH),
    get("/v1/stream?" + "a=1&" * 5000, AUTH),
    get("/v1/stream", {**AUTH, "Last-Event-ID": "v1:" + "9" * 60000}),
    get("/v1/stream", {**AUTH, "X-Pad": "p" * 200_000}),
    b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: a\r\n b\r\n\r\n",  # obsolete line folding
    b"GET /v1/stream\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"BREW /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello
]


@pytest.mark.parametrize("request_bytes", RAW, ids=range(len(RAW)))
async def test_raw_malformed_requests_never_get_a_500(gateway: Gateway, request_bytes: bytes) -> None:
    status, headers, body = await raw_request(gateway.port, request_bytes)
    # 0: the HTTP parser dropped the connection, which is a fine answer to garbage.
    assert status == 0 or 400 <= status < 500, (status, body[:200])
    if status and headers.get("content-type", "").startswith("application/json"):
        assert b"Traceback" not in body
    # and the gateway still serves.
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/healthz") as resp:
        assert resp.status == 200


async def test_missing_and_wrong_tokens_are_401_and_403(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        url = gateway.url + "/v1/stream?feeds=execution,sport_event"
        async with http.get(url) as resp:
            assert resp.status == 401
            assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer")
            assert (await resp.json()).get("error")
        for bad in ("wrong", "", "Bearer", TOKEN + "x", TOKEN.upper(), "x" * 10000, "' OR 1=1 --", "tökén"):
            async with http.get(url, headers={"Authorization": f"Bearer {bad}"}) as resp:
                assert resp.status == 401, bad[:40]
                assert (await resp.json()).get("error")
        async with http.get(url, headers={"Authorization": f"Basic {TOKEN}"}) as resp:
            assert resp.status == 401
        async with http.get(url, params={"access_token": "wrong"}) as resp:
            assert resp.status == 401
        async with http.get(url, params={"ticket": "forged-ticket"}) as resp:
            assert resp.status == 401
        # A real token for a feed it may not read.
        async with http.get(url, headers={"Authorization": f"Bearer {EXEC_ONLY}"}) as resp:
            assert resp.status == 403
            assert (await resp.json()).get("error")
        async with http.get(
            gateway.url + "/v1/stream?feeds=execution", params={"access_token": EXEC_ONLY}
        ) as resp:
            assert resp.status == 200
    assert TOKEN not in gateway.log_text() and EXEC_ONLY not in gateway.log_text()


async def _open_and_drop(port: int, how: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if how == 0:
            return  # connect, send nothing, go
        if how == 1:
            writer.write(b"GET /v1/stream?feeds=execution HTTP/1.1\r\nHost: x\r\nAuthor")  # half a request
            await writer.drain()
            return
        writer.write(get("/v1/stream?feeds=execution,sport_event", AUTH))
        await writer.drain()
        if how == 3:
            await reader.readuntil(b"\r\n\r\n")  # the stream started; drop it
    finally:
        if how == 2:
            # A reset rather than a FIN.
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def subscribers_gauge(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("fanout_gateway_subscribers"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no fanout_gateway_subscribers metric")


# A client connect that fails under this load (a full listen backlog: ConnectionError,
# accepted below) leaves its socket, or the transport around it, to the garbage collector
# in Python 3.11's asyncio: a ResourceWarning of the test's client (this process), not of
# the gateway (its own process, whose leaks the RSS and the subscriber gauge show).
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function _SelectorTransport.__del__"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_thousands_of_connections_opened_and_dropped_leave_nothing_behind(gateway: Gateway) -> None:
    pid = gateway.process.pid
    before = rss_kib(pid)
    total, wave = 3000, 150
    for start in range(0, total, wave):
        results = await asyncio.gather(
            *(_open_and_drop(gateway.port, i % 4) for i in range(start, start + wave)), return_exceptions=True
        )
        unexpected = [
            r
            for r in results
            if isinstance(r, BaseException)
            and not isinstance(r, (ConnectionError, asyncio.IncompleteReadError))
        ]
        assert not unexpected, unexpected[:3]
    after = rss_kib(pid)
    async with aiohttp.ClientSession() as http:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while await subscribers_gauge(http, gateway.ops) != 0:
            assert loop.time() < deadline, "subscribers left registered after their clients went away"
            await asyncio.sleep(0.1)
        async with http.get(gateway.url + "/v1/stream?feeds=execution", headers=AUTH) as resp:
            assert resp.status == 200
    print(f"\n{total} connections opened and dropped: gateway RSS {before} KiB -> {after} KiB")
    assert after - before < 100 * 1024, f"RSS grew by {after - before} KiB"


async def test_clients_that_never_read_keep_memory_bounded(gateway: Gateway) -> None:
    """200 subscribers that never read while 20,000 events (~0.6 KB each: 12 MB per
    client, 2.4 GB if buffered) go by; a reading client still gets everything."""
    pid = gateway.process.pid
    stuck: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(200):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server must buffer
        writer.write(get("/v1/stream?feeds=execution", AUTH))
        await writer.drain()
        stuck.append((reader, writer))
    before = rss_kib(pid)
    peak = before
    got: list[int] = []
    reconnects = 0
    subscribed = asyncio.Event()

    async def read_live() -> None:
        """A reading client that resumes with its last id when the stream ends, as EventSource does."""
        nonlocal reconnects
        last_id = ""
        async with aiohttp.ClientSession() as http:
            while len(got) < 20_000:
                headers = {**AUTH, "Last-Event-ID": last_id} if last_id else AUTH
                async with http.get(gateway.url + "/v1/stream?feeds=execution", headers=headers) as live:
                    assert live.status == 200
                    subscribed.set()
                    buf = b""
                    with contextlib.suppress(aiohttp.ClientPayloadError):
                        while len(got) < 20_000:
                            chunk = await live.content.readany()
                            if not chunk:
                                break
                            buf += chunk
                            *lines, buf = buf.split(b"\n")
                            for line in lines:
                                if line.startswith(b"data: "):
                                    got.append(int(json.loads(line[6:])["seq"]))
                                elif line.startswith(b"id: "):
                                    last_id = line[4:].decode()
                reconnects += 1

    reading = asyncio.create_task(read_live())
    redis = redis_client(gateway.settings.redis_url)
    try:
        await asyncio.wait_for(subscribed.wait(), 30)  # it starts at the latest entry: before these
        for i in range(0, 20_000, 2000):
            await append(redis, gateway.settings, "execution", 2000, start=5 + i, pad=500)
            peak = max(peak, rss_kib(pid))
        try:
            await asyncio.wait_for(asyncio.shield(reading), 120)
        except TimeoutError:
            raise AssertionError(
                f"the reading client got {len(got)} of 20,000 events in 120 s ({reconnects} reconnects); "
                f"last seq {got[-1] if got else None}"
            ) from None
    finally:
        reading.cancel()
        await redis.aclose()
    peak = max(peak, rss_kib(pid))
    for _, writer in stuck:
        writer.close()
    after = rss_kib(pid)
    print(
        f"\n200 clients that never read, 20,000 events of ~0.6 KB: gateway RSS {before} KiB before, "
        f"peak {peak} KiB, {after} KiB after; the reading client reconnected {reconnects} times"
    )
    assert len(got) == 20_000
    assert got == list(range(got[0], got[0] + 20_000)), "the reading client missed or repeated events"
    # Bounded: far below what buffering everything for everyone would take (2.4 GB).
    assert peak - before < 300 * 1024, f"RSS grew by {peak - before} KiB"
