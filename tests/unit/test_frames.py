"""The gateway's hand-built frames are exactly what sse-starlette's ServerSentEvent encodes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from services.sse_gateway import frames

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_part = r"[a-z_]+\.[0-9]{13}\.[0-9]{1,6}"
_cursor = st.from_regex(rf"v2:{_part}(,{_part})?", fullmatch=True)


@given(data=_json_values, cursor=_cursor, feed=st.sampled_from(["execution", "sport_event"]))
def test_event_frame_is_what_sse_starlette_encodes(data: object, cursor: str, feed: str) -> None:
    body = frames.dumps(data)
    expected = ServerSentEvent(body.decode(), event=feed, id=cursor, sep="\n").encode()
    assert frames.event(feed.encode(), body, cursor.encode()) == expected


@given(cursor=_cursor)
def test_id_only_frame_is_what_sse_starlette_encodes(cursor: str) -> None:
    assert frames.id_only(cursor.encode()) == ServerSentEvent(id=cursor, sep="\n").encode()


@given(text=st.text())
def test_json_data_never_breaks_a_line(text: str) -> None:
    # A raw CR or LF inside data would end the field early: JSON must escape them.
    body = frames.dumps({"match_title": text})
    assert b"\n" not in body and b"\r" not in body


def test_notice_and_retry() -> None:
    assert frames.notice("gap", {"missed": 3}) == b'event: gap\ndata: {"missed":3}\n\n'
    assert frames.retry(2000) == b"retry: 2000\n\n"


def test_malformed_entries_name_feed_seq_message_id_and_error() -> None:
    entry = {"seq": "7", "message_id": "1795862595094.7", "error": "not protobuf", "payload_b64": "AA=="}
    name, data = frames.entry_payload("execution", b"execution", entry)
    assert name == frames.MALFORMED
    assert data == b'{"feed":"execution","seq":7,"message_id":"1795862595094.7","error":"not protobuf"}'
    # outside the contract (written by hand): still reported, not skipped
    by_hand = {"seq": "8", "message_id": "1.8", "price": "x"}
    name, data = frames.entry_payload("execution", b"execution", by_hand)
    assert name == frames.MALFORMED and b'"seq":8' in data and b"malformed stream entry" in data
