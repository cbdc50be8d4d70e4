"""Sockets the services bind themselves (shared/listening.py): a taken port is an OSError
at once, SO_REUSEPORT only when asked, IPv6 addresses on IPv6-only sockets."""

from __future__ import annotations

import errno
import socket

import pytest

from shared.listening import bound_socket


def test_a_taken_port_is_an_oserror_and_a_free_one_listens() -> None:
    with bound_socket("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        with pytest.raises(OSError) as taken:
            bound_socket("127.0.0.1", port)
        assert taken.value.errno == errno.EADDRINUSE
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens: the connection is queued until accepted


def test_reuse_port_lets_a_group_share_the_port() -> None:
    with bound_socket("127.0.0.1", 0, listen=False, reuse_port=True) as reservation:
        port = reservation.getsockname()[1]
        with (
            bound_socket("127.0.0.1", port, reuse_port=True) as a,
            bound_socket("127.0.0.1", port, reuse_port=True) as b,
        ):
            assert a.getsockname()[1] == b.getsockname()[1] == port


def test_an_ipv6_address_gets_an_ipv6_only_socket() -> None:
    try:
        sock = bound_socket("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
