"""The commands run next to `fanout up` find its servers with no environment set: `up`
writes the URLs it uses to .fanout/urls.env, `fanout status` and `fanout audit` run in the
same folder read them and say so."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from fanout.servers import free_port
from shared.settings import SERVER_URL_VARIABLES, read_urls_file
from tests.integration.test_up import DEADLINE, Run, root

pytestmark = pytest.mark.slow

__all__ = ["root"]  # the fixture, shared with test_up


def _bare_env() -> dict[str, str]:
    """This environment less the server URLs (which the test session sets) and the data dir."""
    env = {k: v for k, v in os.environ.items() if k not in SERVER_URL_VARIABLES and k != "FANOUT_DATA_DIR"}
    return {**env, "FANOUT_LOG_FORMAT": "json"}


async def _migrated(url: str) -> bool:
    """Whether the archiver has created the catalogue, waiting for it up to DEADLINE."""
    conn = await asyncpg.connect(url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while loop.time() < deadline:
            # Another process's progress, with nothing to await on: poll with a deadline.
            if await conn.fetchval("SELECT to_regclass('fanout.execution') IS NOT NULL"):
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await conn.close()


async def _fanout(cwd: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fanout", *args, cwd=cwd, env=_bare_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_and_audit_next_to_up_find_its_servers(root: Path) -> None:
    urls_env = f"from {root.resolve() / '.fanout' / 'urls.env'}"  # noqa: ASYNC240 - no I/O
    env = {
        **_bare_env(),
        "FANOUT_INGEST_HTTP": "127.0.0.1:0",
        "FANOUT_ARCHIVE_HTTP": "127.0.0.1:0",
        "FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
        "FANOUT_FEEDS_RATE": "20",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fanout", "up", "--private", cwd=root, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    up = Run(proc)
    try:
        await asyncio.wait_for(up.read_banner(), DEADLINE)
        written = read_urls_file(root / ".fanout" / "urls.env")
        assert written["NATS_URL"] == up.urls["nats"]
        assert written["REDIS_URL"] == up.urls["redis"]
        assert written["DATABASE_URL"] == up.urls["postgres"]
        assert written["DATABASE_URL"].endswith("/fanout")

        assert await _migrated(up.urls["postgres"]), up.log()

        code, out, err = await _fanout(root, "status")
        assert code == 0, err
        assert urls_env in err
        assert up.urls["redis"] in err and up.urls["postgres"] in err
        assert "execution" in out and "unreachable" not in out

        code, out, err = await _fanout(root, "audit")
        assert code in (0, 1), err  # 2 would be a server not found
        assert urls_env in err
        assert "Traceback" not in err
    finally:
        code = await up.interrupt()
    assert code == 0, up.log()

    # The servers are gone with `fanout up`; the file stays and says its run has ended.
    code, _, err = await _fanout(root, "status")
    assert code == 1
    assert f"pid {proc.pid}, is no longer running" in err
