"""The cursor: format and parse round-trip, every malformed cursor is a CursorError, and a
well-formed v1 cursor is recognised (LegacyCursor) rather than refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sse_gateway import cursor
from services.sse_gateway.cursor import CursorError, LegacyCursor, Position

positions = st.one_of(
    st.just(cursor.origin(cursor.NO_EPOCH)),
    st.builds(Position, st.integers(0, 10**20 - 1).map(str), st.integers(0, 2**63 - 1)),
)


@given(st.dictionaries(st.sampled_from(["execution", "sport_event"]), positions, min_size=1))
def test_format_then_parse_gives_the_positions_back(pos: dict[str, Position]) -> None:
    feeds = [f for f in ("execution", "sport_event") if f in pos]
    text = cursor.format(pos, feeds)
    assert text.startswith("v2:")
    assert cursor.parse(text) == pos


@given(
    st.fixed_dictionaries({"execution": positions, "sport_event": positions}),
    st.sampled_from([("execution",), ("sport_event",), ("execution", "sport_event")]),
    st.data(),
    st.integers(0, 2**63 - 1),
)
def test_the_cursor_cut_around_a_feed_gives_format_for_any_seq_of_it(
    pos: dict[str, Position], feeds: tuple[str, ...], data: st.DataObject, seq: int
) -> None:
    feed = data.draw(st.sampled_from(feeds))
    head, tail = cursor.around(pos, feeds, feed)
    moved = {**pos, feed: Position(pos[feed].epoch, seq)}
    assert b"%s%d%s" % (head, seq, tail) == cursor.format(moved, feeds).encode()


def test_documented_example_parses() -> None:
    parsed = cursor.parse("v2:execution.1795862595094.42,sport_event.1795862595101.17")
    assert parsed == {
        "execution": Position("1795862595094", 42),
        "sport_event": Position("1795862595101", 17),
    }
    assert parsed["execution"].entry_id == "42-0"
    assert cursor.parse("v2:execution.-.0") == {"execution": cursor.origin(cursor.NO_EPOCH)}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("execution:1-0", "unsupported cursor version"),
        ("1732770000123-0", "expected `v2:"),
        ("v3:execution.1.1", "unsupported cursor version"),
        ("v2:", "unknown feed"),
        ("v2:nope.1.1", "unknown feed"),
        ("v2:execution", "expected `execution.<epoch>.<seq>`"),
        ("v2:execution.17", "expected `execution.<epoch>.<seq>`"),
        ("v2:execution.17.1.1", "expected `execution.<epoch>.<seq>`"),
        ("v2:execution.ab12.1", "bad epoch"),  # epochs are ms now
        ("v2:execution.1 7.1", "bad epoch"),
        ("v2:execution..1", "bad epoch"),
        ("v2:execution.123456789012345678901.1", "bad epoch"),
        ("v2:execution.17.", "bad seq"),
        ("v2:execution.17.-1", "bad seq"),
        ("v2:execution.17.1-0", "bad seq"),
        ("v2:execution.17.9223372036854775808", "bad seq"),
        ("v2:execution.17.1,execution.17.1", "twice"),
        ("v2:execution.17.1,", "unknown feed"),
        ("v2:execution.-.3", "no epoch"),
        ("v2:" + "execution.17.1," * 40, "longer than"),
        # Unicode digits, which `\d` and int() accept: only ASCII 0-9 is a cursor digit
        ("v2:execution.17.\u0664\u0662", "bad seq"),  # Arabic-Indic 42
        ("v2:execution.\uff11.1", "bad epoch"),  # fullwidth 1
        ("v2:execution.17.\U0001d7d9", "bad seq"),  # mathematical double-struck 1
        # a line break inside a part (`$` matches before a trailing newline)
        ("v2:execution.17\n.1,sport_event.18.1", "bad epoch"),
        ("v2:execution.17.1\n,sport_event.18.1", "bad seq"),
        # v1 that is not even a well-formed v1 cursor: a 400 as before
        ("v1:", "unreadable v1 cursor"),
        ("v1:execution.ab.1-0", "unreadable v1 cursor"),
        ("v1:nope.ab.1-0.1", "unreadable v1 cursor"),
        ("v1:execution.ab.1-0.1,execution.ab.2-0.2", "unreadable v1 cursor"),
        ("v1:execution.ab.\uff11-0.1", "unreadable v1 cursor"),
    ],
)
def test_malformed_cursors_are_rejected_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(CursorError) as info:
        cursor.parse(text)
    assert says in str(info.value)


def test_a_well_formed_v1_cursor_is_recognised_not_refused() -> None:
    text = "v1:execution.ab12cd34.1732770000123-0.42,sport_event.ef56ab78.1732769999000-2.17"
    with pytest.raises(LegacyCursor) as info:
        cursor.parse(text)
    assert info.value.text == text
    assert info.value.feeds == ("execution", "sport_event")
    with pytest.raises(LegacyCursor) as one:
        cursor.parse("v1:sport_event.-.0-0.0")
    assert one.value.feeds == ("sport_event",)
