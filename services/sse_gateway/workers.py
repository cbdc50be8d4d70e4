"""Several gateway worker processes on one port (`fanout gateway --workers N`).

The supervisor (the process the user started) reserves the port (binds it with
SO_REUSEPORT, without listening: a taken port is one clear error before any worker
starts, and port 0 becomes a real one) and opens one listening SO_REUSEPORT socket per
worker on it, so that connections made while it starts wait in their backlogs instead of
being refused. Then it imports the gateway (`server.py`) once and forks N workers from
there, each serving the same settings on its own socket (a fork takes milliseconds where
a fresh interpreter takes about a second to import the gateway: that second is added to
every restart and to every dead worker's replacement, while clients wait). A worker's
socket is its own: it closes when the worker dies, and its replacement gets a new one.
The kernel spreads new connections evenly over the workers
(by a hash of the connection's addresses; one socket shared by all would hand a burst
of connections to whichever worker accepts first). Each worker is a whole gateway: its
own per-feed readers, hub, history clients and subscribers; nothing of a stream is
shared between workers (a stream's cursor says everything needed to resume it anywhere).

- A worker that dies (any exit while the supervisor is not stopping) is replaced; its
  clients see their connections end, reconnect with their last id and resume, on the
  other workers or its replacement, with no gap and no duplicate. A worker that keeps
  dying at start is restarted with backoff (up to 30 s apart) and logged each time.
- SIGTERM (or SIGINT) to the supervisor goes to every worker: each ends its streams and
  exits within FANOUT_SHUTDOWN_GRACE; the supervisor exits 0 once all have (a worker
  still running 10 s past the grace is killed, and the exit is 1).
- The workers die with the supervisor (PR_SET_PDEATHSIG), so a supervisor killed with
  SIGKILL leaves no worker behind holding the port.
- Metrics: the workers run prometheus-client in multiprocess mode with a private
  directory (PROMETHEUS_MULTIPROC_DIR, made and removed by the supervisor), so /metrics
  on any worker (and the ops port) adds the counters of every worker, live or dead,
  and the subscriber gauge sums the live workers.
- The subscriber limit (FANOUT_MAX_SUBSCRIBERS) is shared by all workers: each worker
  writes its own count in one slot of a small shared file (`SubscriberCounts`), and a
  new stream is refused when the slots add up to the limit. A dead worker's slot is
  cleared by the supervisor. (Two workers admitting at the same instant can each pass
  at limit - 1: the bound is exact to within the number of workers.)
- Tickets and tokens live in Redis already: any worker honours any worker's ticket.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import mmap
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from services.sse_gateway.settings import GatewaySettings
from shared.listening import bound_socket

log = logging.getLogger(__name__)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode

COUNTS_FILE = "subscribers"
STOP_MARGIN = 10.0  # seconds past the shutdown grace before a worker is killed
LISTEN_RETRY = 1.0  # seconds before a replacement whose socket could not be opened is tried again
_SLOT = 8  # bytes per slot: one signed 64-bit count
_PR_SET_PDEATHSIG = 1
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def cannot_listen(address: tuple[str, int], exc: OSError) -> int:
    """The one line (and exit code 1) for a gateway port that cannot be bound."""
    host, port = address
    log.error("gateway cannot listen", extra={"host": host, "port": port, "error": str(exc)})
    return 1


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class SubscriberCounts:
    """One count per worker in a shared file, mapped by every worker: each writes its own
    slot, any reads the total."""

    def __init__(self, path: Path, slots: int, slot: int | None = None) -> None:
        self.slot = slot
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), slots * _SLOT)
        self._view = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, path: Path, slots: int) -> SubscriberCounts:
        path.write_bytes(bytes(slots * _SLOT))
        return cls(path, slots)

    def set(self, count: int) -> None:
        """This worker's count."""
        assert self.slot is not None
        self._view[self.slot] = count

    def clear(self, slot: int) -> None:
        self._view[slot] = 0

    def total(self) -> int:
        return sum(self._view)

    def close(self) -> None:
        self._view.release()
        self._map.close()


