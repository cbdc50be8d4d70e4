"""The fault suite's options: `--soak` for the long mode (also FANOUT_FAULTS_SOAK=1).

./dev test tests/faults            short mode (CI): each fault once, then a few at random
./dev test tests/faults --soak     long mode: faults at random for FANOUT_FAULTS_SOAK_SECONDS
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False, help="fault suite: run the long soak mode")


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    # The option exists only when this conftest is loaded at start (`pytest tests/faults`).
    flag = bool(request.config.getoption("--soak", default=False))
    return flag or os.environ.get("FANOUT_FAULTS_SOAK", "") not in ("", "0")
