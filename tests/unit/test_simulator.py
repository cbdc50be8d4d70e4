"""The simulated feeds: good payloads decode, malformed ones fail with BadPayload, and
the settings reject bad values with a clear error."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from services.simulator.__main__ import SimulatorSettings
from services.simulator.generator import DEFECTS, SYMBOLS, malformed, payloads
from shared import codec
from shared.feeds import EXECUTION, FEED_NAMES, FEEDS, SPORT_EVENT
from shared.settings import SettingsError


@pytest.mark.parametrize("feed", FEED_NAMES)
def test_good_payloads_decode(feed: str) -> None:
    for p in itertools.islice(payloads(feed, seed=7), 2000):
        assert p.defect is None
        fields = codec.decode(FEEDS[feed], p.data)
        assert all(fields.values()), fields


@pytest.mark.parametrize("feed", FEED_NAMES)
def test_every_malformed_payload_is_a_bad_payload(feed: str) -> None:
    seen: Counter[str] = Counter()
    for p in itertools.islice(payloads(feed, seed=3, malformed_share=1.0), 1000):
        assert p.defect in DEFECTS
        seen[p.defect] += 1
        with pytest.raises(codec.BadPayload):
            codec.decode(FEEDS[feed], p.data)
    assert set(seen) == set(DEFECTS)


@pytest.mark.parametrize("feed", FEED_NAMES)
@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_from_any_good_message_is_rejected(feed: str, defect: str) -> None:
    import random

    rng = random.Random(11)
    for good in itertools.islice(payloads(feed, seed=5), 300):
        with pytest.raises(codec.BadPayload):
            codec.decode(FEEDS[feed], malformed(good.data, defect, rng, feed))


def test_malformed_share_is_roughly_kept() -> None:
    sample = list(itertools.islice(payloads(EXECUTION.name, seed=1, malformed_share=0.1), 5000))
    bad = sum(p.defect is not None for p in sample)
    assert 350 < bad < 650


def test_executions_look_real() -> None:
    rows = [codec.decode(EXECUTION, p.data) for p in itertools.islice(payloads("execution", seed=2), 3000)]
    for row in rows:
        market, start = SYMBOLS[row["symbol"]]
        assert row["market"] == market
        assert 0.5 * start < float(row["price"]) < 2 * start  # a random walk, not noise
        assert float(row["quantity"]) >= 1
        assert len(row["stateSymbol"]) == 2
        assert int(row["executionEpoch"]) > 1_700_000_000_000  # milliseconds since 1970
    assert len({r["symbol"] for r in rows}) > 10
    assert {r["market"] for r in rows} >= {"NASDAQ", "NYSE", "LSE"}


def test_sport_events_look_real() -> None:
    sample = itertools.islice(payloads("sport_event", seed=2), 3000)
    rows = [codec.decode(SPORT_EVENT, p.data) for p in sample]
    assert len({r["sport"] for r in rows}) >= 5
    assert any(r["data_event"].startswith("Goal by #") for r in rows)
    assert len({r["match_title"] for r in rows}) > 20  # matches end and new ones start


def test_same_seed_same_sequence() -> None:
    def first(seed: int) -> list[bytes]:
        sample = itertools.islice(payloads("sport_event", seed=seed, malformed_share=0.2), 200)
        return [p.data for p in sample]

    assert first(9) == first(9)
    assert first(9) != first(10)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="malformed_share"):
        next(payloads("execution", malformed_share=1.5))
    with pytest.raises(KeyError, match="unknown feed"):
        next(payloads("trades"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FANOUT_FEEDS": "execution,trades"}, "FANOUT_FEEDS"),
        ({"FANOUT_FEEDS": ""}, "FANOUT_FEEDS"),
        ({"FANOUT_FEEDS_RATE": "-1"}, "FANOUT_FEEDS_RATE"),
        ({"FANOUT_FEEDS_RATE": "fast"}, "FANOUT_FEEDS_RATE"),
        ({"FANOUT_FEEDS_COUNT": "-3"}, "FANOUT_FEEDS_COUNT"),
        ({"FANOUT_FEEDS_MALFORMED_SHARE": "1.5"}, "FANOUT_FEEDS_MALFORMED_SHARE"),
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        SimulatorSettings.from_env(env)


def test_settings_defaults() -> None:
    s = SimulatorSettings.from_env({"FANOUT_FEEDS": " sport_event ", "FANOUT_FEEDS_COUNT": "0"})
    assert s.feed_list == ["sport_event"]
    assert s.count is None  # 0: no limit
    assert s.rate > 0
