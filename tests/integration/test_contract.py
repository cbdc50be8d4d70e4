"""The gateway against its published contract (services/sse_gateway/openapi.json and
schemas/): the app's routes and the file name the same endpoints, the file is served at
/v1/openapi.json, schemathesis finds no 5xx and no response off its schema on a live
gateway (a real process on a free port, on the real Redis and PostgreSQL, a bounded
number of examples per operation), and the events of a live stream match the event
schemas. The stream itself is left out of the schemathesis run (it never ends)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jsonschema
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from starlette.routing import Mount, Route

from services.sse_gateway import contract
from services.sse_gateway.app import create_app
from shared.settings import Settings
from tests.integration.test_gateway_access import bearer, call, gateway_settings
from tests.integration.test_gateway_helpers import (
    Writer,
    archive,
    free_port,
    open_stream,
    running_gateway,
    xrange_all,
)

MAX_EXAMPLES = 30
STREAM = "/v1/stream"
SECRET = "contract-test-secret-" + "z" * 20
STATIC = "contract-tok"


def _routes(app: Any) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            out |= {(route.path, m.lower()) for m in route.methods or () if m != "HEAD"}
        elif isinstance(route, Mount):
            out.add((route.path + "/{path}", "get"))
    return out


def _documented() -> set[tuple[str, str]]:
    return {(path, method) for path, item in contract.openapi()["paths"].items() for method in item}


def test_the_apps_routes_and_openapi_json_agree(base_settings: Settings) -> None:
    app = create_app(gateway_settings(base_settings))
    routes, documented = _routes(app), _documented()
    assert routes - documented == set(), "routes missing from openapi.json"
    assert documented - routes == set(), "openapi.json documents routes the app does not have"
    assert ("/metrics", "get") not in routes  # on the ops port only


async def test_openapi_json_is_served(base_settings: Settings) -> None:
    app = create_app(gateway_settings(base_settings, tokens=f"{STATIC}=*"))
    async with app.router.lifespan_context(app):
        reply = await call(app, "GET", "/v1/openapi.json")  # no credential needed to read the contract
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    assert reply.json() == contract.openapi()
    assert reply.json()["openapi"].startswith("3.1")


def _schemathesis_run(base_url: str, auth: dict[str, str]) -> list[str]:
    """Every operation but the stream, MAX_EXAMPLES examples each: failures as text."""
    import schemathesis
    from schemathesis import checks

    # What the contract promises: no 5xx, only documented statuses and content types, and
    # every response body and header as documented. (Not "every schema-valid request is
    # accepted": a filter of the other feed, or a cursor naming another feed, are schema-valid
    # strings the gateway rightly answers with a documented 400.)
    promised = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_path(str(contract.OPENAPI))
    failures: list[str] = []
    tried: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err would raise here: the test fails
        if operation.path == STREAM:
            continue

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same examples every run: CI does not flake on a new draw
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            tried[case.path] = tried.get(case.path, 0) + 1
            case.call_and_validate(base_url=base_url, headers=auth, checks=promised, timeout=10)

        try:
            check()
        except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis's FailureGroup is the latter
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    documented = {p for p in contract.openapi()["paths"] if p != STREAM}
    assert set(tried) == documented, f"operations never called: {documented - set(tried)}"
    return failures


@pytest.mark.slow
async def test_the_live_gateway_holds_to_its_contract(redis: Any, pg: Any, base_settings: Settings) -> None:
    writer = Writer(redis, base_settings.key_prefix)
    for feed in ("execution", "sport_event"):
        await writer.append(feed, 5)
        await writer.append_malformed(feed)
        await writer.append(feed, 2)
        entries = await xrange_all(redis, base_settings.key_prefix, feed)
        await archive(pg, base_settings.db_schema, feed, entries[:5])
    env = {
        "FANOUT_TOKENS": f"{STATIC}=*",
        "FANOUT_JWT_SECRET": SECRET,
        "FANOUT_GATEWAY_OPS": f"127.0.0.1:{free_port()}",
    }
    async with running_gateway(base_settings, env) as gateway:
        base_url = f"http://127.0.0.1:{gateway.port}"
        failures = await asyncio.to_thread(_schemathesis_run, base_url, bearer(STATIC))
        assert not failures, "\n\n".join(failures)

        # the stream: every event of a live subscription matches its schema, every id the cursor's
        credential = jwt.encode({"exp": int(time.time()) + 60, "feeds": "*"}, SECRET, algorithm="HS256")
        stream = await open_stream(gateway.port, "from=earliest", headers=bearer(credential))
        assert stream.status == 200
        seen: dict[str, int] = {}
        cursor_schema = jsonschema.Draft202012Validator(contract.schema("cursor"))
        while sum(seen.values()) < 16:
            event = await stream.next()
            if event.has_id:
                assert cursor_schema.is_valid(event.id), event.id
            if event.event:
                contract.validate_event(event.event, event.data)
                seen[event.event] = seen.get(event.event, 0) + 1
        stream.close()
        assert seen == {"execution": 7, "sport_event": 7, "malformed": 2}
        assert "Traceback" not in gateway.stderr()
