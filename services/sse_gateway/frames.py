"""The bytes of the event stream: events, `id:`-only frames, notices, heartbeats.

sse-starlette's `ServerSentEvent` is the reference encoding. The rare frames (notices,
`retry:`) are encoded by it; the two hot ones (`event` and `id_only`, built once per
entry and feed set by the hub) are concatenated directly, byte for byte what
`ServerSentEvent(..., sep="\n").encode()` gives (tests/unit/test_frames.py holds them to
that), at a fraction of its cost: their parts never hold a line break (JSON escapes
them; cursors and feed names have none).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sse_starlette import ServerSentEvent

from shared.codec import is_malformed, typed_message
from shared.feeds import FEEDS


def entry_data(feed: str, fields: Mapping[str, str]) -> bytes:
    """The `data:` of a stream entry: one line of JSON, `codec.typed_message`."""
    return dumps(typed_message(FEEDS[feed], fields))


MALFORMED = b"malformed"


def entry_payload(feed: str, feed_b: bytes, fields: Mapping[str, str]) -> tuple[bytes, bytes]:
    """(event name, data) of an entry: the feed's event, or `event: malformed` for an
    entry that holds no valid message of its feed: a payload the ingestor could not decode
    (it keeps its seq, with an `error` field) or, outside the contract, an entry written by
    hand. Either way it is sent, so that nothing is skipped silently."""
    if is_malformed(fields):
        return MALFORMED, malformed_data(feed, fields.get("seq"), fields.get("message_id"), fields["error"])
    try:
        return feed_b, entry_data(feed, fields)
    except (KeyError, ValueError) as exc:
        error = f"malformed stream entry: {type(exc).__name__} {exc}"
        return MALFORMED, malformed_data(feed, fields.get("seq"), fields.get("message_id"), error)


def malformed_data(feed: str, seq: int | str | None, message_id: str | None, error: str) -> bytes:
    """The `data:` of an `event: malformed`: {feed, seq, message_id, error}."""
    number: int | None = None
    if isinstance(seq, int) or (seq is not None and seq.isascii() and seq.isdigit()):
        number = int(seq)
    return dumps({"feed": feed, "seq": number, "message_id": message_id, "error": error})


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def event(feed: bytes, data: bytes, cursor: bytes) -> bytes:
    return b"id: " + cursor + b"\nevent: " + feed + b"\ndata: " + data + b"\n\n"


def id_only(cursor: bytes) -> bytes:
    """Moves the client's last event id without an event (a filtered-out entry)."""
    return b"id: " + cursor + b"\n\n"


def notice(name: str, data: Mapping[str, Any]) -> bytes:
    """An in-band `event: gap` / `event: reset`; it carries no id (the next event's id moves on)."""
    return ServerSentEvent(dumps(data).decode(), event=name, sep="\n").encode()


def retry(ms: int) -> bytes:
    return ServerSentEvent(retry=ms, sep="\n").encode()


HEARTBEAT = b": heartbeat\n\n"
