"""Sampling profiles of a Python server under load, with py-spy (not a dependency of the
project: `.venv/bin/pip install py-spy`).

    .venv/bin/python -m bench.sse_fanout --servers gateway --profile /tmp/prof
    .venv/bin/python -m bench.profile /tmp/prof/<scenario>.txt      # summarize a profile again

A profile is py-spy's raw (collapsed stack) output; `summary()` turns it into the
functions that take the most time, by their own samples (self) and with what they call
(inclusive), and the idle share (the event loop waiting in epoll).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.harness import REPO

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    local = REPO / ".venv" / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float | None, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    """Start sampling `pid` and its child processes (a gateway's workers) for `seconds`
    (None: until stop()) into `out` (raw format); None without py-spy."""
    binary = py_spy()
    if binary is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    duration = [] if seconds is None else ["-d", str(max(1, int(seconds)))]
    return subprocess.Popen(
        [binary, "record", "-p", str(pid), *duration, "-r", str(rate), "--nonblocking",
         "--subprocesses", "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop(sampler: subprocess.Popen[bytes]) -> None:
    """End a sampling early: py-spy writes its profile when interrupted."""
    sampler.send_signal(signal.SIGINT)
    sampler.wait()


def write_summary(raw: Path, title: str) -> Path | None:
    """The summary of the profile `raw`, under `title`, beside it (RAW.md); None if py-spy
    wrote no profile."""
    if not raw.exists():
        return None
    out = raw.with_suffix(".md")
    out.write_text(f"# {title}\n\n{summary(raw)}")
    return out


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summary(raw: Path, top: int = 15) -> str:
    """The top functions by self and inclusive samples, as a markdown table."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "(no samples)\n"
    lines = [f"{total} samples", "", "| self % | function |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | {f} |" for f, n in own.most_common(top)]
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | {f} |" for f, n in incl.most_common(top + 10)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m bench.profile RAW_PROFILE [TOP]", file=sys.stderr)
        return 2
    print(summary(Path(args[0]), int(args[1]) if len(args) > 1 else 15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
