"""shared/settings.py and the ingestor's settings: parsing, precedence and clear errors."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from services.ingestor.settings import IngestorSettings
from shared.settings import (
    Settings,
    SettingsError,
    format_host_port,
    parse_bool,
    parse_duration,
    parse_host_port,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("15m", 900), ("24h", 86400), ("7d", 604800), ("2.5", 2.5), (" 1h ", 3600)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1s", "1w", "1 hour", "1e3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:9101") == ("127.0.0.1", 9101)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    assert parse_host_port(":8080") == ("0.0.0.0", 8080)
    assert parse_host_port("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert parse_host_port(" localhost:80 ") == ("localhost", 80)
    for bad in ("9101", "host:", "host:99999", "host:x", "host:\u0665", "[]:80", "[::1:80", "::1]:80"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_host_port(bad)
    with pytest.raises(ValueError, match=r"IPv6 host in brackets, such as \[::1\]:9101"):
        parse_host_port("::1:9101")  # port 9101 of ::1, or port 1:9101 of ::? Brackets say.
    for listen in (("127.0.0.1", 0), ("::1", 8000), ("0.0.0.0", 9101)):
        assert parse_host_port(format_host_port(*listen)) == listen


def test_parse_bool() -> None:
    assert parse_bool("Yes") is True and parse_bool("0") is False
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_defaults() -> None:
    s = IngestorSettings.from_env({})
    assert (s.nats_url, s.redis_url, s.js_stream, s.key_prefix) == (
        "nats://127.0.0.1:4222",
        "redis://127.0.0.1:6379/0",
        "FEEDS",
        "fanout",
    )
    assert (s.js_consumer, s.js_max_age, s.dedup_ttl, s.batch, s.max_payload, s.http) == (
        "ingestor",
        86400.0,
        900.0,
        1000,
        1024 * 1024,
        ("127.0.0.1", 9101),
    )
    assert s.subject("execution") == "execution"


def test_environment_is_parsed_and_typed() -> None:
    s = IngestorSettings.from_env(
        {
            "FANOUT_JS_MAX_AGE": "1h",
            "FANOUT_DEDUP_TTL": "2h",
            "FANOUT_INGEST_BATCH": "250",
            "FANOUT_INGEST_HTTP": "0.0.0.0:0",
            "FANOUT_SUBJECT_PREFIX": "up.",
            "UNRELATED": "x",
        }
    )
    assert (s.js_max_age, s.dedup_ttl, s.batch, s.http) == (3600.0, 7200.0, 250, ("0.0.0.0", 0))
    assert s.subject("sport_event") == "up.sport_event"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FANOUT_INGEST_BATCH": "lots"}, "FANOUT_INGEST_BATCH='lots': expected a whole number"),
        ({"FANOUT_INGEST_BATCH": "0"}, "FANOUT_INGEST_BATCH='0': expected a number of at least 1"),
        ({"FANOUT_MAX_PAYLOAD": "-5"}, "FANOUT_MAX_PAYLOAD='-5': expected a number of at least 1"),
        ({"FANOUT_JS_MAX_AGE": "a day"}, "FANOUT_JS_MAX_AGE='a day': expected a duration"),
        ({"FANOUT_INGEST_HTTP": "9101"}, "FANOUT_INGEST_HTTP='9101': expected HOST:PORT"),
        ({"FANOUT_LOG_FORMAT": "xml"}, "FANOUT_LOG_FORMAT='xml': expected json, text or auto"),
    ],
)
def test_a_bad_value_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        IngestorSettings.from_env(env)
    assert message in str(raised.value)


def test_the_dedup_ttl_is_the_redelivery_window_not_the_retention() -> None:
    # The seq <= top guard of the ingest script drops a redelivery after its key expired,
    # so the TTL need not cover FANOUT_JS_MAX_AGE (contract v2).
    s = IngestorSettings.from_env({"FANOUT_JS_MAX_AGE": "48h", "FANOUT_DEDUP_TTL": "5m"})
    assert (s.js_max_age, s.dedup_ttl) == (172800.0, 300.0)
    with pytest.raises(SettingsError, match=r"^FANOUT_DEDUP_TTL=0s: expected a positive duration$"):
        IngestorSettings.from_env({"FANOUT_DEDUP_TTL": "0s"})
    assert "FANOUT_REPLAY_MARGIN" not in {f.metadata["env"] for f in fields(IngestorSettings)}


def test_flags_win_over_the_environment_which_wins_over_defaults() -> None:
    parser = argparse.ArgumentParser()
    IngestorSettings.add_arguments(parser)
    args = parser.parse_args(["--batch", "50", "--js-stream", "FLAG"])
    s = IngestorSettings.from_args(
        args, {"FANOUT_INGEST_BATCH": "70", "FANOUT_JS_STREAM": "ENV", "FANOUT_KEY_PREFIX": "envprefix"}
    )
    assert (s.batch, s.js_stream, s.key_prefix) == (50, "FLAG", "envprefix")
    with pytest.raises(SettingsError, match="--batch='x': expected a whole number"):
        IngestorSettings.from_args(parser.parse_args(["--batch", "x"]), {})


def test_help_names_each_variable_and_default() -> None:
    parser = argparse.ArgumentParser()
    IngestorSettings.add_arguments(parser)
    text = parser.format_help()
    for env in ("NATS_URL", "REDIS_URL", "FANOUT_JS_CONSUMER", "FANOUT_DEDUP_TTL", "FANOUT_INGEST_HTTP"):
        assert env in text
    assert "default: 1000" in text


def test_base_settings_ignore_the_ingestors_variables() -> None:
    assert Settings.from_env({"FANOUT_INGEST_BATCH": "x"}).js_stream == "FEEDS"
