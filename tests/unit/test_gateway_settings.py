"""services/sse_gateway/settings.py: the public address, FANOUT_GATEWAY_LISTEN=HOST:PORT like
every other listen address, the two settings it replaced refused by name, and the open-mode
check on its host."""

from __future__ import annotations

import argparse

import pytest

from fanout import cli
from services.sse_gateway.settings import GatewaySettings
from shared.settings import SettingsError


def test_the_default_is_localhost_port_8000() -> None:
    s = GatewaySettings.from_env({})
    assert s.gateway_listen == ("127.0.0.1", 8000)
    assert s.listen_url() == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("text", "listen", "url"),
    [
        ("127.0.0.1:8001", ("127.0.0.1", 8001), "http://127.0.0.1:8001"),
        ("localhost:0", ("localhost", 0), "http://localhost:0"),  # port 0: a free port
        ("[::1]:8000", ("::1", 8000), "http://[::1]:8000"),
        (" 127.0.0.1:8000 ", ("127.0.0.1", 8000), "http://127.0.0.1:8000"),
    ],
)
def test_host_port_is_parsed(text: str, listen: tuple[str, int], url: str) -> None:
    s = GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": text})
    assert s.gateway_listen == listen
    assert s.listen_url() == url


def test_the_flag_is_derived_from_the_field_and_wins() -> None:
    parser = argparse.ArgumentParser()
    GatewaySettings.add_arguments(parser)
    args = parser.parse_args(["--gateway-listen", "127.0.0.1:0"])
    assert GatewaySettings.from_args(args, {"FANOUT_GATEWAY_LISTEN": "127.0.0.1:9000"}).gateway_listen == (
        "127.0.0.1",
        0,
    )
    text = " ".join(parser.format_help().split())
    assert "--gateway-listen FANOUT_GATEWAY_LISTEN" in text and "(default: 127.0.0.1:8000)" in text
    assert "--gateway-host" not in text and "--gateway-port" not in text  # refused, not offered


@pytest.mark.parametrize(
    "text", ["8000", "127.0.0.1", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:x", "::1:8000", "[::1:8000"]
)
def test_a_bad_value_names_the_variable_and_the_form(text: str) -> None:
    with pytest.raises(SettingsError) as raised:
        GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": text})
    assert str(raised.value).startswith(f"FANOUT_GATEWAY_LISTEN={text!r}: expected HOST:PORT")


@pytest.mark.parametrize("old", ["FANOUT_GATEWAY_HOST", "FANOUT_GATEWAY_PORT"])
def test_the_replaced_variables_are_refused_with_their_replacement(old: str) -> None:
    with pytest.raises(SettingsError) as raised:
        GatewaySettings.from_env({old: "8000"})
    assert str(raised.value) == (
        f"{old} is replaced by FANOUT_GATEWAY_LISTEN=HOST:PORT (default: 127.0.0.1:8000)"
    )
    with pytest.raises(SettingsError, match="replaced by FANOUT_GATEWAY_LISTEN"):  # even beside it
        GatewaySettings.from_env({old: "8000", "FANOUT_GATEWAY_LISTEN": "127.0.0.1:8000"})


def test_both_replaced_variables_are_named_in_one_line() -> None:
    with pytest.raises(SettingsError, match=r"^FANOUT_GATEWAY_HOST and FANOUT_GATEWAY_PORT are replaced by"):
        GatewaySettings.from_env({"FANOUT_GATEWAY_HOST": "0.0.0.0", "FANOUT_GATEWAY_PORT": "80"})


@pytest.mark.parametrize(
    ("argv", "env", "line"),
    [
        (
            [],
            {"FANOUT_GATEWAY_PORT": "8001"},
            "FANOUT_GATEWAY_PORT is replaced by FANOUT_GATEWAY_LISTEN=HOST:PORT",
        ),
        (["--gateway-host", "0.0.0.0"], {}, "--gateway-host is replaced by --gateway-listen HOST:PORT"),
    ],
)
@pytest.mark.parametrize("command", ["gateway", "up"])  # `fanout up` passes the setting on to the gateway
def test_the_gateway_and_up_refuse_to_start_in_one_line_exit_2(
    command: str,
    argv: list[str],
    env: dict[str, str],
    line: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("FANOUT_GATEWAY_HOST", "FANOUT_GATEWAY_PORT", "FANOUT_GATEWAY_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"fanout {command}: bad setting: {line} (default: 127.0.0.1:8000)\n"


def test_fanout_up_refuses_them_too() -> None:
    from fanout.up import UpSettings

    assert UpSettings.from_env({}).gateway_listen == ("127.0.0.1", 8000)
    with pytest.raises(SettingsError, match=r"^FANOUT_GATEWAY_PORT is replaced by FANOUT_GATEWAY_LISTEN="):
        UpSettings.from_env({"FANOUT_GATEWAY_PORT": "8000"})


@pytest.mark.parametrize("listen", ["0.0.0.0:8000", ":8000", "[::]:8000", "10.1.2.3:0", "example.com:8000"])
def test_open_mode_is_refused_beyond_loopback(listen: str) -> None:
    with pytest.raises(SettingsError, match=r"^FANOUT_GATEWAY_LISTEN=\S+ with no credential configured"):
        GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": listen})
    GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": listen, "FANOUT_TOKENS": "t=*"})
    GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": listen, "FANOUT_ALLOW_OPEN": "true"})


@pytest.mark.parametrize("listen", ["127.0.0.1:8000", "127.9.9.9:8000", "[::1]:0", "localhost:8000"])
def test_open_mode_is_allowed_on_loopback(listen: str) -> None:
    assert not GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": listen}).has_credentials


def test_the_refusal_names_the_address_as_written() -> None:
    with pytest.raises(SettingsError, match=r"^FANOUT_GATEWAY_LISTEN=\[::\]:8000 with no credential"):
        GatewaySettings.from_env({"FANOUT_GATEWAY_LISTEN": "[::]:8000"})
