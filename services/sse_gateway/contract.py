"""The gateway's published contract, kept in the repository beside the code:

- `openapi.json`: OpenAPI 3.1 for every HTTP endpoint of the public port, served at
  `GET /v1/openapi.json` (tests/integration/test_contract.py fails when the app's routes and
  the file disagree, and holds the live gateway to it with schemathesis);
- `schemas/<event>.json`: JSON Schema (2020-12) of the `data` of every SSE event type
  (`execution`, `sport_event`, `malformed`, `gap`, `reset`, `expired`), and `cursor.json`,
  the version 2 cursor every `id:` carries. openapi.json holds the same schemas under
  `components.schemas` (a test keeps them equal).

`validate_event(event_type, data)` checks one received event against its schema (for
test suites and clients; it needs `jsonschema`, in the dev extra).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
OPENAPI = HERE / "openapi.json"
SCHEMAS = HERE / "schemas"
EVENT_TYPES = ("execution", "sport_event", "malformed", "gap", "reset", "expired")
# the name of each schema under openapi.json's components.schemas
COMPONENT = {
    "execution": "ExecutionEvent",
    "sport_event": "SportEvent",
    "malformed": "MalformedNotice",
    "gap": "GapNotice",
    "reset": "ResetNotice",
    "expired": "ExpiredNotice",
    "cursor": "Cursor",
}


class EventSchemaError(ValueError):
    """An event whose data does not match its type's schema (or of no known type)."""


@cache
def schema(name: str) -> dict[str, Any]:
    """schemas/<name>.json (an event type, or `cursor`)."""
    loaded: dict[str, Any] = json.loads((SCHEMAS / f"{name}.json").read_text())
    return loaded


@cache
def _validator(event_type: str) -> Any:
    import jsonschema  # the dev extra: only validation needs it, the gateway does not

    found = schema(event_type)
    jsonschema.Draft202012Validator.check_schema(found)
    return jsonschema.Draft202012Validator(found)


def validate_event(event_type: str, data: str | bytes | Mapping[str, Any]) -> None:
    """Check an SSE event's `data` (its JSON text, or parsed) against the schema of
    `event_type`. Raises EventSchemaError naming the type and the first mismatch."""
    if event_type not in EVENT_TYPES:
        raise EventSchemaError(f"unknown event type {event_type[:40]!r}; known: {', '.join(EVENT_TYPES)}")
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise EventSchemaError(f"event: {event_type}: data is not JSON ({exc})") from None
    errors = sorted(_validator(event_type).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(map(str, first.absolute_path)) or "(the data)"
        raise EventSchemaError(f"event: {event_type}: {where}: {first.message}")


@cache
def openapi_bytes() -> bytes:
    return OPENAPI.read_bytes()


def openapi() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(openapi_bytes())
    return loaded


async def openapi_endpoint(request: Request) -> Response:
    """GET /v1/openapi.json"""
    return Response(openapi_bytes(), media_type="application/json", headers={"Cache-Control": "no-cache"})


routes = [Route("/v1/openapi.json", openapi_endpoint, methods=["GET"])]
