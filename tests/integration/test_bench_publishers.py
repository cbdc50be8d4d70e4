"""The benchmark's nchan publisher against a server that closes an idle keep-alive
connection (nginx's keepalive_timeout, met between the rounds of a long run): the next
publish goes out on a new connection, while a connection lost with POSTs unanswered is
still an error."""

from __future__ import annotations

import asyncio

import pytest

from bench.publishers import NchanPublisher, PublishError


class _Server:
    """Answers each POST with 201; closes the connection after `per_connection` answers."""

    def __init__(self, per_connection: int) -> None:
        self.per_connection = per_connection
        self.connections = 0
        self.bodies: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        for _ in range(self.per_connection):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(
                int(h[15:]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")
            )
            self.bodies.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()


async def test_a_connection_closed_while_idle_is_opened_again() -> None:
    server = _Server(per_connection=1)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener, NchanPublisher(port, "execution") as publisher:
        for _ in range(3):
            await publisher.publish(1)
            await publisher.settle(wait_s=10)
            async with asyncio.timeout(10):  # the server closes it now: the publisher sees EOF
                while not (publisher._task is not None and publisher._task.done()):  # noqa: ASYNC110 - another task's state
                    await asyncio.sleep(0.01)
    assert server.connections == 3
    assert [b'"seq":%d' % n in body for n, body in enumerate(server.bodies, 1)] == [True] * 3


async def test_a_connection_lost_with_posts_unanswered_is_an_error() -> None:
    server = _Server(per_connection=1)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener, NchanPublisher(port, "execution") as publisher:
        await publisher.publish(3)  # one answered, then the connection closes
        with pytest.raises(PublishError, match="answered 1 of 3"):
            await publisher.settle(wait_s=10)
