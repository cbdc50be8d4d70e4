"""The SSE benchmark still runs end to end, in miniature, against the servers it compares
(the gateway, and nchan when Debian's nginx + nchan are installed): every client gets
every event once. It asserts what the benchmark's figures rest on (counts),
never a timing."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from bench import sse_fanout

pytestmark = pytest.mark.slow

HAS_NCHAN = shutil.which("nginx") is not None and os.path.exists("/usr/lib/nginx/modules/ngx_nchan_module.so")


def test_every_client_gets_every_event_once_from_every_server() -> None:
    servers = ["gateway"] + (["nchan"] if HAS_NCHAN else [])
    args = sse_fanout.parse_args(
        ["--servers", ",".join(servers), "--clients", "20", "--small-clients", "5", "--small-rate", "200",
         "--duration", "1", "--no-ramp", "--client-procs", "1", "--drain", "20", "--out", "-"]
    )  # fmt: skip
    run = asyncio.run(sse_fanout.run(args))

    assert {w.server for w in run.windows} == set(servers)
    assert set(run.idle_kb_per_client) == set(servers)
    for w in run.windows:
        assert w.clients == (20 if "20 clients" in w.scenario else 5)
        assert (w.lost, w.duplicated, w.missing, w.closed, w.unparsed) == (0, 0, 0, 0, 0), w
        assert w.delivered == w.expected == w.published * w.clients, w
    text = sse_fanout.markdown(run)
    assert "| figure |" in text and "memory per idle client" in text
