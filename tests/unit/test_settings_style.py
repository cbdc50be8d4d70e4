"""shared/settings.py: defaults shown the way they are written (in --help and in the README's
configuration table, alike), one name per setting across the commands, and the server URLs
that `fanout up` leaves in its urls.env for the other commands."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Any

import pytest

from shared.settings import (
    Settings,
    SettingsError,
    format_duration,
    parse_duration,
    parse_milliseconds,
    read_urls_file,
    urls_file,
    with_up_urls,
    write_urls_file,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (86400, "24h"), (90000, "25h"), (60, "1m"), (90, "90s"), (30, "30s"), (0.5, "500ms"), (2.5, "2.5s"),
        (0, "0s"),
    ],
)
def test_format_duration_writes_what_parse_duration_reads(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "ms"),
    [("2000", 2000), ("200ms", 200), ("2s", 2000), (" 1.5s ", 1500), ("2000.0", 2000), ("1m", 60000)],
)
def test_millisecond_settings_take_bare_milliseconds_or_any_duration(text: str, ms: int) -> None:
    assert parse_milliseconds(text) == ms  # a bare number is milliseconds, with or without a fraction


@pytest.mark.parametrize("text", ["", "soon", "-5", "2 secs", "1e3"])
def test_millisecond_settings_reject_what_durations_reject(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected milliseconds \(2000\) or a duration"):
        parse_milliseconds(text)


def test_the_millisecond_settings_read_durations_and_name_the_variable() -> None:
    from services.archiver.settings import ArchiverSettings
    from services.sse_gateway.settings import GatewaySettings

    assert ArchiverSettings.from_env({"FANOUT_ARCHIVE_BLOCK_MS": "1s"}).block_ms == 1000
    assert ArchiverSettings.from_env({"FANOUT_ARCHIVE_BLOCK_MS": "300"}).block_ms == 300
    assert GatewaySettings.from_env({"FANOUT_RETRY_MS": "5s"}).retry_ms == 5000
    with pytest.raises(SettingsError, match=r"FANOUT_RETRY_MS=.soon.: expected milliseconds \(2000\)"):
        GatewaySettings.from_env({"FANOUT_RETRY_MS": "soon"})


def test_help_shows_defaults_as_they_are_written() -> None:
    from services.ingestor.settings import IngestorSettings

    parser = argparse.ArgumentParser()
    IngestorSettings.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "(default: 24h)" in text  # FANOUT_JS_MAX_AGE, not 86400.0
    assert "(default: 127.0.0.1:9101)" in text  # FANOUT_INGEST_HTTP, not a tuple
    assert "(default: postgresql://127.0.0.1:5432/fanout)" in text

    from services.archiver.settings import ArchiverSettings

    parser = argparse.ArgumentParser()
    ArchiverSettings.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "at most 5000ms (default: 2s)" in text  # FANOUT_ARCHIVE_BLOCK_MS
    assert "(default: 127.0.0.1:9102)" in text and "a free port is used and logged" in text


def test_the_default_database_is_fanout() -> None:
    assert Settings.from_env({}).database_url.endswith("/fanout")


URLS = {
    "NATS_URL": "nats://127.0.0.1:41001",
    "REDIS_URL": "redis://127.0.0.1:41002/0",
    "DATABASE_URL": "postgresql://me@127.0.0.1:41003/fanout",
}


def test_urls_file_round_trip_and_location(tmp_path: Path) -> None:
    assert urls_file({}) == Path(".fanout/urls.env")
    path = urls_file({"FANOUT_DATA_DIR": str(tmp_path / "data")})
    assert path == tmp_path / "data" / "urls.env"
    write_urls_file(path, URLS, pid=os.getpid())
    assert read_urls_file(path) == {**URLS, "FANOUT_UP_PID": str(os.getpid())}


def test_unset_urls_come_from_the_file_and_say_so(tmp_path: Path) -> None:
    env = {"FANOUT_DATA_DIR": str(tmp_path)}
    write_urls_file(urls_file(env), URLS, pid=os.getpid())
    merged, note = with_up_urls(env)
    assert {k: merged[k] for k in URLS} == URLS
    assert str(tmp_path / "urls.env") in note and "REDIS_URL=redis://127.0.0.1:41002/0" in note
    assert "no longer running" not in note


def test_the_environment_and_flags_win_over_the_file(tmp_path: Path) -> None:
    env = {"FANOUT_DATA_DIR": str(tmp_path), "NATS_URL": "nats://elsewhere:4222"}
    write_urls_file(urls_file(env), URLS, pid=os.getpid())
    merged, note = with_up_urls(env, skip=frozenset({"DATABASE_URL"}))
    assert merged["NATS_URL"] == "nats://elsewhere:4222"
    assert "DATABASE_URL" not in merged
    assert merged["REDIS_URL"] == URLS["REDIS_URL"]
    assert "NATS_URL" not in note and "DATABASE_URL" not in note


def test_no_file_or_nothing_missing_changes_nothing(tmp_path: Path) -> None:
    env = {"FANOUT_DATA_DIR": str(tmp_path)}
    assert with_up_urls(env) == (env, "")
    write_urls_file(urls_file(env), URLS, pid=os.getpid())
    full = {**env, **{k: "x://y" for k in URLS}}
    assert with_up_urls(full) == (full, "")


def test_a_file_left_by_a_stopped_up_says_so(tmp_path: Path) -> None:
    env = {"FANOUT_DATA_DIR": str(tmp_path)}
    dead = 2**22 + 12345  # above the default pid_max: no such process
    write_urls_file(urls_file(env), URLS, pid=dead)
    _, note = with_up_urls(env)
    assert f"pid {dead}, is no longer running" in note


def test_from_args_reads_the_file_only_for_the_commands_own_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in URLS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FANOUT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FANOUT_LOG_FORMAT", "text")
    write_urls_file(urls_file(os.environ), URLS, pid=os.getpid())
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    args = parser.parse_args(["--redis-url", "redis://flag:1/0"])
    settings = Settings.from_args(args)
    assert (settings.nats_url, settings.redis_url, settings.database_url) == (
        URLS["NATS_URL"], "redis://flag:1/0", URLS["DATABASE_URL"],
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "server URLs of `fanout up` from" in err and "REDIS_URL" not in err
    assert Settings.from_args(args, {}).nats_url == "nats://127.0.0.1:4222"  # an explicit environ: no file


# --- every setting of every command; every duration setting reads the same forms ----------------


def _declared_settings() -> list[tuple[type[Settings], dataclasses.Field[Any]]]:
    """Every field of every command's settings class, with the class that declares it (a
    setting declared by several commands, like FANOUT_JS_CONSUMER, once per command)."""
    from fanout.cli import COMMANDS

    for module, _ in COMMANDS.values():
        importlib.import_module(module)  # its settings class registers its fields
    found: list[tuple[type[Settings], dataclasses.Field[Any]]] = []
    todo: list[type[Settings]] = [Settings]
    while todo:
        cls = todo.pop()
        todo += [sub for sub in cls.__subclasses__() if not sub.__module__.startswith("tests")]
        inherited = {g.name for g in dataclasses.fields(cls.__mro__[1])} if cls is not Settings else set()
        found += [(cls, f) for f in dataclasses.fields(cls) if f.name not in inherited]
    return found


SETTINGS = _declared_settings()
SETTINGS_IDS = [f"{cls.__name__}.{f.metadata['env']}" for cls, f in SETTINGS]
DURATIONS = [(cls, f) for cls, f in SETTINGS if f.metadata["parse"] in (parse_duration, parse_milliseconds)]
CEILINGS = {
    "FANOUT_ARCHIVE_BLOCK_MS": 5.0,  # below the Redis socket timeout
    "FANOUT_READER_BLOCK": 25.0,
    "FANOUT_ARCHIVE_LINGER": 5.0,  # a bounded delay
}


def test_there_are_duration_settings_in_every_service() -> None:
    envs = {f.metadata["env"] for _, f in DURATIONS}
    for env in ("FANOUT_JS_ACK_WAIT", "FANOUT_ARCHIVE_BLOCK_MS", "FANOUT_HEARTBEAT", "FANOUT_RETRY_MS",
                "FANOUT_UP_GRACE", "FANOUT_AUDIT_INTERVAL"):
        assert env in envs


@pytest.mark.parametrize(("cls", "f"), DURATIONS, ids=[f.metadata["env"] for _, f in DURATIONS])
@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("1.5s", 1.5), ("2s", 2.0), ("1m", 60.0)])
def test_every_duration_setting_reads_the_same_forms(
    cls: type[Settings], f: dataclasses.Field[Any], text: str, seconds: float
) -> None:
    env = f.metadata["env"]
    ms = f.metadata["parse"] is parse_milliseconds
    if seconds > CEILINGS.get(env, seconds):
        text, seconds = "0.05m", 0.05 * 60
    value = getattr(cls.from_env({env: text, "FANOUT_ALLOW_OPEN": "true"}), f.name)
    assert value == (round(seconds * 1000) if ms else seconds)
    # The help shows the default the way it is written: a unit, never a bare number.
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    shown = re.findall(rf"{env}\s.*?\(default: ([^)]+)\)", " ".join(parser.format_help().split()))
    assert shown and re.fullmatch(r"\d+(\.\d+)?(ms|s|m|h)", shown[0]), (env, shown)
    # ... and a bare number is the unit documented: milliseconds for the _MS settings, else seconds.
    assert env.endswith("_MS") == ms
    bare = getattr(cls.from_env({env: "2", "FANOUT_ALLOW_OPEN": "true"}), f.name)
    assert bare == 2


@pytest.mark.parametrize(
    ("cls_path", "env"),
    [
        ("services.ingestor.settings.IngestorSettings", "FANOUT_JS_ACK_WAIT"),
        ("services.archiver.settings.ArchiverSettings", "FANOUT_ARCHIVE_CLAIM_IDLE"),
        ("services.archiver.settings.ArchiverSettings", "FANOUT_ARCHIVE_TRIM_INTERVAL"),
        ("services.sse_gateway.settings.GatewaySettings", "FANOUT_HEARTBEAT"),
        ("services.sse_gateway.settings.GatewaySettings", "FANOUT_TICKET_TTL"),
        ("services.sse_gateway.settings.GatewaySettings", "FANOUT_SLOW_CLIENT_TIMEOUT"),
        ("fanout.audit.AuditSettings", "FANOUT_AUDIT_INTERVAL"),
    ],
)
def test_a_zero_timeout_or_interval_is_refused_in_one_wording(cls_path: str, env: str) -> None:
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(SettingsError, match=rf"^{env}=0s: expected a positive duration$"):
        cls.from_env({env: "0ms"})


def test_range_errors_write_the_value_as_a_duration() -> None:
    from services.archiver.settings import ArchiverSettings
    from services.sse_gateway.settings import GatewaySettings

    with pytest.raises(SettingsError, match=r"^FANOUT_ARCHIVE_BLOCK_MS=6s: expected 1ms to 5s$"):
        ArchiverSettings.from_env({"FANOUT_ARCHIVE_BLOCK_MS": "6000"})
    with pytest.raises(SettingsError, match=r"^FANOUT_READER_BLOCK=30s: expected a duration above 0 and"):
        GatewaySettings.from_env({"FANOUT_READER_BLOCK": "30s"})
    with pytest.raises(SettingsError, match=r"^FANOUT_RETENTION=-1m: expected a duration of 0 or more$"):
        ArchiverSettings.from_env({}, retention=-60.0)
    assert ArchiverSettings.from_env({"FANOUT_RETENTION": "0s"}).retention == 0  # trim once archived


def test_the_audit_wait_flag_is_worded_like_a_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from fanout import audit

    parser = argparse.ArgumentParser(prog="fanout audit")
    audit.configure_parser(parser)
    assert parser.parse_args(["--wait", "1.5m"]).wait == 90.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--wait", "soon"])
    assert "argument --wait: 'soon': expected a duration such as 500ms, 30s" in capsys.readouterr().err


# --- every setting's default in --help, as a user sets it ---------------------------------------


def _help(cls: type[Settings]) -> str:
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    return " ".join(parser.format_help().split())


def _shown(cls: type[Settings], f: dataclasses.Field[Any]) -> str:
    """The default that `--help` shows for `f`: its entry's last `(default: ...)`."""
    flag, env = "--" + f.name.replace("_", "-"), f.metadata["env"]
    entry = re.search(rf"{flag} {env} .*?\(default: ([^()]*)\)(?= --[a-z-]+ [A-Z_]+ |$)", _help(cls))
    assert entry, f"{flag} {env} has no (default: ...) in the help of {cls.__name__}"
    return entry[1]


