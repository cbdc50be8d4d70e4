"""The page at `/` and EventSource in a real browser: headless Debian chromium driven over
the Chrome DevTools Protocol (a websocket, with aiohttp), against the real gateway
(`python -m fanout.cli gateway`) on the real Redis.

The browser reaches the gateway through a small TCP relay in this test, which records
the bytes each way: that is how the tests see the `Last-Event-ID` the browser sends on
reconnecting, and know the browser has been sent a frame before the gateway is killed.

Skipped only when /usr/bin/chromium is absent (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import pytest

from services.sse_gateway import cursor
from shared import codec, scripts
from shared.feeds import message_id
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_gateway_helpers import Writer, archive
from tests.integration.test_gateway_lookup import EPOCH, append, execution, sport_event

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]

# Skipped without chromium on a developer's machine; in CI (CI set) a missing chromium fails.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("CI"),
        reason="/usr/bin/chromium is not installed (apt-get install chromium; .ci/run does it)",
    ),
]


@pytest.fixture(autouse=True)
def _chromium_in_ci() -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"CI={os.environ.get('CI')!r}: {CHROMIUM} is missing, so the browser tests cannot run;"
                    " CI must fail rather than skip them (apt-get install chromium; .ci/run does it)",
                    pytrace=False)


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within: float = 30.0) -> Any:
    """Poll `check()` until it returns something truthy: for states inside the browser
    or another process, which offer nothing to await. Fails naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while loop.time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last seen: {last!r}")


# --- the browser ------------------------------------------------------------------------------


class Browser:
    """Headless chromium and one page, driven over the DevTools Protocol."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="fanout-chromium-")
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session: str | None = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.errors: list[str] = []  # uncaught page exceptions and console errors
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
            "about:blank",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"

        async def ready() -> list[str] | None:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            return lines if len(lines) >= 2 else None

        port, path = (await eventually(ready, "chromium's DevToolsActivePort file"))[:2]
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        target = await self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, browser=True
        )
        self.session = attached["sessionId"]
        await self.send("Runtime.enable")
        await self.send("Page.enable")

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self.waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                if "error" in data:
                    future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(data["params"]["exceptionDetails"])[:2000])
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.errors.append(json.dumps(data["params"]["args"])[:2000])
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None, browser: bool = False) -> Any:
        assert self.ws is not None
        msg_id = next(self.ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self.session
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[msg_id] = future
        await self.ws.send_json(message)
        async with asyncio.timeout(30):
            return await future

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await eventually(lambda: self.js("document.readyState === 'complete'"), f"{url} to load")

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort: the browser may already be gone
            await self.send("Browser.close", browser=True)
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# --- the gateway, and a relay in front of it ------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """`python -m fanout.cli gateway` with the test's isolated settings, restartable on its port."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.env = {
            **os.environ,
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "FANOUT_KEY_PREFIX": settings.key_prefix,
            "FANOUT_DB_SCHEMA": settings.db_schema,
            "FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{self.port}",
            "FANOUT_LOG_FORMAT": "json",
            "FANOUT_RETRY_MS": "300",  # the browser's reconnection delay
            **env,
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fanout.cli", "gateway",
            cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log,
        )

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{self.port}/readyz", timeout=aiohttp.ClientTimeout(total=2)
                ) as reply:
                    return reply.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await eventually(ready, "the gateway's /readyz")

    async def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        async with asyncio.timeout(30):
            return await self.proc.wait()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]


class Relay:
    """A TCP relay between the browser and the gateway that records both directions per
    connection. When the gateway goes away it closes the browser's side after passing on
    every byte it got, as a direct connection would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.requests: list[bytearray] = []   # browser -> gateway, one per connection
        self.responses: list[bytearray] = []  # gateway -> browser, same index
        # per connection, (offset, n) for each chunk the browser sent: n counts chunks over
        # every connection, so requests on kept-alive connections can be put in order
        self.sent: list[list[tuple[int, int]]] = []
        self.chunks = itertools.count()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()  # the gateway is down: the browser sees a failed connection
            return
        request, response = bytearray(), bytearray()
        sent: list[tuple[int, int]] = []
        self.requests.append(request)
        self.responses.append(response)
        self.sent.append(sent)
        await asyncio.gather(
            self._pipe(reader, up_writer, request, sent), self._pipe(up_reader, writer, response)
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: bytearray,
        marks: list[tuple[int, int]] | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if marks is not None:
                    marks.append((len(record), next(self.chunks)))
                record.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _streams(self) -> list[tuple[str, bytes]]:
        """(request head, response body) of each /v1/stream request answered with a stream.
        A connection may carry several requests (keep-alive: a ticket's POST before the
        stream, or after a stream that ended); its responses come in the same order."""
        out = []
        for request, response, sent in zip(self.requests, self.responses, self.sent, strict=True):
            heads = list(re.finditer(rb"(?s)[A-Z]+ /\S* HTTP/1\.1\r\n.*?\r\n\r\n", bytes(request)))
            replies = re.split(rb"HTTP/1\.1 (?=\d{3} )", bytes(response))[1:]
            for match, reply in zip(heads, replies, strict=False):
                request_head = match[0]
                if not request_head.startswith(b"GET /v1/stream"):
                    continue
                head, _, body = reply.partition(b"\r\n\r\n")
                if b"text/event-stream" not in head.lower():
                    continue
                if b"transfer-encoding: chunked" in head.lower():
                    body = _unchunk(body)
                when = max(n for offset, n in sent if offset <= match.start())
                out.append((when, request_head.decode(errors="replace"), body))
        return [(head, body) for _, head, body in sorted(out, key=lambda o: o[0])]

    def stream_starts(self) -> list[tuple[str, str]]:
        """(request head, start cursor: the first `id:` sent) of every /v1/stream request
        that was served a stream."""
        out = []
        for head, body in self._streams():
            match = re.search(rb"(?m)^id: ?(\S+)$", body)
            if match:
                out.append((head, match[1].decode()))
        return out

    def stream_requests(self) -> list[str]:
        """The head of every /v1/stream request the browser made, in order."""
        return [head for head, _ in self._streams()]

    def frames(self) -> list[dict[str, list[str]]]:
        """Every SSE frame sent to the browser on stream connections, as {field: [values]}."""
        out: list[dict[str, list[str]]] = []
        for _, body in self._streams():
            for block in body.decode(errors="replace").split("\n\n"):
                frame: dict[str, list[str]] = {}
                for line in block.split("\n"):
                    if line and not line.startswith(":"):
                        name, _, value = line.partition(":")
                        frame.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
                if frame:
                    out.append(frame)
        return out

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0 or len(rest) < size:
            out += rest[:size]
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def last_event_id(head: str) -> str | None:
    match = re.search(r"(?im)^last-event-id: *(.*?)\s*$", head)
    return match[1] if match else None


def query(head: str) -> dict[str, list[str]]:
    """The query parameters of a request head's request line."""
    target = head.partition("\r\n")[0].split(" ")[1]
    return parse_qs(urlsplit(target).query)


