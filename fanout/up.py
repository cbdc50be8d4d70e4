"""`fanout up`: the whole pipeline in the foreground, for a demo or development.

NATS, Redis and PostgreSQL are taken, in this order, from the URLs given (environment
or flags), from servers already listening on their default local ports, or else
started privately with their data under FANOUT_DATA_DIR (./.fanout/), so a second
`fanout up` finds the data of the first. Then it runs `fanout ingest`, `archive`,
`gateway` and, once the JetStream stream exists, `feeds` as child processes, forwards
their logs, and on Ctrl-C or SIGTERM stops the children (SIGTERM, then SIGKILL after
a grace period), then the private servers. Exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from fanout.cli import COMMANDS
from fanout.servers import (
    NatsServer,
    PostgresServer,
    RedisServer,
    Server,
    ServerError,
    die_with_parent,
    free_port,
    port_answers,
)
from services.sse_gateway.settings import LISTEN_REPLACED
from shared import logs
from shared.connections import create_database_if_missing
from shared.feeds import FEED_NAMES, js_stream_name
from shared.keys import Keys
from shared.lifecycle import install_stop_signals, wait_or_stop
from shared.settings import (
    Settings,
    format_host_port,
    nats_servers,
    parse_duration,
    parse_host_port,
    setting,
    write_urls_file,
)

log = logging.getLogger(__name__)

DESCRIPTION = """\
Run the whole pipeline in the foreground: feed simulators -> NATS JetStream -> ingestor
-> Redis streams -> archiver -> PostgreSQL, and the SSE gateway with its page.

Servers, for each of NATS, Redis and PostgreSQL: the URL given (NATS_URL, REDIS_URL,
DATABASE_URL or the flags); else one already listening on its default local port; else
a private one started here with its data under FANOUT_DATA_DIR, kept for the next run.
--private always starts private ones (on free ports if the default ports are taken).
The catalogue's database is created if the server lacks it. The URLs in use are written
to FANOUT_DATA_DIR/urls.env, where the other fanout commands run in this folder find
them when NATS_URL, REDIS_URL or DATABASE_URL is not set.

