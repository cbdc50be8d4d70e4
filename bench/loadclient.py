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

Per connection, within a window: the next expected seq starts at L; a seq above it counts
the skipped ones as lost, a seq below it as a duplicate; at report time, what a
connection still lacks up to H counts as missing. So lost + missing + delivered -
duplicated = H-L+1 per connection, exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from bench.harness import BenchError

BUCKET_NS = 100_000
BUCKETS = 600_000

_EPOCH = re.compile(rb'"executionEpoch":\s*(\d+)')
_SEQ = re.compile(rb'"seq":\s*(\d+)')


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
        "next",
        "raw",
        "stats",
        "transport",
    )

    def __init__(self, stats: Stats, connected: asyncio.Future[None]) -> None:
        self.stats = stats
        self.connected = connected
        self.head = b""
        self.raw = b""
        self.body = b""
        self.chunked: bool | None = None  # None until the response headers are in
        self.chunk_left = 0
        self.next = 0
        self.is_done = False
        self.closed = False
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
        if not self.connected.done():
            self.connected.set_result(None)
        return head[end + 4 :]

    def _dechunk(self, raw: bytes) -> bytes:
        if self.raw:
            raw = self.raw + raw
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
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before the response headers"))
        elif not self.is_done and self.stats.hi >= self.stats.lo:
            self._mark_done()  # nothing more will come; what is missing counts as lost


class Worker:
    """The worker process: opens the connections, then follows the controller's commands."""

    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n"
        ).encode()
        self.n = connections
        self.stats = Stats()
        self.conns: list[SSEConnection] = []
        self.cpu_mark = self._cpu()

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def emit(self, **msg: Any) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def _open(self, gate: asyncio.Semaphore, errors: list[str]) -> None:
        loop = asyncio.get_running_loop()
        async with gate:
            connected: asyncio.Future[None] = loop.create_future()
            try:
                transport, conn = await loop.create_connection(
                    lambda: SSEConnection(self.stats, connected), self.host, self.port
                )
                transport.write(self.request)
                await asyncio.wait_for(connected, 30)
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            self.conns.append(conn)

    async def run(self) -> None:
        errors: list[str] = []
        gate = asyncio.Semaphore(50)
        await asyncio.gather(*(self._open(gate, errors) for _ in range(self.n)))
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
            elif cmd["cmd"] == "quit":
                break
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
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m bench.loadclient URL CONNECTIONS", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Worker(argv[0], int(argv[1])).run())
    return 0


# --- the controller side ----------------------------------------------------------------


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
        for n in share:
            self.workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.loadclient",
                    self.url,
                    str(n),
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
        assert w.stdout is not None
        while True:
            line = await asyncio.wait_for(w.stdout.readline(), wait_s)
            if not line:
                raise BenchError(
                    f"load client process exited (code {await w.wait()}) while waiting for {event}"
                )
            msg: dict[str, Any] = json.loads(line)
            if msg["event"] == event and (wid is None or msg.get("id") == wid):
                return msg

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
            ):
                total[k] += msg[k]
            total["last_ns"] = max(total["last_ns"], msg["last_ns"])
            for b, v in msg["hist"].items():
                total["hist"][int(b)] = total["hist"].get(int(b), 0) + v
        return total

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
