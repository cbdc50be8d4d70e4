"""NATS_URL naming one server or several (a cluster), as nats-py's `servers` list."""

from __future__ import annotations

import pytest

from shared.settings import Settings, SettingsError, nats_servers


def test_a_single_url_is_a_list_of_one() -> None:
    assert nats_servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]


def test_several_comma_separated_urls_are_split_in_order_blanks_ignored() -> None:
    assert nats_servers(" nats://a:4222, nats://b:4222 ,,nats://c:4222,") == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]


@pytest.mark.parametrize("url", ["", " ", ",", " , ,"])
def test_no_server_named_is_a_settings_error_naming_the_variable(url: str) -> None:
    with pytest.raises(ValueError, match="expected a URL"):
        nats_servers(url)
    with pytest.raises(SettingsError, match="NATS_URL="):
        Settings.from_env({"NATS_URL": url})


def test_settings_keep_the_comma_separated_value_as_given() -> None:
    s = Settings.from_env({"NATS_URL": "nats://a:4222,nats://b:4222"})
    assert s.nats_url == "nats://a:4222,nats://b:4222"
    assert nats_servers(s.nats_url) == ["nats://a:4222", "nats://b:4222"]