def test_every_command_has_settings_to_check() -> None:
    commands = ("Simulator", "Ingestor", "Archiver", "Gateway", "Up", "Audit", "Status")
    assert {cls.__name__ for cls, _ in SETTINGS} >= {"Settings", *(f"{c}Settings" for c in commands)}


@pytest.mark.parametrize(("cls", "f"), SETTINGS, ids=SETTINGS_IDS)
def test_help_shows_each_default_as_a_user_sets_it(cls: type[Settings], f: dataclasses.Field[Any]) -> None:
    shown = _shown(cls, f)
    if f.default is None or f.default == "":
        assert shown == ("unset" if f.default is None else "empty")
        return
    if isinstance(f.default, bool):
        assert shown in {"true", "false"}  # as the README and a user write it, not Python's False
    # What the help shows, set as the variable, is the default itself.
    env = f.metadata["env"]
    assert getattr(cls.from_env({env: shown}), f.name) == f.default, (env, shown)


# --- the README's configuration table: each setting's flag and default as --help shows them ------


def _readme_settings() -> dict[str, tuple[list[str], str]]:
    """The README's configuration table: variable -> (its flags, its default as written)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[list[str], str]] = {}
    for row in re.finditer(r"^\| `([A-Z_]+)` \(([^)]*)\) \| [^|]+ \| `([^`]*)` \|", table, re.MULTILINE):
        default = {"(empty)": "empty", "(unset)": "unset"}.get(row[3], row[3])
        rows[row[1]] = (re.findall(r"`(--[a-z-]+)`", row[2]), default)
    return rows


README_SETTINGS = _readme_settings()


@pytest.mark.parametrize(("cls", "f"), SETTINGS, ids=SETTINGS_IDS)
def test_the_readme_gives_each_setting_the_flag_and_default_of_its_help(
    cls: type[Settings], f: dataclasses.Field[Any]
) -> None:
    env = f.metadata["env"]
    assert env in README_SETTINGS, f"the README's configuration table has no row for {env}"
    flags, default = README_SETTINGS[env]
    assert flags[0] == "--" + f.name.replace("_", "-"), (cls.__name__, env, flags)
    assert default == _shown(cls, f), (cls.__name__, env)


# --- one name for the archivers' consumer group in the three commands that use it ---------------


@pytest.mark.parametrize(
    "cls_path",
    [
        "services.archiver.settings.ArchiverSettings",
        "fanout.status.StatusSettings",
        "fanout.audit.AuditSettings",
    ],
)
def test_the_archivers_group_is_archive_group_in_every_command(cls_path: str) -> None:
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    env = {"FANOUT_ARCHIVE_GROUP": "from-env"}
    assert cls.from_env(env).archive_group == "from-env"
    flagged = cls.from_args(parser.parse_args(["--archive-group", "from-flag"]), env)
    assert flagged.archive_group == "from-flag"
    assert cls.from_env({}).archive_group == "archiver"


def test_the_archivers_former_group_flag_is_refused_with_its_replacement() -> None:
    from services.archiver.settings import ArchiverSettings

    parser = argparse.ArgumentParser()
    ArchiverSettings.add_arguments(parser)
    assert "--group" not in " ".join(parser.format_help().split()).replace("--archive-group", "")
    with pytest.raises(SettingsError) as raised:
        ArchiverSettings.from_args(parser.parse_args(["--group", "mine"]), {})
    assert str(raised.value) == "--group is replaced by --archive-group NAME (default: archiver)"
    # The variable kept its name: it is the replacement's own, never refused.
    assert ArchiverSettings.from_env({"FANOUT_ARCHIVE_GROUP": "mine"}).archive_group == "mine"