def resume_cursor(head: str) -> str | None:
    """The cursor a stream request resumes from: Last-Event-ID, else ?last_event_id=."""
    values = query(head).get("last_event_id")
    return last_event_id(head) or (values[0] if values else None)


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    try:
        await b.start()
        yield b
    finally:
        await b.close()


@contextlib.asynccontextmanager
async def serving(settings: Settings, **env: str) -> AsyncIterator[tuple[Gateway, Relay]]:
    """A gateway with `env` and the recording relay in front of it."""
    gateway = Gateway(settings, **env)
    relay = Relay(gateway.port)
    await relay.start()
    # a page served from the relay's origin may also call the gateway directly (CORS)
    gateway.env["FANOUT_CORS_ORIGINS"] = f"http://127.0.0.1:{relay.port}"
    await gateway.start()
    try:
        yield gateway, relay
    finally:
        await relay.close()
        if gateway.proc is not None and gateway.proc.returncode is None:
            gateway.proc.kill()
            await gateway.proc.wait()
        gateway.log.close()


@pytest.fixture
async def rig(base_settings: Settings, redis: Any) -> AsyncIterator[tuple[Gateway, Relay]]:
    async with serving(base_settings, FANOUT_TOKENS="page-token=*;exec-token=execution") as served:
        yield served


class Feeds:
    """Appends numbered messages to the feeds with the ingest Lua script (contract v2:
    contiguous seqs per feed, message id `<epoch>.<seq>`)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.n = 0

    async def add(self, feed: str, count: int, epoch: str | None = None, **fields: str) -> list[str]:
        batch = []
        for _ in range(count):
            self.n += 1
            made = execution(self.n) if feed == "execution" else sport_event(self.n)
            batch.append({**made, **fields})
        return await append(self.redis, self.prefix, feed, batch, epoch)

    async def add_malformed(self, feed: str, epoch: str) -> str:
        """A payload the ingestor could not decode: it keeps its seq in the feed's stream."""
        keys = Keys(self.prefix)
        seq = int(await self.redis.hget(keys.meta(feed), "seq") or 0) + 1
        mid = message_id(epoch, seq)
        when = "2026-11-28T09:00:00.000Z"
        fields = codec.malformed_fields(mid, "missing required field(s): price", b"\x0a\x02no", when, when)
        call_keys, argv = scripts.ingest_append_call(keys, feed, epoch, [(seq, mid, fields)], 3600)
        [(entry_id, status)] = await scripts.register(self.redis, "ingest_append")(keys=call_keys, args=argv)
        assert int(status) == 1
        return str(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)


# --- the tests --------------------------------------------------------------------------------------


STATS = "window.fanoutStats"


