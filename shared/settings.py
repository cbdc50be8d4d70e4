"""Settings: read once at start from the environment and the command line, then passed down.

Each service declares a frozen dataclass whose fields are `setting(...)`s. Every field
has an environment variable and a command-line flag (`--redis-url` for `redis_url`),
the flag winning over the variable, the variable over the default. A bad value is an
error naming the variable or flag and what was expected.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self, get_type_hints


class SettingsError(ValueError):
    """A setting whose value cannot be used; the message names it."""


def nats_servers(url: str) -> list[str]:
    """NATS_URL as nats-py's `servers` list: one URL, or several comma-separated
    (`nats://a:4222,nats://b:4222`, the servers of one cluster); blanks around commas
    are ignored. ValueError if no server is named."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(
            f"NATS_URL={url!r}: expected a URL such as nats://127.0.0.1:4222, or several comma-separated"
        )
    return servers


def setting(env: str, default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A settings field read from `env` (and the matching flag)."""
    return field(default=default, metadata={"env": env, "help": help, "parse": parse})


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from `500ms`, `30s`, `15m`, `24h`, `7d` or a bare number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("expected a duration such as 500ms, 30s, 15m, 24h or 7d")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def parse_milliseconds(text: str) -> int:
    """Milliseconds from a bare number (the unit of a `_MS` setting: `2000`, `2.5`) or from
    a duration in any unit (`200ms`, `2s`), like every other duration setting."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("expected milliseconds (2000) or a duration such as 500ms or 2s")
    number = float(match[1])
    return round(number if match[2] is None else number * _UNIT_SECONDS[match[2]] * 1000)


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration, in the largest unit (up to hours) that is whole: 86400 -> `24h`,
    90 -> `90s`, 0.5 -> `500ms`, 0 -> `0s`."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    for unit in ("h", "m", "s"):
        count = seconds / _UNIT_SECONDS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    if seconds < 1 and round(seconds * 1000, 6) == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def require_positive(durations: Mapping[str, float]) -> None:
    """A SettingsError naming the first of these duration settings (variable: seconds) that is
    not above 0, its value written as a duration, like every such check."""
    for env, seconds in durations.items():
        if seconds <= 0:
            raise SettingsError(f"{env}={format_duration(seconds)}: expected a positive duration")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def parse_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:9101` -> ("127.0.0.1", 9101); an IPv6 host in brackets, `[::1]:9101` ->
    ("::1", 9101); no host, `:9101`, is every IPv4 interface ("0.0.0.0"); port 0 picks a
    free port. The inverse of format_host_port."""
    host, sep, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (":" in host and not bracketed) or "[" in host or "]" in host or (bracketed and not host):
        raise ValueError("expected HOST:PORT with an IPv6 host in brackets, such as [::1]:9101")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, such as 127.0.0.1:9101")
    return host or "0.0.0.0", int(port)


def format_host_port(host: str, port: int) -> str:
    """HOST:PORT as parse_host_port reads it (and as a URL's authority): an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Replaced:
    """A setting that no longer exists: its variable in the environment, or its flag, is
    an error naming the setting that replaced it, never silently ignored. `env` None: only
    the flag was renamed (the variable is the replacement's own)."""

    env: str | None  # FANOUT_GATEWAY_PORT
    flag: str  # --gateway-port
    by: str  # the field that replaced it: gateway_listen
    form: str  # how the replacement is written: HOST:PORT


_PARSERS: dict[Any, Callable[[str], Any]] = {str: str, int: int, float: float, bool: parse_bool}


def _show(meta: Mapping[str, Any], value: Any) -> str:
    """A default as the user would write it: `30s`, `127.0.0.1:9101`, `false`, `fanout`."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if meta["parse"] is parse_duration:
        return format_duration(value)
    if meta["parse"] is parse_milliseconds:
        return format_duration(value / 1000)
    if meta["parse"] is parse_host_port or isinstance(value, tuple):
        return format_host_port(*value)
    if value == "":
        return "empty"
    return str(value)


# --- the servers of `fanout up` -------------------------------------------------------------
# `fanout up` writes the URLs of the servers it uses to <FANOUT_DATA_DIR>/urls.env (a file a
# shell can also source); every other command run in that folder with none of these
# variables set reads them from there, so `fanout status` finds `./dev run`'s servers.

SERVER_URL_VARIABLES = ("NATS_URL", "REDIS_URL", "DATABASE_URL")
UP_PID_VARIABLE = "FANOUT_UP_PID"
DEFAULT_DATA_DIR = ".fanout"

log = logging.getLogger(__name__)


def urls_file(environ: Mapping[str, str]) -> Path:
    """Where `fanout up` writes its servers' URLs: <FANOUT_DATA_DIR, default .fanout>/urls.env."""
    return Path(environ.get("FANOUT_DATA_DIR") or DEFAULT_DATA_DIR) / "urls.env"


def write_urls_file(path: Path, urls: Mapping[str, str], pid: int) -> None:
    """Replace `path` (atomically) with one `VARIABLE=value` line per URL and the writer's pid."""
    lines = ["# written by `fanout up`; the fanout commands run in this folder read it", ""]
    lines += [f"{name}={shlex.quote(value)}" for name, value in urls.items()]
    lines.append(f"{UP_PID_VARIABLE}={pid}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)


def read_urls_file(path: Path) -> dict[str, str]:
    """The `VARIABLE=value` lines of a urls.env (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, raw = line.partition("=")
        if not sep or line.lstrip().startswith("#"):
            continue
        words = shlex.split(raw)
        values[name.strip()] = words[0] if words else ""
    return values


def with_up_urls(
    environ: Mapping[str, str], skip: frozenset[str] = frozenset()
) -> tuple[Mapping[str, str], str]:
    """`environ` plus the server URLs of `fanout up`'s urls.env for the variables that
    `environ` lacks (and that are not in `skip`, given as flags), and a sentence saying
    which came from where ("" if none did)."""
    missing = [name for name in SERVER_URL_VARIABLES if name not in environ and name not in skip]
    path = urls_file(environ)
    if not missing or not path.is_file():
        return environ, ""
    try:
        found = read_urls_file(path)
    except (OSError, ValueError) as exc:
        return environ, f"cannot read {path} ({exc}); using the default server URLs"
    taken = {name: found[name] for name in missing if found.get(name)}
    if not taken:
        return environ, ""
    note = f"server URLs of `fanout up` from {path.resolve()}: " + ", ".join(
        f"{name}={value}" for name, value in taken.items()
    )
    pid = found.get(UP_PID_VARIABLE, "")
    if pid.isdigit() and not _alive(int(pid)):
        note += f" (its `fanout up`, pid {pid}, is no longer running)"
    return {**environ, **taken}, note


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _announce(note: str, log_format: str) -> None:
    """One line on stderr, in the log format, before the command configures its logging."""
    from shared import logs

    record = logging.LogRecord(log.name, logging.INFO, __file__, 0, note, None, None)
    fmt = ("text" if sys.stderr.isatty() else "json") if log_format == "auto" else log_format
    formatter = logs.JsonFormatter("fanout") if fmt == "json" else logs.TextFormatter("fanout")
    print(formatter.format(record), file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    """What every process needs: where the servers are, how keys are named, how to log."""

    nats_url: str = setting(
        "NATS_URL",
        "nats://127.0.0.1:4222",
        "NATS server URL; several comma-separated for a cluster (nats://a:4222,nats://b:4222)",
    )
    redis_url: str = setting("REDIS_URL", "redis://127.0.0.1:6379/0", "Redis server URL")
    database_url: str = setting(
        "DATABASE_URL",
        "postgresql://127.0.0.1:5432/fanout",
        "PostgreSQL URL of the catalogue (the database is created if missing)",
    )
    key_prefix: str = setting("FANOUT_KEY_PREFIX", "fanout", "prefix of every Redis key")
    subject_prefix: str = setting(
        "FANOUT_SUBJECT_PREFIX",
        "",
        "prefix of the NATS subjects (the feeds are <prefix>execution, <prefix>sport_event)",
    )
    js_stream: str = setting(
        "FANOUT_JS_STREAM",
        "FEEDS",
        "base name of the JetStream streams, one per feed (<name>_execution, <name>_sport_event); "
        "a stream of this very name from the first layout is retired by the ingestor once drained",
    )
    db_schema: str = setting("FANOUT_DB_SCHEMA", "fanout", "PostgreSQL schema of the catalogue tables")
    log_format: str = setting(
        "FANOUT_LOG_FORMAT", "auto", "log format: json, text, or auto (text on a terminal)"
    )
    log_level: str = setting("FANOUT_LOG_LEVEL", "INFO", "log level: DEBUG, INFO, WARNING, ERROR")

    # Whether from_args() fills unset server URLs from `fanout up`'s urls.env (`up` writes it).
    reads_up_urls: ClassVar[bool] = True
    # Settings that no longer exist, refused with the name of their replacement.
    replaced: ClassVar[tuple[Replaced, ...]] = ()

    def subject(self, feed: str) -> str:
        return f"{self.subject_prefix}{feed}"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses extend it and raise SettingsError."""
        if self.log_format not in {"auto", "json", "text"}:
            raise SettingsError(f"FANOUT_LOG_FORMAT={self.log_format!r}: expected json, text or auto")
        try:
            nats_servers(self.nats_url)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Settings from the environment (os.environ by default); keyword overrides win."""
        environ = os.environ if environ is None else environ
        cls._refuse_replaced(
            [old for old in cls.replaced if old.env is not None and old.env in environ], flags=False
        )
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif f.metadata["env"] in environ:
                values[f.name] = _parse(
                    f.metadata, hints[f.name], environ[f.metadata["env"]], f.metadata["env"]
                )
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, its help naming the environment variable and the default."""
        group = parser.add_argument_group("settings (each flag also reads the environment variable named)")
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                metavar=f.metadata["env"],
                help=f"{f.metadata['help']} (default: {_show(f.metadata, default)})",
            )
        for old in cls.replaced:  # accepted only to be refused with a clear message
            group.add_argument(old.flag, dest=_replaced_dest(old), default=None, help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Self:
        """Settings from parsed flags (those given) over the environment. A command's own
        environment (`environ` None) lacking a server URL takes it from `fanout up`'s
        urls.env, if there is one, and says so on stderr."""
        cls._refuse_replaced(
            [old for old in cls.replaced if getattr(args, _replaced_dest(old), None) is not None], flags=True
        )
        hints = get_type_hints(cls)
        overrides = {
            f.name: _parse(f.metadata, hints[f.name], getattr(args, f.name), "--" + f.name.replace("_", "-"))
            for f in fields(cls)
            if getattr(args, f.name, None) is not None
        }
        note = ""
        if environ is None and cls.reads_up_urls:
            flagged = frozenset(f.metadata["env"] for f in fields(cls) if f.name in overrides)
            environ, note = with_up_urls(os.environ, flagged)
        settings = cls.from_env(environ, **overrides)
        if note:
            _announce(note, settings.log_format)
        return settings

    @classmethod
    def _refuse_replaced(cls, given: list[Replaced], *, flags: bool) -> None:
        """SettingsError naming the replacement of the first replaced setting given, and
        every other one given that it also replaces."""
        if not given:
            return
        by = given[0].by
        new = next(f for f in fields(cls) if f.name == by)
        if flags:
            old_names = [old.flag for old in given if old.by == by]
            replacement = f"{'--' + by.replace('_', '-')} {given[0].form}"
        else:
            old_names = [old.env for old in given if old.by == by and old.env is not None]
            replacement = f"{new.metadata['env']}={given[0].form}"
        verb = "is" if len(old_names) == 1 else "are"
        default = _show(new.metadata, new.default)
        raise SettingsError(
            f"{' and '.join(old_names)} {verb} replaced by {replacement} (default: {default})"
        )


def _replaced_dest(old: Replaced) -> str:
    return "replaced:" + old.flag


def _parse(meta: Mapping[str, Any], kind: Any, raw: str, name: str) -> Any:
    parse = meta["parse"] or _PARSERS.get(kind)
    if parse is None:
        raise SettingsError(f"{name}: no parser for {kind!r}")
    try:
        return parse(raw)
    except ValueError as exc:
        reason = (
            str(exc)
            if parse not in (int, float)
            else f"expected a{'n integer' if parse is int else ' number'}"
        )
        raise SettingsError(f"{name}={raw!r}: {reason}") from None
