"""`protocol.Connection.send`, the hub's write to a live subscriber: it writes to the
socket itself while the transport holds nothing unwritten, so it must keep the bytes in
order when the kernel takes only part of a chunk, keep its byte bound, and never touch a
closing connection. On a socket pair, with asyncio's loop and with uvloop (what
`fanout gateway` runs)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from services.sse_gateway.protocol import Connection

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
Check = Callable[[Connection, socket.socket], Awaitable[None]]


class _Sink(asyncio.Protocol):
    pass


def _on_pair(loop: str, check: Check) -> None:
    """`check` on a Connection over one end of a socket pair and the peer end, run on `loop`."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(_Sink, ours)
        try:
            await check(Connection(transport), peer)
        finally:
            transport.abort()
            peer.close()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


async def _read(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    async with asyncio.timeout(10):
        while len(got) < size:
            got += await loop.sock_recv(peer, size - len(got))
    return bytes(got)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_chunks_arrive_whole_and_in_order_when_the_kernel_takes_only_part(loop: str) -> None:
    _on_pair(loop, _chunks_in_order)


async def _chunks_in_order(conn: Connection, peer: socket.socket) -> None:
    # Chunks past the socket's buffer: a write(2) takes part of one, the rest waits.
    chunks = [bytes([65 + i % 26]) * (1000 + 45_000 * i) for i in range(12)]
    for chunk in chunks:
        assert conn.send(chunk, limit=10**9)
    assert conn.buffered() > 0  # the kernel took part: the rest waits in the transport
    assert await _read(peer, sum(map(len, chunks))) == b"".join(chunks)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_chunk_past_the_byte_bound_is_refused_and_nothing_of_it_written(loop: str) -> None:
    _on_pair(loop, _byte_bound)


async def _byte_bound(conn: Connection, peer: socket.socket) -> None:
    sent: list[bytes] = []
    chunk = b"x" * 4096
    while conn.buffered() == 0:  # fill the kernel's buffers, then the transport's
        assert conn.send(chunk, limit=20_000)
        sent.append(chunk)
    while conn.send(chunk, limit=20_000):
        sent.append(chunk)
    queued = conn.buffered()
    assert queued + len(chunk) > 20_000 and queued <= 20_000
    assert not conn.send(b"y" * 10, limit=queued)  # refused: no byte of it anywhere
    assert await _read(peer, len(sent) * len(chunk)) == b"".join(sent)
    assert conn.buffered() == 0
    assert conn.send(b"after", limit=20_000)
    assert await _read(peer, 5) == b"after"


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_closing_connection_takes_nothing(loop: str) -> None:
    _on_pair(loop, _closing)


async def _closing(conn: Connection, peer: socket.socket) -> None:
    assert conn.send(b"before", limit=1000)
    conn.transport.close()
    assert conn.send(b"after", limit=1000)  # leaving: True, and nothing written
    got = await _read(peer, 6)
    assert got == b"before"
    async with asyncio.timeout(10):
        assert await asyncio.get_running_loop().sock_recv(peer, 100) == b""  # EOF: "after" never came


class _TlsTransport:
    """What an SSL transport says of itself: a socket underneath, and an ssl_object."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.written: list[bytes] = []

    def get_extra_info(self, name: str) -> object:
        return {"socket": self.sock, "ssl_object": object()}.get(name)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_tls_connection_is_written_through_its_transport_only() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        transport = _TlsTransport(ours)
        conn = Connection(transport)  # type: ignore[arg-type]
        assert conn.send(b"event", limit=1000)
        assert transport.written == [b"event"]  # to be encrypted, never raw to the socket
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(100)
