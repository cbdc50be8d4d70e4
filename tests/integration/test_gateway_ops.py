"""The gateway's ops endpoints live on their own address (FANOUT_GATEWAY_OPS), never on
the public port: /metrics only there; /healthz and /readyz on both (load balancers
probe the public port)."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.settings import Settings
from tests.integration.test_gateway_access import gateway_settings
from tests.integration.test_gateway_helpers import free_port, inprocess_gateway, running_gateway


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    reply = await reader.read()
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_only_on_the_ops_port_health_on_both(base_settings: Settings) -> None:
    ops = free_port()
    settings = gateway_settings(base_settings, gateway_ops=("127.0.0.1", ops))
    async with inprocess_gateway(settings) as app:
        public = app.state.port
        status, _ = await _get(public, "/metrics")
        assert status == 404
        status, body = await _get(ops, "/metrics")
        assert status == 200 and b"fanout_gateway_subscribers" in body
        for port in (public, ops):
            assert (await _get(port, "/healthz"))[0] == 200
            status, body = await _get(port, "/readyz")
            assert status == 200 and b'"reader:execution": "ok"' in body.replace(b'":"', b'": "')
        # the public port serves nothing of the ops server's beyond health
        assert (await _get(ops, "/v1/feeds"))[0] == 404


async def test_the_gateway_process_logs_its_ops_address_and_a_taken_port_moves(
    base_settings: Settings,
) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: Any = taken.sockets[0].getsockname()[1]
    try:
        env = {"FANOUT_GATEWAY_OPS": f"127.0.0.1:{port}"}
        async with running_gateway(base_settings, env) as gateway:
            log = gateway.stderr()
    finally:
        taken.close()
        await taken.wait_closed()
    assert "ops port taken" in log and f"127.0.0.1:{port}" in log
    assert "ops endpoints listening" in log
