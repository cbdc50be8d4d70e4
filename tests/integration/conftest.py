"""Fixtures of the gateway's integration tests: its settings, isolated per test, and the
Writer that appends entries as the ingestor does."""

from __future__ import annotations

import os
from typing import Any

import pytest

from services.sse_gateway.settings import GatewaySettings
from shared.settings import Settings
from tests.integration.test_gateway_helpers import EPOCH, Writer


@pytest.fixture
def make_settings(base_settings: Settings) -> Any:
    def make(**overrides: Any) -> GatewaySettings:
        return GatewaySettings.from_env(
            os.environ,
            key_prefix=base_settings.key_prefix,
            db_schema=base_settings.db_schema,
            log_format="text",
            tokens="",
            **overrides,
        )

    return make


@pytest.fixture
def writer(redis: Any, base_settings: Settings) -> Writer:
    return Writer(redis, base_settings.key_prefix, EPOCH)
