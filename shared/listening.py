"""Listening sockets bound by the services themselves, before their servers start.

A socket bound and listening here, then handed to the server (uvicorn, aiohttp), fails
here, at once and as an OSError, when its address is taken. Left to the server, a race
with another process starting on the same port can pass the bind and lose at listen(),
and uvloop then reports the failure to the loop's exception handler and returns a server
without a socket (seen: two gateways started at once on one host, their ops ports alike).
"""

from __future__ import annotations

import socket

# Connections the kernel queues until the process accepts them. A crowd reconnecting at
# once (a restart) overflows a short queue, and each SYN dropped then comes again only
# after the client's retransmission timeout (1, 3, 7, 15 s): ask for the most, the kernel
# caps it at net.core.somaxconn.
BACKLOG = 65535


def bound_socket(
    host: str, port: int, *, listen: bool = True, reuse_port: bool = False, backlog: int = BACKLOG
) -> socket.socket:
    """A TCP socket bound to host:port as asyncio binds one (SO_REUSEADDR; for an IPv6
    address an IPv6-only socket), listening unless `listen` is False (a reservation).
    With `reuse_port`, SO_REUSEPORT: other sockets with it may share the port (a group of
    worker processes); without it, a second process on the port is refused. Raises
    OSError (EADDRINUSE: taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
