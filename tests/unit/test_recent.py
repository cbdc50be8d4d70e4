"""The hub's recent window (services/sse_gateway/recent.py): what it answers is always
the contiguous run of one epoch's records after the asked seq, or "ask History"."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.sse_gateway.history import Record
from services.sse_gateway.recent import Recent

EPOCH = "1795862595094"
OTHER = "1795862599999"


def rec(seq: int) -> Record:
    return Record(seq, b'{"seq":%d}' % seq, {"seq": str(seq)})


def seqs(records: list[Record] | None) -> list[int] | None:
    return None if records is None else [r.seq for r in records]


def filled(limit: int, first: int, last: int) -> Recent:
    window = Recent(limit)
    for seq in range(first, last + 1):
        window.add(EPOCH, rec(seq))
    return window


def test_answers_the_records_after_a_seq_it_holds_the_next_of() -> None:
    window = filled(10, 5, 9)
    assert seqs(window.after(EPOCH, 4, 100)) == [5, 6, 7, 8, 9]  # just before its first
    assert seqs(window.after(EPOCH, 6, 100)) == [7, 8, 9]
    assert seqs(window.after(EPOCH, 6, 2)) == [7, 8]  # at most `limit`
    assert window.after(EPOCH, 9, 100) == []  # at its newest: nothing more yet


def test_does_not_answer_outside_what_it_holds_or_for_another_epoch() -> None:
    window = filled(10, 5, 9)
    assert window.after(EPOCH, 3, 100) is None  # seq 4 is not held: History
    assert window.after(EPOCH, 10, 100) is None  # ahead of it
    assert window.after(OTHER, 6, 100) is None
    assert Recent(10).after(EPOCH, 0, 100) is None  # empty


def test_keeps_at_most_limit_newest_records() -> None:
    window = filled(4, 1, 23)
    assert len(window) == 4
    assert (window.first, window.last) == (20, 23)
    assert seqs(window.after(EPOCH, 19, 100)) == [20, 21, 22, 23]
    assert window.after(EPOCH, 18, 100) is None


def test_a_hole_starts_it_again_from_the_record_after_it() -> None:
    window = filled(10, 1, 5)
    window.add(EPOCH, rec(8))  # 6 and 7 never came
    assert (window.first, window.last) == (8, 8)
    assert window.after(EPOCH, 5, 100) is None  # not [8]: that would skip 6 and 7
    assert seqs(window.after(EPOCH, 7, 100)) == [8]


def test_another_epoch_starts_it_again() -> None:
    window = filled(10, 1, 5)
    window.add(OTHER, rec(1))
    assert window.epoch == OTHER
    assert window.after(EPOCH, 3, 100) is None
    assert seqs(window.after(OTHER, 0, 100)) == [1]


def test_clear_forgets_everything() -> None:
    window = filled(10, 1, 5)
    window.clear()
    assert len(window) == 0 and window.epoch is None
    assert window.after(EPOCH, 3, 100) is None


def test_limit_zero_keeps_nothing() -> None:
    window = filled(0, 1, 5)
    assert len(window) == 0
    window.fill(EPOCH, [rec(1), rec(2)], 2)
    assert window.after(EPOCH, 0, 100) is None


def test_fill_keeps_the_run_that_reaches_the_readers_position_without_a_hole() -> None:
    window = Recent(10)
    window.fill(EPOCH, [rec(s) for s in (1, 2, 4, 5, 6)], 6)
    assert (window.first, window.last) == (4, 6)
    assert window.after(EPOCH, 2, 100) is None
    window.add(EPOCH, rec(7))  # the reader goes on from there
    assert seqs(window.after(EPOCH, 3, 100)) == [4, 5, 6, 7]


def test_fill_keeps_the_newest_limit() -> None:
    window = Recent(3)
    window.fill(EPOCH, [rec(s) for s in range(1, 11)], 10)
    assert (window.first, window.last) == (8, 10)


def test_fill_that_does_not_reach_the_position_leaves_it_empty() -> None:
    window = filled(10, 1, 3)
    window.fill(EPOCH, [rec(1), rec(2)], 5)  # Redis below the reader's position (being refilled)
    assert len(window) == 0 and window.after(EPOCH, 1, 100) is None


@given(
    limit=st.integers(1, 8),
    steps=st.lists(st.tuples(st.sampled_from([EPOCH, OTHER]), st.integers(1, 3)), max_size=40),
    asked=st.integers(0, 80),
)
def test_every_answer_is_the_contiguous_run_after_the_asked_seq(
    limit: int, steps: list[tuple[str, int]], asked: int
) -> None:
    window = Recent(limit)
    seq = 0
    for epoch, step in steps:  # a step of 2 or 3 is a hole
        seq += step
        window.add(epoch, rec(seq))
    assert len(window) <= limit
    for epoch in (EPOCH, OTHER):
        got = window.after(epoch, asked, 5)
        if got is None:
            continue
        assert epoch == window.epoch
        assert seqs(got) == list(range(asked + 1, asked + 1 + len(got)))
        assert got == [] or got[-1].seq == window.last or len(got) == 5
