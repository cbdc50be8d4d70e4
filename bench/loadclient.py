"""A cheap SSE load client: N EventSource-like connections per process, raw asyncio.

It shares the machine's two cores with the server it measures, so it does as little as
possible per event: one `data_received` per socket read, HTTP/1.1 chunked framing undone
with `find`, and per read two C-level regex scans pulling out each event's publish time
(`"executionEpoch": <ns since the epoch>`) and `"seq": <n>`. Nothing else of the JSON is
parsed. Latency = time of the socket read - publish time, into a 100 µs histogram.

Both servers under test send events whose data carries those two fields: the gateway's
execution events (the bench writes the publish time into executionEpoch) and the nchan
bench's messages (the same JSON shape, published by bench/sse_fanout.py).

Run as a worker process by `LoadClients` (the controller side, below), speaking JSON
lines on stdin/stdout:

    start:  python -m bench.loadclient URL CONNECTIONS
    out     {"event": "connected", "ok": n, "failed": n, "errors": [...]}
    in      {"cmd": "window", "id": W, "lo": L, "hi": H}   count seqs L..H from now on
    out     {"event": "window", "id": W}          (ack: publishing may start)
    out     {"event": "done", "id": W}            every open connection got seq H
    in      {"cmd": "report"}
    out     {"event": "report", "delivered", "lost", "duplicated", "closed", "hist", "cpu_s", ...}
    in      {"cmd": "quit"} or EOF                 close everything and exit

    in      {"cmd": "reconnect", "on": true}      from now on a dropped connection comes back
    out     {"event": "back", "dropped": n}       every connection was dropped and is back

Per connection, within a window: the next expected seq starts at L; a seq above it counts
the skipped ones as lost, a seq below it as a duplicate; at report time, what a
connection still lacks up to H counts as missing. So lost + missing + delivered -
duplicated = H-L+1 per connection, exactly.

Reconnecting (the reconnect storm): with reconnect on, a connection the server ends or
drops comes back like EventSource: after the `retry:` the server sent (else
DEFAULT_RETRY_MS), with `Last-Event-ID:` set to the last `id:` it received, and keeps
counting where it was, so whatever the resumed stream skips or repeats counts as lost or
duplicated.

Thousands of connections to one server address would exhaust the ephemeral ports of one
source address (about 28,000 on Linux), so connections are spread over several loopback
source addresses (127.0.0.x, `SOURCES`), bound with IP_BIND_ADDRESS_NO_PORT so the port
is chosen at connect time per destination.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import resource
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from bench.harness import BenchError

BUCKET_NS = 100_000
BUCKETS = 600_000

_EPOCH = re.compile(rb'"executionEpoch":\s*(\d+)')
_SEQ = re.compile(rb'"seq":\s*(\d+)')
_RETRY = re.compile(rb"(?:^|\n)retry:\s*(\d+)")
# When the server sent no `retry:` (nchan): what Chromium's EventSource waits
# (blink's EventSource::kDefaultReconnectDelay, 3000 ms; Firefox waits 5000).
DEFAULT_RETRY_MS = 3000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PER_SOURCE_ADDRESS = 10_000  # connections per loopback source address
CONNECT_TIMEOUT_S = 30.0  # connect, request, and the response's headers


class Stats:
    """One process's counters for the current window, shared by its connections."""

    __slots__ = (
        "delivered",
        "done",
        "duplicated",
        "hi",
        "hist",
        "last_ns",
        "lo",
        "lost",
        "on_done",
        "unparsed",
        "window",
    )

    def __init__(self) -> None:
        self.lo = 1 << 62  # no window yet: every event is before it
        self.hi = -1
        self.hist = [0] * (BUCKETS + 1)
        self.delivered = 0
        self.lost = 0
        self.duplicated = 0
        self.unparsed = 0
        self.done = 0
        self.last_ns = 0
        self.on_done: Any = None
        self.window = 0


