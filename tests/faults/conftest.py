"""The fault suite's options and its one precondition.

./dev test tests/faults            short mode (CI): each fault once, then a few at random
./dev test tests/faults --soak     long mode: faults at random for FANOUT_FAULTS_SOAK_SECONDS

The suite runs private NATS, Redis and PostgreSQL servers (fanout/servers.py): when a
binary is missing it fails, naming what to install, and never skips (CI runs with CI=true
and must not pass without having run the suite).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fanout.servers import NatsServer, RedisServer, ServerError, postgres_bindir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False, help="fault suite: run the long soak mode")


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    # The option exists only when this conftest is loaded at start (`pytest tests/faults`).
    flag = bool(request.config.getoption("--soak", default=False))
    return flag or os.environ.get("FANOUT_FAULTS_SOAK", "") not in ("", "0")


@pytest.fixture(scope="session", autouse=True)
def server_binaries() -> None:
    """nats-server, redis-server and PostgreSQL's binaries are there, or the suite fails."""
    missing = []
    scratch = Path(tempfile.gettempdir())
    for find in (lambda: NatsServer(scratch / "probe").executable(),
                 lambda: RedisServer(scratch / "probe").executable(),
                 postgres_bindir):
        try:
            find()
        except ServerError as exc:
            missing.append(str(exc))
    if missing:
        ci = os.environ.get("CI")
        ci = f" (CI={ci!r}: the fault suite must run in CI, not skip)" if ci else ""
        pytest.fail("the fault suite cannot start its private servers" + ci + ":\n" + "\n".join(missing),
                    pytrace=False)