Ctrl-C (or SIGTERM) stops everything and exits 0.
"""

SERVICES = ("ingest", "archive", "gateway", "feeds")  # start order; feeds once the stream exists
STOP_ORDER = ("feeds", "ingest", "archive", "gateway")  # stop the input first


@dataclass(frozen=True)
class UpSettings(Settings):
    data_dir: str = setting("FANOUT_DATA_DIR", ".fanout", "folder of the private servers' data and logs")
    private_servers: bool = setting(
        "FANOUT_UP_PRIVATE", False, "always start private servers, ignoring URLs and default ports"
    )
    gateway_listen: tuple[str, int] = setting(
        "FANOUT_GATEWAY_LISTEN",
        ("127.0.0.1", 8000),
        "HOST:PORT the gateway serves the feeds and its page on (IPv6: [::1]:8000)",
        parse_host_port,
    )
    grace: float = setting(
        "FANOUT_UP_GRACE", 20.0, "how long children get to stop after SIGTERM before SIGKILL", parse_duration
    )

    reads_up_urls = False  # `up` writes the urls file; it never reads an earlier run's
    replaced = LISTEN_REPLACED


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--private", dest="private_servers", action="store_const", const="true",
        help="same as --private-servers true: start private servers even if others answer",
    )
    UpSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = UpSettings.from_args(args)
    given = {
        name: getattr(args, name, None) is not None or env in os.environ
        for name, env in (
            ("nats_url", "NATS_URL"), ("redis_url", "REDIS_URL"), ("database_url", "DATABASE_URL"),
        )
    }
    log_format = settings.log_format
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    logs.configure("up", log_format, settings.log_level)
    up = Up(settings, given, log_format)
    # Until the event loop takes over the signals, SIGTERM interrupts the start like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        up.resolve_servers()
        up.create_database()
        up.write_urls()
        return asyncio.run(up.main())
    except ServerError as exc:
        log.error(str(exc))
        return 1
    except KeyboardInterrupt:
        log.info("interrupted while starting")
        return 0
    finally:
        up.stop_servers()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Up:
    def __init__(self, settings: UpSettings, given: dict[str, bool], log_format: str) -> None:
        self.settings = settings
        self.given = given
        self.log_format = log_format
        self.urls: dict[str, str] = {}
        self.origin: dict[str, str] = {}
        self.gateway_listen = settings.gateway_listen  # port 0: a free port, by choose_gateway_port
        self.servers: list[Server] = []
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.stopping = False

    # --- servers ----------------------------------------------------------------------------

    def resolve_servers(self) -> None:
        s = self.settings
        root = Path(s.data_dir).resolve()
        defaults = Settings()
        kinds: list[tuple[str, str, str, type[Server], int]] = [
            ("nats", "nats_url", defaults.nats_url, NatsServer, 4222),
            ("redis", "redis_url", defaults.redis_url, RedisServer, 6379),
            ("postgres", "database_url", defaults.database_url, PostgresServer, 5432),
        ]
        for kind, field_name, default_url, cls, port in kinds:
            if self.given[field_name] and not s.private_servers:
                self.urls[kind] = getattr(s, field_name)
                self.origin[kind] = "given"
            elif not s.private_servers and port_answers("127.0.0.1", port):
                self.urls[kind] = default_url
                self.origin[kind] = f"already listening on port {port}"
            else:
                if kind == "postgres" and os.geteuid() == 0:
                    _make_traversable(root)
                chosen = port if not port_answers("127.0.0.1", port) else None
                server = cls(root / kind, port=chosen)
                server.die_with_parent = True
                self.servers.append(server)
                server.start()
                self.urls[kind] = server.url
                self.origin[kind] = f"private, data in {server.data_dir}, log {server.log_path}"
            log.info("server", extra={"server": kind, "url": self.urls[kind], "origin": self.origin[kind]})

    def create_database(self) -> None:
        """The catalogue's database, created if the server lacks it (a server on the default
        port, or one given, may not have it)."""
        import asyncpg

        url = self.urls["postgres"]
        try:
            if asyncio.run(create_database_if_missing(url)):
                log.info("database created", extra={"url": url})
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise ServerError(f"PostgreSQL at {url}: {exc}") from None

    def write_urls(self) -> None:
        """FANOUT_DATA_DIR/urls.env, for the other commands run in this folder."""
        path = Path(self.settings.data_dir) / "urls.env"
        write_urls_file(
            path,
            {
                "NATS_URL": self.urls["nats"],
                "REDIS_URL": self.urls["redis"],
                "DATABASE_URL": self.urls["postgres"],
            },
            pid=os.getpid(),
        )
        log.info("server URLs written for the other fanout commands", extra={"file": str(path.resolve())})

    def stop_servers(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    # --- children ---------------------------------------------------------------------------

    def choose_gateway_port(self) -> None:
        """FANOUT_GATEWAY_LISTEN with port 0: a free port chosen here, and the gateway started
        on it, so that the banner shows the port the gateway listens on (it exits with an
        error, logged, if the port was taken meanwhile)."""
        host, port = self.settings.gateway_listen
        self.gateway_listen = (host, port or free_port(host))

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        s = self.settings
        for f in fields(Settings):
            value = getattr(s, f.name)
            env[f.metadata["env"]] = str(value)
        env["NATS_URL"] = self.urls["nats"]
        env["REDIS_URL"] = self.urls["redis"]
        env["DATABASE_URL"] = self.urls["postgres"]
        env["FANOUT_LOG_FORMAT"] = self.log_format
        env["FANOUT_GATEWAY_LISTEN"] = format_host_port(*self.gateway_listen)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @staticmethod
    def available(command: str) -> bool:
        module = COMMANDS[command][0]
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    async def start_child(self, command: str, env: dict[str, str]) -> None:
        if not self.available(command):
            log.warning("command not available in this build yet; not started", extra={"command": command})
            return
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fanout", command,
            env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        self.children[command] = proc
        log.info("started", extra={"command": f"fanout {command}", "pid": proc.pid})
        asyncio.get_running_loop().create_task(self._forward(command, proc))

    async def _forward(self, command: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        out = sys.stderr.buffer
        while line := await proc.stdout.readline():
            out.write(line)
            out.flush()
        code = await proc.wait()
        if not self.stopping:
            level = logging.INFO if code == 0 else logging.ERROR
            log.log(level, "child exited", extra={"command": f"fanout {command}", "code": code})

    async def wait_for_stream(self, stop: asyncio.Event, within: float = 60.0) -> bool:
        """Wait until the ingestor has created the JetStream streams, one per feed (so no
        feed message is published before something captures it). False if they did not
        appear in time."""
        import nats
        from nats.js.errors import NotFoundError

        deadline = time.monotonic() + within
        nc = await nats.connect(servers=nats_servers(self.urls["nats"]), max_reconnect_attempts=-1)
        try:
            js = nc.jetstream()
            while time.monotonic() < deadline:
                with contextlib.suppress(NotFoundError):
                    for feed in FEED_NAMES:
                        await js.stream_info(js_stream_name(self.settings.js_stream, feed))
                    return True
                ingest = self.children.get("ingest")
                if ingest is None or ingest.returncode is not None:
                    return False
                if await wait_or_stop(stop, 0.2):  # polling another process's work: nothing to await
                    return False
            return False
        finally:
            await nc.close()

    async def stop_children(self) -> None:
        self.stopping = True
        grace = self.settings.grace
        for group in (STOP_ORDER[:1], STOP_ORDER[1:]):
            procs = [(c, self.children[c]) for c in group if c in self.children]
            for command, proc in procs:
                if proc.returncode is None:
                    log.info("stopping", extra={"command": f"fanout {command}", "pid": proc.pid})
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            for command, proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), grace)
                except TimeoutError:
                    log.warning("did not stop in time; killing", extra={"command": f"fanout {command}"})
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()

    def banner(self) -> str:
        s = self.settings
        keys = Keys(s.key_prefix)
        host, port = self.gateway_listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # every interface: this host's
        page = f"http://{format_host_port(host, port)}/"
        lines = [
            "",
            "feed-fanout is up. Ctrl-C stops everything.",
            f"  NATS        {self.urls['nats']}  ({self.origin['nats']})",
            f"  Redis       {self.urls['redis']}  ({self.origin['redis']})",
            f"  PostgreSQL  {self.urls['postgres']}  ({self.origin['postgres']})",
            "",
            f"  page        {page}",
            f"  live tail   curl -N {page}v1/stream",
            f"  Redis       redis-cli -u {self.urls['redis']} "
            f"XRANGE '{keys.stream('execution')}' - + COUNT 5",
            f"  PostgreSQL  psql '{self.urls['postgres']}' -c "
            f"'SELECT seq, symbol, price FROM {s.db_schema}.execution ORDER BY seq DESC LIMIT 5'",
            f"  inspect     fanout status; fanout audit   (in this folder: they read {s.data_dir}/urls.env)",
            "",
        ]
        return "\n".join(lines)

    async def main(self) -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        self.choose_gateway_port()
        env = self.child_env()
        try:
            for command in SERVICES[:-1]:
                await self.start_child(command, env)
            if "ingest" in self.children and not await self.wait_for_stream(stop):
                if not stop.is_set():
                    log.error("the ingestor did not create the JetStream stream; see its log above")
            if not stop.is_set():
                await self.start_child("feeds", env)
                print(self.banner(), flush=True)
                await stop.wait()
            log.info("stopping")
        finally:
            await self.stop_children()
        return 0


def _make_traversable(root: Path) -> None:
    """PostgreSQL runs as another user, who must be able to enter the data root."""
    root.mkdir(parents=True, exist_ok=True)
    mode = root.stat().st_mode
    if not mode & 0o001:
        root.chmod(mode | 0o011)
