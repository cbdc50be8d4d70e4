"""The cursor: format and parse round-trip, and every malformed cursor is a CursorError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sse_gateway import cursor
from services.sse_gateway.cursor import CursorError, Position

ids = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)).map(lambda t: f"{t[0]}-{t[1]}")
positions = st.one_of(
    st.just(cursor.origin(cursor.NO_EPOCH)),
    st.builds(
        Position,
        st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True).filter(lambda e: e != cursor.NO_EPOCH),
        ids,
        st.integers(0, 2**63 - 1),
    ),
)


@given(st.dictionaries(st.sampled_from(["execution", "sport_event"]), positions, min_size=1))
def test_format_then_parse_gives_the_positions_back(pos: dict[str, Position]) -> None:
    feeds = [f for f in ("execution", "sport_event") if f in pos]
    text = cursor.format(pos, feeds)
    assert text.startswith("v1:")
    assert cursor.parse(text) == pos


def test_documented_example_parses() -> None:
    parsed = cursor.parse("v1:execution.ab12cd34.1732770000123-0.42,sport_event.ef56ab78.1732769999000-2.17")
    assert parsed == {
        "execution": Position("ab12cd34", "1732770000123-0", 42),
        "sport_event": Position("ef56ab78", "1732769999000-2", 17),
    }


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("execution:1-0", "unsupported cursor version"),
        ("1732770000123-0", "expected `v1:"),
        ("v2:execution.ab.1-0.1", "unsupported cursor version"),
        ("v1:", "unknown feed"),
        ("v1:nope.ab.1-0.1", "unknown feed"),
        ("v1:execution", "expected `execution.<epoch>.<entry id>.<seq>`"),
        ("v1:execution.ab.1-0", "expected `execution.<epoch>.<entry id>.<seq>`"),
        ("v1:execution.a b.1-0.1", "bad epoch"),
        ("v1:execution.ab.1.1", "bad stream entry id"),
        ("v1:execution.ab.x-0.1", "bad stream entry id"),
        ("v1:execution.ab.18446744073709551616-0.1", "bad stream entry id"),
        ("v1:execution.ab.1-0.-1", "bad seq"),
        ("v1:execution.ab.1-0.9223372036854775808", "bad seq"),
        ("v1:execution.ab.1-0.1,execution.ab.1-0.1", "twice"),
        ("v1:execution.ab.1-0.1,", "unknown feed"),
        ("v1:execution.-.5-0.3", "no epoch"),
        ("v1:" + "execution.ab.1-0.1," * 40, "longer than"),
        # Unicode digits, which `\d` and int() accept: only ASCII 0-9 is a cursor digit
        ("v1:execution.ab.1-0.\u0664\u0662", "bad seq"),  # Arabic-Indic 42
        ("v1:execution.ab.\uff11-0.1", "bad stream entry id"),  # fullwidth 1
        ("v1:execution.ab.1-\u0967.1", "bad stream entry id"),  # Devanagari 1
        ("v1:execution.ab.1-0.\U0001d7d9", "bad seq"),  # mathematical double-struck 1
        # a line break inside a part (`$` matches before a trailing newline)
        ("v1:execution.ab\n.1-0.1,sport_event.cd.1-0.1", "bad epoch"),
        ("v1:execution.ab.1-0\n.1,sport_event.cd.1-0.1", "bad stream entry id"),
        ("v1:execution.ab.1-0.1\n,sport_event.cd.1-0.1", "bad seq"),
    ],
)
def test_malformed_cursors_are_rejected_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(CursorError) as info:
        cursor.parse(text)
    assert says in str(info.value)


def test_id_before_is_the_greatest_id_below() -> None:
    assert cursor.id_before("5-3") == "5-2"
    assert cursor.id_before("5-0") == f"4-{2**64 - 1}"
    assert cursor.id_before("0-0") == "0-0"
    assert cursor.entry_key(cursor.id_before("1732770000123-0")) < cursor.entry_key("1732770000123-0")
