"""A reference, not a product: the leanest Python SSE fan-out of one feed stream, to show
in the side-by-side what Python itself can do on this machine (`--servers ...,lean`).

    .venv/bin/python -m bench.lean_fanout --redis-url redis://127.0.0.1:6379/0 --prefix fanout --port 8100

One XREAD loop on the execution stream from its current end; for each batch, every
entry's frame (`event:`, `data:` = codec.typed_message JSON, `id:` = the entry id) is
encoded once, the batch is framed once as ONE HTTP chunk, and that chunk is written
straight to every subscriber's transport from the reader, with no task, queue, event or
timer per subscriber. Any GET is a subscription from `latest`. No resume, filters, auth,
history, heartbeats or slow-client handling: everything the gateway does beyond fanning
out is left out, so the difference between the two is what that costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from shared.codec import str_entry, typed_message
from shared.connections import redis_client
from shared.feeds import EXECUTION
from shared.keys import Keys

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"
)
MAX_WRITE_BUFFER = 4 << 20  # a subscriber this far behind is disconnected


class Subscriber(asyncio.Protocol):
    def __init__(self, clients: set[asyncio.Transport]) -> None:
        self.clients = clients
        self.transport: asyncio.Transport | None = None
        self.request = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport in self.clients:
            return
        self.request += data
        if b"\r\n\r\n" in self.request:
            self.transport.write(HEAD)
            self.clients.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.clients.discard(self.transport)


async def serve(redis_url: str, prefix: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    clients: set[asyncio.Transport] = set()
    server = await loop.create_server(lambda: Subscriber(clients), "127.0.0.1", port, backlog=4096)
    redis = redis_client(redis_url)
    stream = Keys(prefix).stream(EXECUTION.name)
    reader = asyncio.create_task(_read(redis, stream, clients))
    await stop.wait()
    reader.cancel()
    server.close()
    for t in list(clients):
        t.write(b"0\r\n\r\n")
        t.close()
    await redis.aclose()


async def _read(redis: object, stream: str, clients: set[asyncio.Transport]) -> None:
    last = "$"
    while True:
        reply = await redis.xread({stream: last}, count=1000, block=2000)  # type: ignore[attr-defined]
        if not reply:
            continue
        frames = []
        for raw_id, raw in reply[0][1]:
            entry_id = raw_id.decode()
            data = json.dumps(typed_message(EXECUTION, str_entry(raw)), separators=(",", ":"))
            frames.append(f"event: execution\ndata: {data}\nid: {entry_id}\n\n".encode())
            last = entry_id
        body = b"".join(frames)
        chunk = b"%x\r\n%s\r\n" % (len(body), body)
        for t in list(clients):
            if t.get_write_buffer_size() > MAX_WRITE_BUFFER:
                clients.discard(t)
                t.abort()
            else:
                t.write(chunk)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lean_fanout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--redis-url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.redis_url, args.prefix, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
