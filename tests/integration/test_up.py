"""`fanout up` with private servers in a temporary folder: the pipeline runs (entries
reach Redis and PostgreSQL), the page its banner shows is where the gateway answers (the
gateway's port 0 made a real port), SIGINT stops everything with exit 0 and no process
left, and a second run on the same folder finds the data of the first."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from shared.connections import redis_client
from shared.keys import Keys

pytestmark = pytest.mark.slow

DEADLINE = 120.0  # seconds; generous for a shared 2-core machine, only a hang reaches it


@pytest.fixture
def root() -> Iterator[Path]:
    # Not tmp_path: PostgreSQL runs as another user, who cannot enter /tmp/pytest-of-root.
    path = Path(tempfile.mkdtemp(prefix="fanout-up-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _descendants(pid: int) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Run:
    """One `fanout up` process: its URLs (read from the banner) and its output."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.urls: dict[str, str] = {}
        self.stderr: list[bytes] = []
        self.gateway_ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr.append(line)
            if b'"gateway ready"' in line and not self.gateway_ready.done():  # a gateway worker's
                self.gateway_ready.set_result(json.loads(line)["url"])

    async def read_banner(self) -> None:
        assert self.proc.stdout is not None
        while "page" not in self.urls:
            line = (await self.proc.stdout.readline()).decode()
            assert line, f"fanout up ended before its banner:\n{self.log()}"
            m = re.match(r"\s+(NATS|Redis|PostgreSQL)\s+(\w+://\S+)\s+\(", line)
            if m:
                self.urls[{"NATS": "nats", "Redis": "redis", "PostgreSQL": "postgres"}[m[1]]] = m[2]
            if m := re.match(r"\s+page\s+(http://\S+)$", line):
                self.urls["page"] = m[1]

    def log(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")[-6000:]

    async def kill(self) -> int:
        self.proc.kill()
        code = await self.proc.wait()
        await self._drain
        return code

    async def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.proc.wait(), DEADLINE)
        await self._drain
        return code


