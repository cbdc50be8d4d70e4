"""The gateway's supervisor (services/sse_gateway/workers.py), without forking: a dead
worker's replacement whose socket cannot be opened (out of descriptors, say) is tried
again later, and the supervisor goes on serving with the others instead of failing."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from services.sse_gateway import workers
from services.sse_gateway.settings import GatewaySettings


def test_a_replacement_that_cannot_listen_is_tried_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": "127.0.0.1:0"})
    sup = workers.Supervisor(settings, 2)
    sup.worker_settings = dataclasses.replace(settings, workers=1)
    sup.listeners = {}  # slot 1's worker died: its socket went with it

    def no_descriptors() -> object:
        raise OSError(24, "Too many open files")

    def must_not_fork() -> int:
        raise AssertionError("forked a worker without a socket")

    monkeypatch.setattr(sup, "_listener", no_descriptors)
    monkeypatch.setattr(os, "fork", must_not_fork)
    before = time.monotonic()
    assert sup._start(1) is False
    assert 1 not in sup.workers
    assert sup.due[1] >= before + workers.LISTEN_RETRY  # the loop starts it again then
