"""`fanout gateway --workers 1` on FANOUT_GATEWAY_LISTEN: with port 0 its "gateway ready"
line names the port it bound (where it answers), not `:0`; a port already taken is one
clear line and exit 1, not a traceback; and the port listens before the gateway is
imported (with one worker or several), so a client that connects while it starts is
served, not refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from fanout.servers import free_port
from shared.settings import Settings
from tests.integration.test_gateway_helpers import ROOT, gateway_env

DEADLINE = 60.0  # seconds; only a hang reaches it


async def _start(base_settings: Settings, port: int, **extra: str) -> asyncio.subprocess.Process:
    env = gateway_env(
        base_settings, port, **{"FANOUT_GATEWAY_OPS": "127.0.0.1:0", "FANOUT_GATEWAY_WORKERS": "1", **extra}
    )
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fanout.cli",
        "gateway",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _record(proc: asyncio.subprocess.Process, msg: str, seen: list[str]) -> dict[str, Any]:
    """The first JSON log record of `proc` whose msg is `msg` (the lines read go to `seen`)."""
    assert proc.stderr is not None
    async with asyncio.timeout(DEADLINE):
        while line := (await proc.stderr.readline()).decode(errors="replace"):
            seen.append(line)
            if line.startswith("{") and (record := json.loads(line))["msg"] == msg:
                return dict(record)
    raise AssertionError(f"the gateway ended without logging {msg!r}:\n{''.join(seen)[-3000:]}")


async def _get(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    reply = await reader.read()
    writer.close()
    return int(reply.split(maxsplit=2)[1])


async def _exit_code(proc: asyncio.subprocess.Process, *, terminate: bool) -> int:
    """How `proc` exits, after a SIGTERM if `terminate`; its output drained meanwhile."""
    if terminate and proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(DEADLINE):
            await proc.stderr.read()  # drained, so that a full pipe cannot hold the process
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


async def test_with_port_0_the_ready_line_names_the_port_bound(base_settings: Settings) -> None:
    proc = await _start(base_settings, 0)
    seen: list[str] = []
    try:
        ready = await _record(proc, "gateway ready", seen)
        url = urlsplit(ready["url"])
        assert (url.scheme, url.hostname, url.path) == ("http", "127.0.0.1", "/v1/stream"), ready
        assert url.port, f"the ready line names port {url.port}: {ready['url']}"
        # The port it names is the one it serves on, from the moment it says so.
        assert await _get(url.port, "/healthz") == 200
    finally:
        code = await _exit_code(proc, terminate=True)
    assert code == 0, "".join(seen)[-3000:]


async def test_a_taken_port_is_one_clear_line_and_exit_1(base_settings: Settings) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = taken.sockets[0].getsockname()[1]
    try:
        proc = await _start(base_settings, port)
        seen: list[str] = []
        try:
            refusal = await _record(proc, "gateway cannot listen", seen)
        finally:
            code = await _exit_code(proc, terminate=False)
    finally:
        taken.close()
        await taken.wait_closed()
    assert code == 1
    assert refusal["level"] == "error" and refusal["port"] == port, refusal
    assert "in use" in refusal["error"], refusal
    assert not any("Traceback" in line for line in seen), "".join(seen)


# A sitecustomize for the gateway's interpreter: the import of the gateway's server module
# waits until the test has opened the FIFO (so the test knows the process got there) and
# closed it again (the test's request is in by then).
HOLD_THE_IMPORT = """
import sys

class _Hold:
    def find_spec(self, name, path=None, target=None):
        if name == "services.sse_gateway.server":
            sys.meta_path.remove(self)
            with open({fifo!r}) as gate:
                gate.read()
        return None

sys.meta_path.insert(0, _Hold())
"""


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_client_connecting_while_the_gateway_imports_is_served_not_refused(
    base_settings: Settings, tmp_path: Path, workers: int
) -> None:
    """A restarted gateway spends about half a second importing before it can serve. Its
    port listens before that, so a crowd reconnecting meanwhile waits in the backlog,
    instead of being refused and waiting out its whole `retry:` delay again."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    (tmp_path / "sitecustomize.py").write_text(HOLD_THE_IMPORT.format(fifo=str(gate)))
    port = free_port()
    proc = await _start(base_settings, port, FANOUT_GATEWAY_WORKERS=str(workers), PYTHONPATH=str(tmp_path))
    held = False
    try:
        async with asyncio.timeout(DEADLINE):
            writer_end = await asyncio.to_thread(open, gate, "w")  # the import is being held
            held = True
            try:
                # Refused here (ConnectionRefusedError) if the port listened only after it.
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /v1/stream?feeds=execution HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
            finally:
                writer_end.close()  # the import goes on
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"text/event-stream" in head, head
            assert b"retry: " in await reader.readuntil(b"\n\n")  # the stream began
            writer.close()
    finally:
        if not held:  # the gateway never got there: let the thread's open() return
            os.close(os.open(gate, os.O_RDONLY | os.O_NONBLOCK))
        code = await _exit_code(proc, terminate=True)
    assert code == 0