async def _start(root: Path) -> Run:
    env = {
        **os.environ,
        "FANOUT_INGEST_HTTP": "127.0.0.1:0",
        "FANOUT_ARCHIVE_HTTP": "127.0.0.1:0",
        "FANOUT_GATEWAY_LISTEN": "127.0.0.1:0",  # a free port, which the banner must show
        "FANOUT_LOG_FORMAT": "json",
        "FANOUT_FEEDS_RATE": "20",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fanout", "up", "--private", "--data-dir", str(root / "data"),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    run = Run(proc)
    try:
        await asyncio.wait_for(run.read_banner(), DEADLINE)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return run


async def _first_entries(url: str, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    client: Any = redis_client(url)  # redis-py's reply types are too wide to index
    try:
        # XREAD BLOCK returns as soon as the pipeline has appended something.
        reply = await client.xread({stream: "0"}, count=5, block=int(DEADLINE * 1000))
        assert reply, "no entry reached Redis"
        return list(reply[0][1])
    finally:
        await client.aclose()


async def _archived(url: str, message_id: str) -> bool:
    """Whether the catalogue holds `message_id`, waiting for the archiver up to DEADLINE."""
    conn = await asyncpg.connect(url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while loop.time() < deadline:
            # Another process's progress, with nothing to await on: poll with a deadline.
            if await conn.fetchval("SELECT to_regclass('fanout.execution') IS NOT NULL") and (
                await conn.fetchval("SELECT count(*) FROM fanout.execution WHERE message_id = $1", message_id)
            ):
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await conn.close()


async def _get(url: str) -> int:
    """The status of GET `url` (http://127.0.0.1:PORT/...)."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"GET {parts.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    reply = await reader.read()
    writer.close()
    return int(reply.split(maxsplit=2)[1])


async def test_up_runs_stops_cleanly_and_keeps_its_data(root: Path) -> None:
    stream = Keys().stream("execution")

    first = await _start(root)
    try:
        # FANOUT_GATEWAY_LISTEN=127.0.0.1:0: the banner shows the port the gateway listens on.
        page = first.urls["page"]
        assert urlsplit(page).port, page
        ready = await asyncio.wait_for(first.gateway_ready, DEADLINE)
        assert urlsplit(ready).port == urlsplit(page).port, (ready, page)
        assert await _get(page) == 200
        entries = await _first_entries(first.urls["redis"], stream)
        first_id, first_fields = entries[0]
        first_message_id = first_fields[b"message_id"].decode()
        assert await _archived(first.urls["postgres"], first_message_id), first.log()
        children = _descendants(first.proc.pid)
    finally:
        code = await first.interrupt()
    assert code == 0, first.log()
    assert children, "fanout up started no process"
    left = [pid for pid in children if _alive(pid)]
    assert not left, f"processes left behind: {left}"
    assert b"Traceback" not in b"".join(first.stderr), first.log()

    second = await _start(root)
    try:
        assert second.urls.keys() == first.urls.keys()
        client: Any = redis_client(second.urls["redis"])
        try:
            kept = await client.xrange(stream, count=1)
            assert kept[0][0] == first_id  # the first run's stream (Redis AOF)
            new = await client.xread({stream: "$"}, count=1, block=int(DEADLINE * 1000))
        finally:
            await client.aclose()
        assert new, second.log()
        new_fields = new[0][1][0][1]
        assert int(new_fields[b"seq"]) > int(first_fields[b"seq"])  # seq goes on
        # Same JetStream stream (its creation time starts every message id): NATS kept its store.
        assert new_fields[b"message_id"].split(b".")[0] == first_message_id.split(".")[0].encode()
        conn = await asyncpg.connect(second.urls["postgres"])
        try:
            sql = "SELECT count(*) FROM fanout.execution WHERE message_id = $1"
            assert await conn.fetchval(sql, first_message_id) == 1  # the first run's catalogue
        finally:
            await conn.close()
    finally:
        code = await second.interrupt()
    assert code == 0, second.log()


def test_servers_come_from_the_urls_given_then_the_default_ports() -> None:
    from fanout.servers import port_answers
    from fanout.up import Up, UpSettings

    if not all(port_answers("127.0.0.1", p) for p in (6379, 5432)):
        pytest.skip("needs Redis and PostgreSQL on their default local ports (as CI has)")
    settings = UpSettings.from_env({"NATS_URL": "nats://nats.example:4222"})
    up = Up(settings, {"nats_url": True, "redis_url": False, "database_url": False}, "json")
    up.resolve_servers()
    assert up.servers == []  # nothing started
    assert up.urls["nats"] == "nats://nats.example:4222" and up.origin["nats"] == "given"
    assert up.urls["redis"] == "redis://127.0.0.1:6379/0"
    assert up.origin["redis"] == "already listening on port 6379"
    assert up.origin["postgres"] == "already listening on port 5432"
    env = up.child_env()
    assert env["NATS_URL"] == "nats://nats.example:4222"
    assert env["REDIS_URL"] == "redis://127.0.0.1:6379/0"


async def _exited(pid: int) -> None:
    """Wait until process `pid` (not necessarily our child) has exited: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_a_killed_fanout_up_takes_its_children_along(root: Path) -> None:
    run = await _start(root)
    children = _descendants(run.proc.pid)
    assert len(children) >= 3  # at least the three servers, and the services
    await run.kill()  # SIGKILL: no chance to stop anything itself
    await asyncio.wait_for(asyncio.gather(*(_exited(pid) for pid in children)), DEADLINE)
    assert not [pid for pid in children if _alive(pid)]


def test_a_gateway_port_0_is_one_free_port_for_the_gateway_and_the_banner() -> None:
    from fanout.up import Up, UpSettings

    settings = UpSettings.from_env({"FANOUT_GATEWAY_LISTEN": "127.0.0.1:0"})
    up = Up(settings, dict.fromkeys(("nats_url", "redis_url", "database_url"), True), "json")
    up.urls = {"nats": settings.nats_url, "redis": settings.redis_url, "postgres": settings.database_url}
    up.origin = dict.fromkeys(up.urls, "given")
    up.choose_gateway_port()
    host, port = up.gateway_listen
    assert host == "127.0.0.1" and port != 0
    assert up.child_env()["FANOUT_GATEWAY_LISTEN"] == f"127.0.0.1:{port}"
    assert f"  page        http://127.0.0.1:{port}/\n" in up.banner()