async def test_page_shows_both_feeds_and_resumes_across_gateway_restarts(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    gateway, relay = rig
    feeds = Feeds(redis, base_settings.key_prefix)
    await feeds.add("execution", 1)  # the streams exist (and have an epoch) before the page opens
    await feeds.add("sport_event", 1)

    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=page-token")
    await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live")
    first = relay.stream_requests()[0]
    # the token went into the token box and out of the address bar; the stream got a ticket
    assert "page-token" not in first and "ticket=" in first.partition("\r\n")[0], first
    assert await browser.js("location.search") == ""
    assert await browser.js("document.getElementById('f-token').value") == "page-token"

    async def received() -> dict[str, int]:
        return dict(await browser.js(f"{STATS}.received"))

    async def page_has(n_exec: int, n_sport: int) -> bool:
        return await received() == {"execution": n_exec, "sport_event": n_sport}

    await feeds.add("execution", 30)
    await feeds.add("sport_event", 20)
    await eventually(lambda: page_has(30, 20), "the first events on the page")

    expected_exec, expected_sport = 30, 20
    for how in (signal.SIGKILL, signal.SIGTERM):
        exit_code = await gateway.stop(how)
        assert exit_code == (-signal.SIGKILL if how == signal.SIGKILL else 0), gateway.output()
        await eventually(
            lambda: browser.js(f"{STATS}.state !== 'live'"), f"the page to notice the gateway {how.name}"
        )
        # written while the gateway is down: the page gets them by resuming
        await feeds.add("execution", 15)
        await feeds.add("sport_event", 10)
        await gateway.start()
        await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to reconnect by itself")
        expected_exec, expected_sport = expected_exec + 15, expected_sport + 10
        await eventually(partial(page_has, expected_exec, expected_sport), "the events written while down")
        # and live again after the restart
        await feeds.add("execution", 5)
        await feeds.add("sport_event", 5)
        expected_exec, expected_sport = expected_exec + 5, expected_sport + 5
        await eventually(partial(page_has, expected_exec, expected_sport), "live events after the restart")

    stats = await browser.js(STATS)
    # every seq once, in order, none missing, across two reconnections
    assert stats["seqs"]["execution"] == list(range(2, expected_exec + 2))
    assert stats["seqs"]["sport_event"] == list(range(2, expected_sport + 2))
    assert stats["seqGaps"] == {"execution": 0, "sport_event": 0}
    assert stats["duplicates"] == {"execution": 0, "sport_event": 0}
    assert stats["notices"] == {"gap": 0, "reset": 0}
    assert stats["opens"] >= 3
    # the page resumed with the last id it had been sent (?last_event_id=, with a new ticket)
    resumed = [resume_cursor(h) for h in relay.stream_requests()[1:]]
    assert resumed and all(resumed), relay.stream_requests()

    # what a person sees (redrawn twice a second): counters and the newest rows first
    await eventually(
        lambda: browser.js(f"document.getElementById('last-id').textContent === {STATS}.lastEventId"),
        "the page to show the last event id",
    )
    shown = await browser.js(
        """({gaps: document.getElementById('seq-gaps').textContent,
             state: document.getElementById('state-text').textContent,
             lastId: document.getElementById('last-id').textContent,
             exec: [...document.querySelectorAll('#rows-execution tr')].map(r => Number(r.dataset.seq)),
             sport: document.querySelectorAll('#rows-sport_event tr').length,
             firstSymbol: document.querySelector('#rows-execution tr td:nth-child(2)').textContent})"""
    )
    assert shown["gaps"] == "0" and shown["state"] == "live"
    assert shown["lastId"] == stats["lastEventId"] and shown["lastId"].startswith("v2:")
    assert shown["exec"] == list(range(expected_exec + 1, 1, -1))  # newest first
    assert shown["sport"] == expected_sport
    assert shown["firstSymbol"] in {"AAPL", "MSFT"}
    assert browser.errors == []


async def test_page_keeps_a_bounded_number_of_rows(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    _, relay = rig
    feeds = Feeds(redis, base_settings.key_prefix)
    await feeds.add("execution", 1)
    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=page-token&feeds=execution")
    await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live")
    for _ in range(3):
        await feeds.add("execution", 100)
    await eventually(lambda: browser.js(f"{STATS}.received.execution === 300"), "300 events")
    rows = await eventually(
        lambda: browser.js(
            "(n => n.length === 200 && Number(n[0].dataset.seq) === 301 && n.length)"
            "(document.querySelectorAll('#rows-execution tr'))"
        ),
        "the pane to show the newest 200 rows",
    )
    assert rows == 200
    assert (await browser.js(f"{STATS}.seqGaps.execution")) == 0
    assert browser.errors == []


async def test_filtered_eventsource_resumes_after_the_last_id_only_frame(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    gateway, relay = rig
    feeds = Feeds(redis, base_settings.key_prefix)
    await feeds.add("execution", 1, symbol="OTHER")  # seq 1
    # any page of the gateway's origin will do; this one opens no stream of its own
    await browser.navigate(f"http://127.0.0.1:{relay.port}/healthz")
    await browser.js(
        """(() => {
          const f = window.filtered = {seqs: [], symbols: [], ids: [], notices: [], opens: 0};
          const es = new EventSource('/v1/stream?feeds=execution&symbol=WATCHED&access_token=page-token');
          es.onopen = () => { f.opens += 1; };
          es.addEventListener('execution', e => {
            const m = JSON.parse(e.data);
            f.seqs.push(m.seq); f.symbols.push(m.symbol); f.ids.push(e.lastEventId);
          });
          for (const kind of ['gap', 'reset']) es.addEventListener(kind, e => f.notices.push(e.data));
          return true;
        })()"""
    )
    await eventually(lambda: browser.js("window.filtered.opens === 1"), "the filtered stream to open")

    await feeds.add("execution", 2, symbol="WATCHED")  # seq 2, 3
    skipped = await feeds.add("execution", 3, symbol="OTHER")  # seq 4, 5, 6: id-only frames
    assert skipped[-1] == "6-0"
    # the cursor of the last id-only frame: after entry seq 6
    after_skipped = cursor.format({"execution": cursor.Position(EPOCH, 6)}, ["execution"])

    async def sent_id_only_frame() -> bool:
        return any(f.get("id") == [after_skipped] and "data" not in f for f in relay.frames())

    await eventually(lambda: browser.js("window.filtered.seqs.length === 2"), "the two watched events")
    await eventually(sent_id_only_frame, "the id-only frame after the filtered-out events")

    assert await gateway.stop(signal.SIGKILL) == -signal.SIGKILL
    await feeds.add("execution", 1, symbol="OTHER")  # seq 7, while down
    await feeds.add("execution", 1, symbol="WATCHED")  # seq 8, while down
    await gateway.start()
    await eventually(lambda: browser.js("window.filtered.opens >= 2"), "EventSource to reconnect by itself")
    await feeds.add("execution", 2, symbol="OTHER")  # seq 9, 10
    await feeds.add("execution", 1, symbol="WATCHED")  # seq 11, live
    await eventually(lambda: browser.js("window.filtered.seqs.length === 4"), "the watched events after")

    seen = await browser.js("window.filtered")
    # the browser resumed from the id-only frame's cursor, not from the last event it dispatched
    reconnect = relay.stream_requests()[-1]
    assert last_event_id(reconnect) == after_skipped, reconnect
    assert seen["ids"][1] != after_skipped
    # exactly the matching entries of the stream, each once, in order, no notices
    entries = await redis.xrange(Keys(base_settings.key_prefix).stream("execution"))
    watched = [int(f[b"seq"]) for _, f in entries if f[b"symbol"] == b"WATCHED"]
    assert watched == [2, 3, 8, 11]
    assert seen["seqs"] == watched
    assert set(seen["symbols"]) == {"WATCHED"}
    assert seen["notices"] == []
    assert browser.errors == []


async def test_page_shows_a_reset_when_the_jetstream_stream_is_recreated(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    gateway, relay = rig
    feeds = Feeds(redis, base_settings.key_prefix)
    await feeds.add("execution", 1)
    await feeds.add("sport_event", 1)
    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=page-token")
    await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live")
    await feeds.add("execution", 5)
    await eventually(lambda: browser.js(f"{STATS}.received.execution === 5"), "the first events")

    # Redis losing data is invisible (the same ids come back); only a recreated JetStream
    # stream is a new epoch, with seq from 1: the ingest script replaces the old stream
    assert await gateway.stop(signal.SIGKILL) == -signal.SIGKILL
    new_epoch = str(int(EPOCH) + 1000)
    await feeds.add("execution", 3, epoch=new_epoch)
    await gateway.start()

    async def reset_shown() -> Any:
        return await browser.js(
            "(n => n && n.textContent)(document.querySelector('#notices .notice.reset'))"
        )

    text = await eventually(reset_shown, "a visible reset notice")
    assert f"execution: the stream was reset (epoch {EPOCH} → {new_epoch})" in text
    await feeds.add("execution", 2, epoch=new_epoch)
    await eventually(lambda: browser.js(f"{STATS}.received.execution === 10"), "the events of the new epoch")
    stats = await browser.js(STATS)
    assert stats["notices"] == {"gap": 0, "reset": 1}
    assert stats["seqs"]["execution"] == [2, 3, 4, 5, 6, 1, 2, 3, 4, 5]
    assert stats["seqGaps"] == {"execution": 0, "sport_event": 0}  # announced, so not a gap
    assert stats["duplicates"] == {"execution": 0, "sport_event": 0}
    await eventually(
        lambda: browser.js("document.getElementById('notice-count').textContent === '0 / 1 / 0'"),
        "the notice counter",
    )
    assert browser.errors == []


async def test_page_shows_a_malformed_message_and_counts_no_gap_for_it(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    _, relay = rig
    feeds = Feeds(redis, base_settings.key_prefix)
    await feeds.add("execution", 1)
    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=page-token&feeds=execution")
    await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live")
    await feeds.add("execution", 2)  # seq 2, 3
    await feeds.add_malformed("execution", EPOCH)  # seq 4
    await feeds.add("execution", 2)  # seq 5, 6
    await eventually(lambda: browser.js(f"{STATS}.received.execution === 4"), "the events around it")

    async def malformed_shown() -> Any:
        return await browser.js(
            "(n => n && n.textContent)(document.querySelector('#notices .notice.malformed'))"
        )

    text = await eventually(malformed_shown, "a visible malformed notice")
    said = f"execution: message {EPOCH}.4 (seq 4) is not a valid message: missing required field(s): price"
    assert said in text
    stats = await browser.js(STATS)
    assert stats["seqs"]["execution"] == [2, 3, 5, 6]
    assert stats["malformed"] == {"execution": 1, "sport_event": 0}
    assert stats["seqGaps"] == {"execution": 0, "sport_event": 0}
    assert stats["lastEventId"] == f"v2:execution.{EPOCH}.6"
    assert browser.errors == []


async def test_page_shows_a_gap_when_history_is_gone(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, pg: Any, base_settings: Settings
) -> None:
    gateway, relay = rig
    feeds = Feeds(redis, base_settings.key_prefix)
    await feeds.add("sport_event", 1)
    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=page-token&feeds=sport_event")
    await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live")
    await feeds.add("sport_event", 2)  # seq 2, 3
    await eventually(lambda: browser.js(f"{STATS}.received.sport_event === 2"), "the first events")

    assert await gateway.stop(signal.SIGKILL) == -signal.SIGKILL
    await feeds.add("sport_event", 6)  # seq 4..9 while down
    # 7..9 archived and trimmed to 3 entries; 4..6 in neither store (lost from the catalogue)
    key = Keys(base_settings.key_prefix).stream("sport_event")
    entries = [(i.decode(), codec.str_entry(f)) for i, f in await redis.xrange(key)]
    await archive(pg, base_settings.db_schema, "sport_event", entries[6:])
    await redis.xtrim(key, maxlen=3, approximate=False)
    await gateway.start()

    async def gap_shown() -> Any:
        return await browser.js("(n => n && n.textContent)(document.querySelector('#notices .notice.gap'))")

    text = await eventually(gap_shown, "a visible gap notice")
    assert "sport_event: 3 event(s) no longer held anywhere (asked after seq 3, resumed at seq 7)" in text
    await eventually(lambda: browser.js(f"{STATS}.received.sport_event === 5"), "the events after the gap")
    stats = await browser.js(STATS)
    assert stats["seqs"]["sport_event"] == [2, 3, 7, 8, 9]
    assert stats["notices"] == {"gap": 1, "reset": 0}
    assert stats["seqGaps"]["sport_event"] == 0  # announced in-band, so not an unexplained gap
    assert browser.errors == []


async def test_web_app_flow_with_a_ticket_and_cross_origin(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    gateway, relay = rig
    feeds = Feeds(redis, base_settings.key_prefix)
    await feeds.add("execution", 1)
    await browser.navigate(f"http://127.0.0.1:{relay.port}/healthz")
    # A web app on another origin: POST for a ticket with its token (CORS preflight for
    # the Authorization header), then EventSource with the ticket: the token stays out of URLs.
    opened = await browser.js(
        f"""(async () => {{
          const gateway = 'http://127.0.0.1:{gateway.port}';
          const reply = await fetch(gateway + '/v1/tickets?feeds=execution', {{
            method: 'POST', headers: {{Authorization: 'Bearer exec-token'}}}});
          const body = await reply.json();
          const w = window.web = {{status: reply.status, body, seqs: [], errors: 0, again: null}};
          const url = gateway + '/v1/stream?feeds=execution&ticket=' + encodeURIComponent(body.ticket);
          const es = w.es = new EventSource(url);
          es.addEventListener('execution', e => w.seqs.push(JSON.parse(e.data).seq));
          await new Promise((ok, fail) => {{ es.onopen = ok; es.onerror = fail; }});
          // the same ticket a second time: refused, and EventSource gives up (no retry loop)
          const again = new EventSource(url);
          await new Promise(done => {{ again.onerror = done; }});
          w.again = again.readyState;
          return true;
        }})()"""
    )
    assert opened is True
    web = await browser.js("({status: web.status, feeds: web.body.feeds, again: web.again})")
    assert web == {"status": 201, "feeds": ["execution"], "again": 2}  # 2: EventSource.CLOSED
    await feeds.add("execution", 3)
    await eventually(lambda: browser.js("web.seqs.length === 3 && web.seqs"), "events over the ticket")
    assert await browser.js("web.seqs") == [2, 3, 4]
    assert browser.errors == []


async def test_page_reports_an_access_error_instead_of_spinning(
    browser: Browser, rig: tuple[Gateway, Relay]
) -> None:
    _, relay = rig
    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=wrong")
    text = await eventually(
        lambda: browser.js(
            "(n => n && n.textContent.includes('HTTP 401') && n.textContent)"
            "(document.querySelector('#notices .notice.error'))"
        ),
        "a visible 401 notice",
    )
    assert "unknown token" in text
    assert await browser.js(f"{STATS}.state") == "denied"  # no retry loop with a refused token
    assert await browser.js(f"{STATS}.received") == {"execution": 0, "sport_event": 0}



async def test_eventsource_refused_for_capacity_reconnects_by_itself(
    browser: Browser, base_settings: Settings, redis: Any
) -> None:
    """A refusal (here: past FANOUT_MAX_SUBSCRIBERS) must not end an EventSource for good,
    as a 503 does: it comes in-band, a 200 with `retry:` that ends, and the browser keeps
    reconnecting on its own until it is served, then gets exactly its events."""
    gateway = Gateway(base_settings, FANOUT_TOKENS="page-token=*", FANOUT_MAX_SUBSCRIBERS="1")
    relay = Relay(gateway.port)
    await relay.start()
    await gateway.start()
    try:
        feeds = Feeds(redis, base_settings.key_prefix)
        await feeds.add("execution", 2)  # seq 1, 2
        await browser.navigate(f"http://127.0.0.1:{relay.port}/healthz")
        await browser.js(
            """(() => {
              const url = '/v1/stream?feeds=execution&from=earliest&access_token=page-token';
              const open = name => {
                const s = window[name] = {seqs: [], states: [], es: new EventSource(url)};
                s.es.addEventListener('execution', e => s.seqs.push(JSON.parse(e.data).seq));
                s.es.onerror = () => s.states.push(s.es.readyState);
              };
              window.openStream = open;
              open('first');
              return true;
            })()"""
        )
        await eventually(lambda: browser.js("first.seqs.length === 2"), "the first stream's events")
        await browser.js("openStream('second'), true")

        def refusals() -> list[bytes]:
            # a refusal has a length and keeps the connection: the retry may come on it
            return [
                b"retry:" + part.partition(b"\r\n\r\nretry:")[2]
                for response in relay.responses
                for part in bytes(response).split(b"HTTP/1.1 ")
                if b": unavailable " in part
            ]

        async def refused_twice() -> bool:
            return len(refusals()) >= 2  # refused, reconnected by itself, refused again

        await eventually(refused_twice, "the second EventSource to be refused and to retry")
        assert await browser.js("second.es.readyState") != 2  # not CLOSED: a 503 would close it
        assert b'"error":"too many subscribers"' in refusals()[0]
        assert refusals()[0].startswith(b"retry: 1000\n\n")
        await browser.js("first.es.close(), true")  # a place frees up
        await eventually(lambda: browser.js("second.seqs.length === 2"), "the second stream served")
        await feeds.add("execution", 1)  # seq 3, live
        await eventually(lambda: browser.js("second.seqs.length === 3"), "the live event")
        assert await browser.js("second.seqs") == [1, 2, 3]
        assert 2 not in await browser.js("second.states")  # it never gave up
        assert browser.errors == []
    finally:
        await relay.close()
        if gateway.proc is not None and gateway.proc.returncode is None:
            gateway.proc.kill()
            await gateway.proc.wait()
        gateway.log.close()


# --- the page's controls, token box, figures and layout ------------------------------------------

RESULTS = Path(os.environ.get("FANOUT_BROWSER_RESULTS") or Path(__file__).resolve().parent / "results")
JWT_SECRET = "browser-test-secret-of-at-least-32-bytes!"
SYMBOLS = ("AAPL", "MSFT")
SPORTS = ("TENNIS", "FOOTBALL")


class Flow:
    """Appends to both feeds until stopped (the Writer keeps what it wrote), each message's
    symbol or sport known by seq: the record the page's seqs are judged against.
    Used as `async with`: the appending ends with the test, whatever happens."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.writer = Writer(redis, prefix)
        self.field: dict[str, dict[int, str]] = {"execution": {}, "sport_event": {}}
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def add(self, feed: str, n: int = 1) -> None:
        for _ in range(n):
            seq = self.writer.top[feed] + 1
            if feed == "execution":
                value = SYMBOLS[seq % 2]
                await self.writer.append(feed, 1, symbol=value)
            else:
                value = SPORTS[seq % 2]
                await self.writer.append(feed, 1, sport=value)
            self.field[feed][seq] = value

    def start(self) -> None:
        async def run() -> None:
            while not self.stop.is_set():
                await self.add("execution")
                await self.add("sport_event")
                # pacing (about 40 messages/s per feed), not synchronisation
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.025):
                        await self.stop.wait()

        self.task = asyncio.create_task(run())

    async def finish(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task

    def top(self, feed: str) -> int:
        return self.writer.top[feed]

    async def __aenter__(self) -> Flow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.finish()


def expected_seqs(relay: Relay, flow: Flow, feed: str) -> list[int]:
    """What a page that resumes exactly gets of `feed`: each stream it was served starts at
    the cursor the gateway confirmed (its first `id:`) and lasts until the next stream
    naming the feed starts; of those seqs, the ones its filters let through."""
    spans: list[tuple[int, list[str]]] = []
    for head, start in relay.stream_starts():
        params = query(head)
        if feed not in ",".join(params.get("feeds", [])).split(","):
            continue
        position = cursor.parse(start)[feed]
        wanted = params.get("symbol" if feed == "execution" else "sport", [])
        spans.append((position.seq, wanted))
    out: list[int] = []
    for i, (start_seq, wanted) in enumerate(spans):
        end = spans[i + 1][0] if i + 1 < len(spans) else flow.top(feed)
        out += [s for s in range(start_seq + 1, end + 1) if not wanted or flow.field[feed][s] in wanted]
    return out


async def set_control(browser: Browser, element_id: str, value: str | bool) -> None:
    """What a person does: change a control; its `change` event reconnects the page."""
    prop = "checked" if isinstance(value, bool) else "value"
    await browser.js(
        f"""(() => {{
          const el = document.getElementById({json.dumps(element_id)});
          el.{prop} = {json.dumps(value)};
          el.dispatchEvent(new Event('change', {{bubbles: true}}));
          return true;
        }})()"""
    )


async def reconnected(browser: Browser, opens: int, *expect: str) -> int:
    """Wait until the page is live on a connection opened after the `opens`th whose URL
    has each of `expect`; the number of connections opened by then."""
    check = " && ".join(f"u.includes({json.dumps(e)})" for e in expect) or "true"
    got: int = await eventually(
        lambda: browser.js(
            f"(s => (u => s.state === 'live' && s.opens > {opens} && {check} && s.opens)"
            "(decodeURIComponent(s.connects[s.connects.length - 1])))"
            f"({STATS})"
        ),
        f"the page to reconnect with {expect}",
    )
    return got


async def more_events(browser: Browser, feed: str, than: int) -> int:
    """Wait until the page has received more than `than` events of `feed` (it is live)."""
    got: int = await eventually(
        lambda: browser.js(f"(n => n > {than} && n)({STATS}.received.{feed})"),
        f"more than {than} {feed} events on the page",
    )
    return got


async def judge(browser: Browser, relay: Relay, flow: Flow, feeds: tuple[str, ...]) -> dict[str, Any]:
    """Once the flow stopped: the page gets to the end and has exactly what it should."""
    async def caught_up(feed: str, n: int) -> bool:
        return bool(await browser.js(f"{STATS}.seqs.{feed}.length >= {n}"))

    for feed in feeds:
        expected = expected_seqs(relay, flow, feed)
        with contextlib.suppress(AssertionError):  # if not, the comparison below says how
            await eventually(partial(caught_up, feed, len(expected)), f"the page to catch up on {feed}")
    stats: dict[str, Any] = await browser.js(STATS)
    for feed in feeds:
        expected = expected_seqs(relay, flow, feed)
        got = stats["seqs"][feed]
        assert got == expected, (
            feed, sorted(set(expected) - set(got)), sorted(set(got) - set(expected)), relay.stream_starts()
        )
        assert stats["duplicates"][feed] == 0
    return stats


async def test_page_controls_reconnect_exactly_with_a_ticket_each_time(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    """Feeds and filters changed while events flow: every (re)connection resumes each feed
    exactly where the page was, with a fresh single-use ticket got with the static token
    typed in the token box, which never appears in a URL."""
    _, relay = rig
    async with Flow(redis, base_settings.key_prefix) as flow:
        await flow.add("execution")
        await flow.add("sport_event")
        await browser.navigate(f"http://127.0.0.1:{relay.port}/")
        # a token scoped to executions, for both feeds: refused, readably, with no retry loop
        await set_control(browser, "f-token", "exec-token")
        text = await eventually(
            lambda: browser.js(
                "(n => n && n.textContent.includes('HTTP 403') && n.textContent)"
                "(document.querySelector('#notices .notice.error'))"
            ),
            "a visible 403 notice",
        )
        assert "sport_event" in text
        assert await browser.js(f"{STATS}.state") == "denied"
        flow.start()
        await set_control(browser, "f-token", "page-token")
        opens = await reconnected(browser, 0, "feeds=execution,sport_event")
        seen = await more_events(browser, "execution", 5)
        await more_events(browser, "sport_event", 5)

        await set_control(browser, "f-symbol", "AAPL")
        opens = await reconnected(browser, opens, "symbol=AAPL", "last_event_id=v2:")
        seen = await more_events(browser, "execution", seen + 5)
        await set_control(browser, "feed-sport_event", False)
        opens = await reconnected(browser, opens, "feeds=execution&")
        seen = await more_events(browser, "execution", seen + 5)
        # three changes in a row: only the last connection attempt goes on
        await set_control(browser, "f-symbol", "")
        await set_control(browser, "f-sport", "TENNIS, FOOTBALL")
        await set_control(browser, "feed-sport_event", True)  # sport_event resumes where it was
        opens = await reconnected(browser, opens, "feeds=execution,sport_event", "sport=FOOTBALL")
        seen = await more_events(browser, "execution", seen + 5)
        await set_control(browser, "f-sport", "TENNIS")
        await set_control(browser, "f-from", "earliest")  # a cursor is there: from= changes nothing
        opens = await reconnected(browser, opens, "from=earliest", "sport=TENNIS")
        await more_events(browser, "execution", seen + 5)
        await flow.finish()

        stats = await judge(browser, relay, flow, ("execution", "sport_event"))
    assert stats["tickets"] >= stats["opens"] == opens
    heads = relay.stream_requests()
    assert len(heads) >= opens
    assert all("ticket=" in h.partition("\r\n")[0] and "-token" not in h for h in heads), heads
    # every connection after the first resumed from the page's last id
    assert all(resume_cursor(h) for h in heads[1:]), heads
    assert query(heads[-1])["sport"] == ["TENNIS"] and "symbol" not in query(heads[-1])
    # the filters did filter: sport_event stopped getting FOOTBALL once only TENNIS was asked
    football = [s for s in stats["seqs"]["sport_event"] if flow.field["sport_event"][s] == "FOOTBALL"]
    assert football and max(football) < max(stats["seqs"]["sport_event"])
    assert browser.errors == []


async def test_page_ticket_flow_with_a_jwt_signed_by_the_test_that_expires_and_is_renewed(
    browser: Browser, base_settings: Settings, redis: Any
) -> None:
    """The page signs nothing: the test signs HS256 JWTs (as a web app's backend would)
    and types them in the token box. The first expires while events flow: the stream ends
    with `event: expired`, the page's new ticket with the expired token is refused (401,
    shown), and with the new token typed in it resumes exactly from its last id."""
    env = {"FANOUT_JWT_SECRET": JWT_SECRET, "FANOUT_JWT_LEEWAY": "0"}
    async with contextlib.AsyncExitStack() as stack:
        gateway, relay = await stack.enter_async_context(serving(base_settings, **env))
        flow = await stack.enter_async_context(Flow(redis, base_settings.key_prefix))
        await flow.add("execution")
        await flow.add("sport_event")
        await browser.navigate(f"http://127.0.0.1:{relay.port}/")
        now = int(time.time())
        feeds = ["execution", "sport_event"]
        first = jwt.encode({"sub": "viewer", "exp": now + 5, "feeds": feeds}, JWT_SECRET, "HS256")
        await set_control(browser, "f-token", first)
        await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live on the JWT")
        flow.start()
        await more_events(browser, "execution", 5)
        await eventually(lambda: browser.js(f"{STATS}.expired === 1"), "the stream to end at the JWT's exp")
        text = await eventually(
            lambda: browser.js(
                "[...document.querySelectorAll('#notices .notice.error')].map(n => n.textContent)"
                ".find(t => t.includes('HTTP 401') && /expired/i.test(t))"
            ),
            "the expired token refused, visibly",
        )
        assert "enter another token" in text
        assert await browser.js(f"{STATS}.state") == "denied"
        assert await browser.js("!!document.querySelector('#notices .notice.expired')")
        at_expiry = await browser.js(f"{STATS}.received.execution")

        second = jwt.encode({"sub": "viewer", "exp": now + 600, "feeds": feeds}, JWT_SECRET, "HS256")
        await set_control(browser, "f-token", second)
        await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page live on the new JWT")
        await more_events(browser, "execution", at_expiry + 5)
        await flow.finish()

        stats = await judge(browser, relay, flow, ("execution", "sport_event"))
        for feed in feeds:  # no filters: every seq from the first stream's start to the top
            assert stats["seqs"][feed] == list(range(stats["seqs"][feed][0], flow.top(feed) + 1))
        heads = relay.stream_requests()
        assert len(heads) == 2 and resume_cursor(heads[1]) is not None
        for token in (first, second):
            assert all(token not in h.partition("\r\n")[0] for h in heads)
        tickets = [
            head
            for r in relay.requests
            for head in re.findall(rb"(?s)POST /v1/tickets\S* HTTP/1\.1\r\n.*?\r\n\r\n", bytes(r))
        ]
        assert len(tickets) == 3  # first JWT, the same expired (401), the new one
        assert all(b"authorization: bearer " in r.lower() for r in tickets)
        assert b'"reason":"token_expired"' in b"".join(bytes(r) for r in relay.responses)
        # the gateway logs each stream's opening and end, naming the JWT's subject only
        log = gateway.output()
        assert "stream opened" in log and "stream closed" in log and "jwt:viewer" in log
        assert first not in log and second not in log and JWT_SECRET not in log
        assert browser.errors == []


async def test_page_figures_pause_and_message_panel(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    _, relay = rig
    flow = Flow(redis, base_settings.key_prefix)
    await flow.add("execution")
    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=page-token&feeds=execution")
    await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live")
    await flow.add("execution", 10)
    await eventually(lambda: browser.js(f"{STATS}.received.execution === 10"), "10 events")
    figures = await eventually(
        lambda: browser.js(
            f"(s => s.latency.execution && s.latency.execution.n === 10 && s)({STATS})"
        ),
        "the latency over the last minute",
    )
    latency = figures["latency"]["execution"]
    assert 0 <= latency["p50"] <= latency["p99"] < 60_000
    assert await browser.js("document.getElementById('p50-execution').textContent.endsWith('ms')")
    assert await browser.js("document.getElementById('chart-execution').getContext('2d') !== null")

    # pause: rows stay as they were, what arrives is counted, and shown on resuming
    await browser.js("document.getElementById('pause').click(), true")
    await flow.add("execution", 7)
    await eventually(lambda: browser.js(f"{STATS}.arrivedWhilePaused === 7"), "7 events while paused")
    assert await browser.js("document.querySelectorAll('#rows-execution tr').length") == 10
    await eventually(
        lambda: browser.js("document.getElementById('pause').textContent === 'Resume (7 new)'"),
        "the count on the button",
    )
    await browser.js("document.getElementById('pause').click(), true")
    await eventually(
        lambda: browser.js("document.querySelectorAll('#rows-execution tr').length === 17"),
        "the rows after resuming",
    )

    # a row opens the stored message, fetched with the token as Bearer
    await browser.js("document.querySelector('#rows-execution tr').click(), true")
    body = await eventually(
        lambda: browser.js(
            "(t => t.startsWith('{') && t)(document.getElementById('detail-body').textContent)"
        ),
        "the message panel",
    )
    newest = flow.top("execution")
    assert json.loads(body)["message_id"] == message_id(flow.writer.epoch, newest), body
    assert "page-token" not in "".join(relay.stream_requests())
    assert browser.errors == []


LAYOUT_CHECK = """(() => {
  const panes = [...document.querySelectorAll('section.pane .scroll')];
  const boxes = panes.map(p => p.getBoundingClientRect());
  const overlaps = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('section.pane') || ['SCRIPT', 'STYLE'].includes(el.tagName)) continue;
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    const field = ['INPUT', 'SELECT', 'BUTTON', 'CANVAS'].includes(el.tagName);
    if (!own && !field) continue;
    const style = getComputedStyle(el);
    if (style.display === 'none' || style.visibility === 'hidden') continue;
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height) continue;
    boxes.forEach((b, i) => {
      if (r.left < b.right && r.right > b.left && r.top < b.bottom && r.bottom > b.top) {
        overlaps.push(el.tagName + '#' + el.id + '.' + el.className + ' over ' + panes[i].parentNode.id +
          ': ' + (el.textContent || '').trim().slice(0, 40));
      }
    });
  }
  const [a, b] = boxes;
  if (a.left < b.right && a.right > b.left && a.top < b.bottom && a.bottom > b.top) {
    overlaps.push('the two panes');
  }
  const rows = panes.map(p => p.querySelectorAll('tbody tr').length);
  return {overlaps, rows, scrollWidth: document.documentElement.scrollWidth, width: innerWidth,
          background: getComputedStyle(document.body).backgroundColor,
          height: document.documentElement.scrollHeight};
})()"""


async def test_page_layout_at_three_widths_light_and_dark(
    browser: Browser, rig: tuple[Gateway, Relay], redis: Any, base_settings: Settings
) -> None:
    """Screenshots at 390, 780 and 1,400 px, light and dark, into tests/e2e/results/ (or
    FANOUT_BROWSER_RESULTS); no text outside the tables overlaps them (element boxes; the
    old page drew its footer over the executions table at 780 px), and nothing makes the
    page wider than the window."""
    _, relay = rig
    flow = Flow(redis, base_settings.key_prefix)
    await flow.add("execution")
    await flow.add("sport_event")
    await browser.navigate(f"http://127.0.0.1:{relay.port}/?access_token=page-token")
    await eventually(lambda: browser.js(f"{STATS}.state === 'live'"), "the page to go live")
    await flow.add("execution", 40)
    await flow.add("sport_event", 40)
    await flow.writer.append_malformed("execution")
    await eventually(lambda: browser.js(f"{STATS}.malformed.execution === 1"), "a notice on the page")
    await eventually(
        lambda: browser.js("document.querySelectorAll('#rows-sport_event tr').length === 40"), "the rows"
    )
    await browser.js("document.querySelector('#rows-sport_event tr').click(), true")
    await eventually(
        lambda: browser.js("document.getElementById('detail-body').textContent.startsWith('{')"),
        "the message panel open",
    )
    await eventually(  # the figures are redrawn twice a second
        lambda: browser.js("document.getElementById('received').textContent === '80'"), "the figures"
    )
    await asyncio.to_thread(RESULTS.mkdir, parents=True, exist_ok=True)

    async def laid_out(width: int) -> Any:
        return await browser.js(f"(r => r.width === {width} && r)({LAYOUT_CHECK})")
    backgrounds = {}
    for scheme in ("light", "dark"):
        await browser.send(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]}
        )
        for width in (390, 780, 1400):
            await browser.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 500},
            )
            layout = await eventually(partial(laid_out, width), f"the page laid out at {width} px")
            assert layout["overlaps"] == [], (scheme, width, layout["overlaps"])
            assert layout["scrollWidth"] <= width, (scheme, width, layout)
            assert layout["rows"] == [40, 40]
            backgrounds[scheme] = layout["background"]
            shot = await browser.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": layout["height"], "scale": 1},
                },
            )
            png = base64.b64decode(shot["data"])
            await asyncio.to_thread((RESULTS / f"page-{width}-{scheme}.png").write_bytes, png)
    assert backgrounds["light"] != backgrounds["dark"]
    assert browser.errors == []
