"""What one stream costs the server to open and to close, by /proc, side by side:

    .venv/bin/python -m bench.stream_setup                    # 5,000 streams, 3 rounds
    .venv/bin/python -m bench.stream_setup --streams 2000 --rounds 1 --out -
    .venv/bin/python -m bench.stream_setup --servers gateway --rounds 1 --out - --profile /tmp/prof

A reconnect storm is, on the server's side, thousands of these at once. Per server, a
lean client (one process, uvloop, no parsing beyond counting) opens `--streams`
subscriptions, `--concurrency` at a time, each from its own socket, and waits for every
response's headers (and, for a resumed gateway stream, the entries it missed, which come
in its first chunk). The server's CPU (utime + stime of
its process tree) over that time, divided by the streams, is the set-up cost; then the
client closes every connection, and the CPU until the server is idle again, divided the
same way, is the cost of a stream's end.

- `gateway`, `from=latest`: a new viewer (it starts where the hub's reader is; no Redis read).
- `gateway`, resumed: `Last-Event-ID` 3 entries behind, as after a restart (the missed
  entries come from the hub's memory, no Redis read).
- `nchan`: nginx + nchan, 1 worker, a new subscriber.
- `lean`: bench/lean_fanout.py, accept, read the request, write the headers.

Writes bench/results/stream_setup.md (each round's figures and the median).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench import harness, profile
from bench.harness import BenchError, usage
from bench.sse_fanout import quiesce, start_gateway, start_lean, start_nchan
from services.sse_gateway import cursor
from services.sse_gateway.cursor import Position
from shared.feeds import EXECUTION

RESULTS = Path(__file__).parent / "results"
BEHIND = 3  # entries a resumed stream missed


@dataclass
class Round:
    server: str
    mode: str
    streams: int
    setup_us: float  # server CPU per stream opened
    end_us: float  # server CPU per stream closed
    open_s: float  # wall time to open them all


async def _client(
    url: str, streams: int, concurrency: int, last_id: str | None
) -> asyncio.subprocess.Process:
    """The client in a process of its own, once every stream is open."""
    args = [sys.executable, "-m", "bench.stream_setup", "--client", url, str(streams), str(concurrency)]
    proc = await asyncio.create_subprocess_exec(
        *args, *([last_id] if last_id else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 300)
    if line.strip() != b"open":
        raise BenchError(f"the stream-setup client said {line!r}")
    return proc


async def one_round(name: str, mode: str, pid: int, url: str, streams: int, concurrency: int,
                    last_id: str | None, profile_to: Path | None = None) -> Round:  # fmt: skip
    await quiesce(pid)
    sampler = profile.record(pid, None, profile_to) if profile_to else None  # while the streams open
    before = usage(pid)
    started = time.monotonic()
    proc = await _client(url, streams, concurrency, last_id)
    opened = usage(pid)
    open_s = time.monotonic() - started
    if sampler is not None and profile_to is not None:
        await asyncio.to_thread(profile.stop, sampler)
        title = f"{name}: stream set-up, {mode}"
        if await asyncio.to_thread(profile.write_summary, profile_to, title) is None:
            raise BenchError(f"py-spy wrote no profile to {profile_to}")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"close\n")
    await proc.stdin.drain()
    if (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() != b"closed":
        raise BenchError("the stream-setup client did not close its streams")
    await quiesce(pid)
    closed = usage(pid)
    proc.stdin.close()
    await proc.wait()
    return Round(
        name,
        mode,
        streams,
        1e6 * opened.cpu_since(before) / streams,
        1e6 * closed.cpu_since(opened) / streams,
        open_s,
    )


async def run(args: argparse.Namespace) -> list[Round]:
    harness.raise_open_files(args.streams + 1000)
    rounds: list[Round] = []
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in servers:
        async with AsyncExitStack() as stack:
            if name == "gateway":
                log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-setup-"))
                gw = await stack.enter_async_context(start_gateway(stack, "gateway", log_dir, {}, 1))
                await gw.publish(10)
                seq = await gw.last_seq()
                epoch = await gw.publisher.redis.hget(gw.publisher.meta, "epoch")
                if not epoch:
                    raise BenchError("the feed has no epoch in Redis")
                resume = cursor.format(
                    {EXECUTION.name: Position(_text(epoch), seq - BEHIND)}, (EXECUTION.name,)
                )
                modes: list[tuple[str, str | None]] = [
                    ("from=latest", None),
                    (f"resumed, {BEHIND} behind", resume),
                ]
                pid, url = gw.pid, gw.sub_url
            elif name == "nchan":
                nchan = await stack.enter_async_context(start_nchan(stack, "nchan", 1, args.streams + 1000))
                modes, pid, url = [("new subscriber", None)], nchan.pid, nchan.sub_url
            elif name == "lean":
                lean = await stack.enter_async_context(start_lean(stack))
                modes, pid, url = [("new subscriber", None)], lean.pid, lean.sub_url
            else:
                raise BenchError(f"unknown server {name!r}: gateway, nchan or lean")
            for r in range(args.rounds):
                for mode, last_id in modes:
                    raw = None
                    if args.profile and name != "nchan":
                        raw = Path(args.profile, f"{name}_{mode.split(',')[0].replace('=', '-')}_{r + 1}.txt")
                    got = await one_round(name, mode, pid, url, args.streams, args.concurrency, last_id, raw)
                    print(
                        f"{name:8} {mode:22} round {r + 1}: set-up {got.setup_us:6.0f} µs, end "
                        f"{got.end_us:5.0f} µs per stream, {got.open_s:.2f} s to open",
                        flush=True,
                    )
                    rounds.append(got)
    return rounds


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def markdown(rounds: list[Round], args: argparse.Namespace) -> str:
    lines = [
        "# Stream set-up and end: server CPU per stream",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python -m bench.stream_setup --streams "
        f"{args.streams} --concurrency {args.concurrency} --rounds {args.rounds}`; {os.cpu_count()} cores "
        "shared by server and client. CPU = utime + stime of the server's process tree (/proc), divided by "
        "the streams; median of the rounds (each round's figure in brackets).",
        "",
        "| server | subscription | streams | set-up, µs CPU per stream | end, µs CPU per stream "
        "| time to open them all |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = list(dict.fromkeys((r.server, r.mode) for r in rounds))
    for server, mode in keys:
        rs = [r for r in rounds if (r.server, r.mode) == (server, mode)]

        def cell(values: list[float], fmt: str = "{:.0f}") -> str:
            med = fmt.format(statistics.median(values))
            return med if len(values) == 1 else f"{med} ({', '.join(fmt.format(v) for v in values)})"

        lines.append(
            f"| {server} | {mode} | {rs[0].streams:,} | {cell([r.setup_us for r in rs])} | "
            f"{cell([r.end_us for r in rs])} | {cell([r.open_s for r in rs], '{:.2f}')} s |"
        )
    return "\n".join(lines) + "\n"


# --- the client ------------------------------------------------------------------------


def client_main(url: str, streams: int, concurrency: int, last_id: str | None) -> None:
    """Open `streams` subscriptions to `url` (with `last_id`: each resumed, and open once
    the BEHIND entries it missed are in too), say `open`, close them all on `close` from
    stdin, say `closed`."""
    import socket

    import uvloop

    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
        + (f"Last-Event-ID: {last_id}\r\n" if last_id else "")
        + "\r\n"
    ).encode()
    missed = BEHIND if last_id else 0

    class Stream(asyncio.Protocol):
        def __init__(self, headers: asyncio.Future[None]) -> None:
            self.headers = headers
            self.seen = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(request)  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            if self.headers.done():
                return
            self.seen += data
            head, end, body = self.seen.partition(b"\r\n\r\n")
            if not end:
                return
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                self.headers.set_exception(BenchError(head.split(b"\r\n", 1)[0].decode()))
            elif body.count(b"\ndata:") >= missed:  # a resumed stream: what it missed, too
                self.headers.set_result(None)
                self.seen = b""

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.headers.done():
                self.headers.set_exception(ConnectionError("closed before the headers"))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        sources = [f"127.0.0.{2 + i}" for i in range(-(-streams // 20000))]

        async def one(i: int) -> asyncio.BaseTransport:
            async with gate:
                sock = socket.socket()
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
                sock.bind((sources[i % len(sources)], 0))
                await loop.sock_connect(sock, address)
                headers: asyncio.Future[None] = loop.create_future()
                transport, _ = await loop.create_connection(lambda: Stream(headers), sock=sock)
                await headers
                return transport

        transports = await asyncio.gather(*(one(i) for i in range(streams)))
        print("open", flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.readline()
        for t in transports:
            t.close()
        await asyncio.sleep(0)  # the closes are written on the loop's next turn
        print("closed", flush=True)
        await reader.readline()

    uvloop.run(main())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="gateway,nchan,lean", help="comma-separated: gateway, nchan, lean")
    p.add_argument("--streams", type=int, default=5000, help="streams opened per round")
    p.add_argument("--concurrency", type=int, default=100, help="streams being opened at once")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "stream_setup.md"), help="markdown output ('-': none)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="sample the Python servers with py-spy while streams open; profiles and summaries go to DIR "
        "(the rounds' CPU figures then include what sampling costs the server: profile and measure apart)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        client_main(argv[1], int(argv[2]), int(argv[3]), argv[4] if len(argv) > 4 else None)
        return 0
    args = parse_args(argv)
    try:
        rounds = asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench.stream_setup: {exc}", file=sys.stderr)
        return 1
    text = markdown(rounds, args)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