@dataclasses.dataclass(frozen=True)
class Group:
    """What a worker knows of its group: its slot, and the shared subscriber counts."""

    slot: int
    counts: SubscriberCounts


class _Worker:
    """A forked worker process, as the supervisor sees it (subprocess.Popen's terms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Supervisor:
    def __init__(self, settings: GatewaySettings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.workers: dict[int, _Worker] = {}
        self.started_at: dict[int, float] = {}
        self.due: dict[int, float] = {}  # slot -> monotonic time a replacement is due
        self.failures: dict[int, int] = {}
        self.listeners: dict[int, socket.socket] = {}  # slot -> its listening socket, until it is forked
        self.stopping = False
        self.exit_code = 0

    def run(self) -> int:
        s = self.settings
        try:
            sock = bound_socket(*s.gateway_listen, listen=False, reuse_port=True)
        except OSError as exc:
            return cannot_listen(s.gateway_listen, exc)
        port = sock.getsockname()[1]
        self.worker_settings = dataclasses.replace(s, workers=1, gateway_listen=(s.gateway_listen[0], port))
        try:
            # Every worker's socket listens before the gateway is imported (about half a
            # second): a crowd coming back to a restarted gateway waits in the backlogs
            # meanwhile instead of being refused.
            for slot in range(self.count):
                self.listeners[slot] = self._listener()
        except OSError as exc:
            for listener in self.listeners.values():
                listener.close()
            sock.close()
            return cannot_listen(s.gateway_listen, exc)
        shared = tempfile.mkdtemp(prefix="fanout-gateway-")
        self.metrics_dir = str(Path(shared, "metrics"))
        os.mkdir(self.metrics_dir)
        counts = SubscriberCounts.create(Path(shared, COUNTS_FILE), self.count)
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            # Before the gateway is imported: prometheus-client picks its mode at import.
            os.environ[MULTIPROC_DIR] = self.metrics_dir
            from services.sse_gateway import server

            self.serve = server.serve
            self.reserved = sock
            self.pid = os.getpid()
            self.counts = counts
            gc.freeze()  # what the workers inherit: not traversed (nor copied on write) by their collector
            for slot in range(self.count):
                self._start(slot)
            log.info(
                "gateway workers started",
                extra={
                    "workers": self.count,
                    "pids": ",".join(str(p.pid) for p in self.workers.values()),
                    "url": f"{s.listen_url(port)}/v1/stream",
                },
            )
            self._loop()
        finally:
            for proc in self.workers.values():  # only after an unexpected error here
                with contextlib.suppress(OSError):
                    proc.kill()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            counts.close()
            for listener in self.listeners.values():
                listener.close()
            sock.close()
            shutil.rmtree(shared, ignore_errors=True)
        log.info("gateway stopped", extra={"workers": self.count, "exit_code": self.exit_code})
        return self.exit_code

    def _listener(self) -> socket.socket:
        """A listening socket on the port, beside the others (SO_REUSEPORT)."""
        host, port = self.worker_settings.gateway_listen
        return bound_socket(host, port, reuse_port=True)

    def _start(self, slot: int) -> bool:
        """Fork the worker of `slot`; False (and tried again later) when its replacement
        socket cannot be opened."""
        if slot not in self.listeners:  # a replacement: its predecessor's socket went with it
            try:
                self.listeners[slot] = self._listener()
            except OSError as exc:  # out of descriptors, say: the other workers serve meanwhile
                log.error(
                    "gateway worker cannot listen; trying again",
                    extra={"slot": slot, "error": str(exc), "after_s": LISTEN_RETRY},
                )
                self.due[slot] = time.monotonic() + LISTEN_RETRY
                return False
        pid = os.fork()
        if pid == 0:  # the worker: it never returns from here
            code = 1
            try:
                code = self._work(slot)
            except BaseException:
                log.exception("gateway worker failed", extra={"slot": slot})
            finally:
                for stream in (sys.stdout, sys.stderr):  # os._exit flushes nothing
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        # The worker's socket is the worker's alone: a dead worker's socket closes with it,
        # and the kernel then sends new connections to the others.
        self.listeners.pop(slot).close()
        self.workers[slot] = _Worker(pid)
        self.started_at[slot] = time.monotonic()
        self.due.pop(slot, None)
        return True

    def _work(self, slot: int) -> int:
        """In the forked worker: unblock the signals the supervisor waits for, die with the
        supervisor, and serve."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.pid:  # the supervisor died before the line above: so do we
            return 1
        self.reserved.close()
        mine = self.listeners.pop(slot)
        for other in self.listeners.values():  # the sockets of workers not forked yet
            other.close()
        self.counts.slot = slot  # the supervisor's mapping, shared with every worker since the fork
        return int(self.serve(self.worker_settings, mine, Group(slot, self.counts)))

    def _loop(self) -> None:
        deadline: float | None = None
        while self.workers or (self.due and not self.stopping):
            now = time.monotonic()
            waits = [t - now for t in self.due.values()]
            if deadline is not None:
                waits.append(deadline - now)
            timeout = max(0.0, min(waits)) if waits else None
            info = (
                signal.sigtimedwait(_SIGNALS, timeout)
                if timeout is not None
                else signal.sigwaitinfo(_SIGNALS)
            )
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.stopping = True
                self.due.clear()
                deadline = time.monotonic() + self.settings.shutdown_grace + STOP_MARGIN
                log.info("gateway stopping: every worker drains", extra={"workers": len(self.workers)})
                for proc in self.workers.values():
                    with contextlib.suppress(OSError):
                        proc.send_signal(signal.SIGTERM)
            self._reap()
            if deadline is not None and time.monotonic() >= deadline and self.workers:
                for slot, proc in self.workers.items():
                    log.error(
                        "gateway worker did not stop in time; killed", extra={"slot": slot, "pid": proc.pid}
                    )
                    with contextlib.suppress(OSError):
                        proc.kill()
                    proc.wait()
                    self._gone(slot, proc)
                self.workers.clear()
                self.exit_code = 1
            if not self.stopping:
                for slot, when in list(self.due.items()):
                    if when <= time.monotonic() and self._start(slot):
                        log.info(
                            "gateway worker started again",
                            extra={"slot": slot, "pid": self.workers[slot].pid},
                        )

    def _reap(self) -> None:
        for slot, proc in list(self.workers.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.workers[slot]
            self._gone(slot, proc)
            if self.stopping:
                # -SIGTERM is a clean stop too: uvicorn re-raises the signal it caught once
                # its graceful shutdown is done, so a drained worker may die of the SIGTERM
                # this supervisor sent it.
                if code not in (0, -signal.SIGTERM):
                    log.error("gateway worker exited with an error", extra={"slot": slot, "code": code})
                    self.exit_code = 1
                continue
            lived = time.monotonic() - self.started_at[slot]
            self.failures[slot] = self.failures.get(slot, 0) + 1 if lived < 5 else 0
            delay = min(30.0, 0.5 * 2 ** self.failures[slot]) if self.failures[slot] else 0.0
            self.due[slot] = time.monotonic() + delay
            log.error(
                "gateway worker died; replacing it (its clients resume on the others)",
                extra={
                    "slot": slot,
                    "pid": proc.pid,
                    "code": code,
                    "lived_s": round(lived, 1),
                    "after_s": delay,
                },
            )

    def _gone(self, slot: int, proc: _Worker) -> None:
        """A worker's leftovers: its subscriber count, its live gauges."""
        self.counts.clear(slot)
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]


def supervise(settings: GatewaySettings, count: int) -> int:
    return Supervisor(settings, count).run()