class SSEConnection(asyncio.Protocol):
    """One subscriber: HTTP/1.1 GET, then count and time events until the server closes."""

    __slots__ = (
        "body",
        "chunk_left",
        "chunked",
        "closed",
        "connected",
        "head",
        "is_done",
        "last_id",
        "looked_for_retry",
        "next",
        "on_lost",
        "raw",
        "retry_ms",
        "stats",
        "transport",
        "up",
    )

    def __init__(
        self,
        stats: Stats,
        connected: asyncio.Future[None],
        on_lost: Callable[[SSEConnection], bool] | None = None,
    ) -> None:
        self.stats = stats
        self.on_lost = on_lost  # True: the connection will come back (reconnect storm)
        self.next = 0
        self.is_done = False
        self.last_id: bytes | None = None
        self.retry_ms: int | None = None
        self.looked_for_retry = False
        self.reset(connected)

    def reset(self, connected: asyncio.Future[None]) -> None:
        """A new TCP connection for the same subscriber: the parser starts over, the
        counting (next seq, last id) goes on."""
        self.connected = connected
        self.head = b""
        self.raw = b""
        self.body = b""
        self.chunked: bool | None = None  # None until the response headers are in
        self.chunk_left = 0
        self.closed = False
        self.up = False  # a 200 came: a later loss is a drop, not a failed connect
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.chunked is None:
            data = self._headers(data)
            if not data:
                return
        if self.chunked:
            data = self._dechunk(data)
        buf = self.body + data if self.body else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.body = buf
            return
        self.body = buf[end + 2 :]
        self._events(buf, end)

    def _headers(self, data: bytes) -> bytes:
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self.head = head
            return b""
        status_line, _, rest = head[:end].partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[1] != b"200":
            if not self.connected.done():
                self.connected.set_exception(ConnectionError(status_line.decode(errors="replace")))
            assert self.transport is not None
            self.transport.close()
            return b""
        self.chunked = b"transfer-encoding: chunked" in rest.lower()
        self.head = b""
        self.up = True
        if not self.connected.done():
            self.connected.set_result(None)
        return head[end + 4 :]

    def _dechunk(self, raw: bytes) -> bytes:
        """The chunk data in `raw`, the next bytes of a chunked body. Per event this is
        client work that nchan's stream (no chunked encoding: the body ends with the
        connection) does not need, and on two shared cores the client's work per event
        is in every delivery's latency: so the usual case, `raw` holding exactly one
        whole chunk (one server write), is taken in a few operations."""
        if self.raw:
            raw = self.raw + raw
        elif not self.chunk_left and raw[-2:] == b"\r\n":
            eol = raw.find(b"\r\n")
            try:
                size = int(raw[:eol], 16)
            except ValueError:  # a chunk extension: the general way below
                size = -1
            if size > 0 and eol + size + 4 == len(raw):
                return raw[eol + 2 : eol + 2 + size]
        out = []
        pos = 0
        n = len(raw)
        while pos < n:
            left = self.chunk_left
            if left:
                take = left if left <= n - pos else n - pos
                out.append(raw[pos : pos + take])
                pos += take
                self.chunk_left = left - take
                continue
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            if eol == pos:  # the CRLF that ends a chunk's data
                pos += 2
                continue
            size = int(raw[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:  # last chunk: the server ended the response
                if self.transport is not None:
                    self.transport.close()
                break
            self.chunk_left = size
        self.raw = raw[pos:] if pos < n else b""
        return b"".join(out) if len(out) != 1 else out[0]

    def _events(self, buf: bytes, end: int) -> None:
        now = time.time_ns()
        stats = self.stats
        epochs = _EPOCH.findall(buf, 0, end)
        seqs = _SEQ.findall(buf, 0, end)
        if len(epochs) != len(seqs):  # some other event carries a seq: parse block by block
            epochs, seqs = [], []
            for block in buf[:end].split(b"\n\n"):
                e, s = _EPOCH.search(block), _SEQ.search(block)
                if e and s:
                    epochs.append(e[1])
                    seqs.append(s[1])
                elif b"\ndata:" in block or block.startswith(b"data:"):
                    stats.unparsed += 1
        i = buf.rfind(b"\nid:", 0, end)
        if i >= 0 or buf.startswith(b"id:"):  # the last complete event's id: the resume point
            i += 1
            eol = buf.find(b"\n", i)
            self.last_id = buf[i + 3 : eol].strip()
        if not self.looked_for_retry:  # sent once, before the first event
            self.looked_for_retry = True
            m = _RETRY.search(buf, 0, end)
            if m:
                self.retry_ms = int(m[1])
        lo, hi, hist = stats.lo, stats.hi, stats.hist
        nxt = self.next
        for raw_seq, raw_epoch in zip(seqs, epochs, strict=True):
            seq = int(raw_seq)
            if seq < lo or seq > hi:
                continue
            if seq == nxt:
                nxt += 1
            elif seq > nxt:
                stats.lost += seq - nxt
                nxt = seq + 1
            else:
                stats.duplicated += 1
            stats.delivered += 1
            b = (now - int(raw_epoch)) // BUCKET_NS
            hist[b if 0 <= b < BUCKETS else (BUCKETS if b > 0 else 0)] += 1
        self.next = nxt
        if seqs:
            stats.last_ns = now
            if nxt > hi and not self.is_done and hi >= lo:
                self._mark_done()

    def _mark_done(self) -> None:
        self.is_done = True
        self.stats.done += 1
        if self.stats.on_done is not None:
            self.stats.on_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        was_up, self.up = self.up, False
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before the response headers"))
        elif was_up and self.on_lost is not None and self.on_lost(self):
            return  # it reconnects and goes on counting
        elif not self.is_done and self.stats.hi >= self.stats.lo:
            self._mark_done()  # nothing more will come; what is missing counts as lost


class Worker:
    """The worker process: opens the connections, then follows the controller's commands."""

    def __init__(self, url: str, connections: int, sources: Sequence[str] = ()) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.address = (self.host, self.port)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.request_head = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n"
        ).encode()
        self.n = connections
        self.sources = list(sources) or [""]
        self.stats = Stats()
        self.conns: list[SSEConnection] = []
        self.cpu_mark = self._cpu()
        self.reconnect = False
        self.quitting = False
        self.dropped = 0
        self.back = 0
        self.first_drop_ns = 0
        self.last_back_ns = 0
        self.back_ns: list[int] = []  # when each dropped connection came back
        self.first_try_ns = 0  # the first attempt to come back
        self.failed: dict[str, int] = {}  # attempts to come back that failed, by exception
        self._reconnects: set[asyncio.Task[None]] = set()

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def emit(self, **msg: Any) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def _connect(self, conn: SSEConnection, source: str) -> None:
        """One TCP connection + GET for `conn`, from `source` (127.0.0.x, or any); returns
        once the response's 200 headers are in, raises if they are not (within
        CONNECT_TIMEOUT_S: one deadline for the whole, no task per step, since a storm
        makes tens of thousands of these on the cores the server uses too)."""
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[None] = loop.create_future()
        conn.reset(connected)
        transport: asyncio.Transport | None = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                sock.setblocking(False)
                if source:
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((source, 0))
                await loop.sock_connect(sock, self.address)
                transport, _ = await loop.create_connection(lambda: conn, sock=sock)
                head = self.request_head
                if conn.last_id is not None:
                    head += b"Last-Event-ID: " + conn.last_id + b"\r\n"
                transport.write(head + b"\r\n")
                await connected
        except BaseException:
            if transport is None:
                sock.close()
            else:
                transport.abort()
            raise

    async def _open(self, i: int, gate: asyncio.Semaphore, errors: list[str]) -> None:
        loop = asyncio.get_running_loop()
        async with gate:
            conn = SSEConnection(self.stats, loop.create_future(), self._lost)
            try:
                await self._connect(conn, self.sources[i % len(self.sources)])
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            self.conns.append(conn)

    def _lost(self, conn: SSEConnection) -> bool:
        """A connection that was up ended: with reconnect on, bring it back (True)."""
        if not self.reconnect or self.quitting:
            return False
        if self.dropped == 0:
            self.first_drop_ns = time.time_ns()
        self.dropped += 1
        task = asyncio.get_running_loop().create_task(self._come_back(conn))
        self._reconnects.add(task)
        task.add_done_callback(self._reconnects.discard)
        return True

    async def _come_back(self, conn: SSEConnection) -> None:
        """Like EventSource: wait `retry:`, reconnect with Last-Event-ID, again until it works."""
        source = self.sources[id(conn) % len(self.sources)]
        while not self.quitting:
            await asyncio.sleep((conn.retry_ms if conn.retry_ms is not None else DEFAULT_RETRY_MS) / 1000)
            self.first_try_ns = self.first_try_ns or time.time_ns()
            try:
                await self._connect(conn, source)
            except (OSError, TimeoutError, ConnectionError) as exc:
                kind = type(exc).__name__
                self.failed[kind] = self.failed.get(kind, 0) + 1
                continue
            self.back += 1
            self.last_back_ns = time.time_ns()
            self.back_ns.append(self.last_back_ns)
            if self.back == self.dropped == len(self.conns):
                self.emit(event="back", dropped=self.dropped)
            return

    async def run(self) -> None:
        errors: list[str] = []
        gate = asyncio.Semaphore(50)
        await asyncio.gather(*(self._open(i, gate, errors) for i in range(self.n)))
        self.emit(event="connected", ok=len(self.conns), failed=len(errors), errors=sorted(set(errors))[:5])
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "window":
                self.window(int(cmd["id"]), int(cmd["lo"]), int(cmd["hi"]))
            elif cmd["cmd"] == "report":
                self.report()
            elif cmd["cmd"] == "reconnect":
                self.reconnect = bool(cmd["on"])
                self.dropped = self.back = self.first_drop_ns = self.last_back_ns = 0
                self.back_ns = []
                self.failed = {}
                self.first_try_ns = 0
            elif cmd["cmd"] == "quit":
                break
        self.quitting = True
        for task in list(self._reconnects):
            task.cancel()
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()

    def window(self, wid: int, lo: int, hi: int) -> None:
        s = self.stats
        s.lo, s.hi, s.window = lo, hi, wid
        s.hist = [0] * (BUCKETS + 1)
        s.delivered = s.lost = s.duplicated = s.unparsed = s.done = 0
        s.last_ns = 0
        self.cpu_mark = self._cpu()
        total = 0
        for c in self.conns:
            c.next = lo
            c.is_done = c.closed
            total += 1
        s.done = sum(1 for c in self.conns if c.closed)

        def on_done() -> None:
            if s.done == total:
                self.emit(event="done", id=wid)

        s.on_done = on_done
        self.emit(event="window", id=wid)
        if s.done >= total:
            self.emit(event="done", id=wid)

    def report(self) -> None:
        s = self.stats
        tail = sum(max(0, s.hi + 1 - c.next) for c in self.conns) if s.hi >= s.lo else 0
        hist = {i: v for i, v in enumerate(s.hist) if v}
        self.emit(
            event="report",
            delivered=s.delivered,
            lost=s.lost,
            missing=tail,
            duplicated=s.duplicated,
            unparsed=s.unparsed,
            closed=sum(1 for c in self.conns if c.closed),
            connections=len(self.conns),
            hist=hist,
            cpu_s=self._cpu() - self.cpu_mark,
            last_ns=s.last_ns,
            dropped=self.dropped,
            back=self.back,
            first_drop_ns=self.first_drop_ns,
            last_back_ns=self.last_back_ns,
            back_ns=self.back_ns,
            failed=self.failed,
            first_try_ns=self.first_try_ns,
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3):
        print("usage: python -m bench.loadclient URL CONNECTIONS [SOURCE,SOURCE...]", file=sys.stderr)
        return 2
    _raise_open_files()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sources = [a for a in argv[2].split(",") if a] if len(argv) == 3 else []
    asyncio.run(Worker(argv[0], int(argv[1]), sources).run())
    return 0


def _raise_open_files() -> None:
    """Open files: soft limit up to the hard one (each connection is a file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def source_addresses(url: str, connections: int, procs: int) -> list[list[str]]:
    """Per worker process, the loopback source addresses its connections spread over:
    one per PER_SOURCE_ADDRESS connections (at least one per process), 127.0.0.10 on; none
    when the server is not on loopback."""
    if not (urlsplit(url).hostname or "").startswith("127."):
        return [[] for _ in range(procs)]
    count = max(procs, math.ceil(connections / PER_SOURCE_ADDRESS))
    addresses = [f"127.0.0.{10 + k}" for k in range(count)]
    return [addresses[w::procs] for w in range(procs)]


# --- the controller side ----------------------------------------------------------------


UNREAD_KEPT = 64  # a worker's messages kept for a later wait (old windows' fall off)


class LoadClients:
    """`connections` SSE subscribers to `url`, spread over `procs` worker processes."""

    def __init__(self, url: str, connections: int, procs: int = 2) -> None:
        self.url = url
        self.connections = connections
        self.procs = max(1, min(procs, connections))
        self.workers: list[asyncio.subprocess.Process] = []
        self.connected = 0
        self.failed = 0
        self.window_id = 0
        self._unread: dict[int, list[dict[str, Any]]] = {}  # per worker pid: said, not yet waited for

    async def __aenter__(self) -> LoadClients:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, connect_s: float = 120.0) -> None:
        share = [
            self.connections // self.procs + (1 if i < self.connections % self.procs else 0)
            for i in range(self.procs)
        ]
        sources = source_addresses(self.url, self.connections, self.procs)
        for n, mine in zip(share, sources, strict=True):
            self.workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.loadclient",
                    self.url,
                    str(n),
                    ",".join(mine),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=str(_repo()),
                    limit=1 << 24,
                )
            )
        for w in self.workers:
            msg = await self._expect(w, "connected", connect_s)
            self.connected += msg["ok"]
            self.failed += msg["failed"]
            if msg["errors"]:
                print(f"  load client: {msg['failed']} connections failed: {msg['errors']}", file=sys.stderr)

    async def _expect(
        self, w: asyncio.subprocess.Process, event: str, wait_s: float, wid: int | None = None
    ) -> dict[str, Any]:
        """The worker's next `event` (of window `wid`). What it said meanwhile is kept for
        the wait that wants it: a subscriber that comes back after the window's last seq
        gets it with the response headers, so its worker says "done" before "back"."""
        assert w.stdout is not None
        unread = self._unread.setdefault(w.pid, [])
        for i, kept in enumerate(unread):
            if kept["event"] == event and (wid is None or kept.get("id") == wid):
                return unread.pop(i)
        while True:
            line = await asyncio.wait_for(w.stdout.readline(), wait_s)
            if not line:
                raise BenchError(
                    f"load client process exited (code {await w.wait()}) while waiting for {event}"
                )
            msg: dict[str, Any] = json.loads(line)
            if msg["event"] == event and (wid is None or msg.get("id") == wid):
                return msg
            unread.append(msg)
            del unread[:-UNREAD_KEPT]

    def _send(self, **cmd: Any) -> None:
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write((json.dumps(cmd) + "\n").encode())

    async def window(self, lo: int, hi: int) -> None:
        """Start counting seqs lo..hi; returns once every worker is counting."""
        self.window_id += 1
        self._send(cmd="window", id=self.window_id, lo=lo, hi=hi)
        for w in self.workers:
            await self._expect(w, "window", 30, self.window_id)

    async def wait_done(self, wait_s: float) -> bool:
        """True once every connection has seq `hi` (or closed); False after `wait_s`."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._expect(w, "done", wait_s, self.window_id) for w in self.workers)),
                wait_s,
            )
        except TimeoutError:
            return False
        return True

    async def report(self) -> dict[str, Any]:
        """The window's counters, summed over the workers; `hist` merged."""
        self._send(cmd="report")
        total: dict[str, Any] = {
            "delivered": 0,
            "lost": 0,
            "missing": 0,
            "duplicated": 0,
            "unparsed": 0,
            "closed": 0,
            "connections": 0,
            "cpu_s": 0.0,
            "last_ns": 0,
            "dropped": 0,
            "back": 0,
            "first_drop_ns": 0,
            "last_back_ns": 0,
            "back_ns": [],
            "failed": {},
            "first_try_ns": 0,
            "hist": {},
        }
        for w in self.workers:
            msg = await self._expect(w, "report", 60)
            for k in (
                "delivered",
                "lost",
                "missing",
                "duplicated",
                "unparsed",
                "closed",
                "connections",
                "cpu_s",
                "dropped",
                "back",
            ):
                total[k] += msg[k]
            total["last_ns"] = max(total["last_ns"], msg["last_ns"])
            total["last_back_ns"] = max(total["last_back_ns"], msg["last_back_ns"])
            total["back_ns"] += msg["back_ns"]
            for kind, n in msg["failed"].items():
                total["failed"][kind] = total["failed"].get(kind, 0) + n
            for k in ("first_try_ns", "first_drop_ns"):  # the earliest of the workers that saw one (0: none)
                total[k] = min((t for t in (total[k], msg[k]) if t), default=0)
            for b, v in msg["hist"].items():
                total["hist"][int(b)] = total["hist"].get(int(b), 0) + v
        return total

    async def reconnecting(self, on: bool) -> None:
        """Dropped connections come back from now on (on) or stay closed (off)."""
        self._send(cmd="reconnect", on=on)
        for w in self.workers:
            assert w.stdin is not None
            await w.stdin.drain()

    async def all_back(self, wait_s: float) -> bool:
        """True once every connection of every worker was dropped and came back."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._expect(w, "back", wait_s) for w in self.workers)), wait_s
            )
        except TimeoutError:
            return False
        return True

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    async def close(self) -> None:
        for w in self.workers:
            if w.returncode is None and w.stdin is not None:
                w.stdin.write(b'{"cmd": "quit"}\n')
                w.stdin.close()
        for w in self.workers:
            try:
                await asyncio.wait_for(w.wait(), 10)
            except TimeoutError:
                w.kill()
                await w.wait()
        self.workers.clear()


def _repo() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    sys.exit(main())
