"""Soak: the whole pipeline at a steady rate for a long time, measuring memory and lag.

    .venv/bin/python -m bench.soak                                  # 30 min, 2,000 msg/s, 500 clients
    .venv/bin/python -m bench.soak --duration 60 --rate 200 --clients 50    # a short validation run

Private servers on free ports (nats-server with JetStream, redis-server, PostgreSQL from
fanout/servers.py), then `fanout ingest`, two `fanout archive` and `fanout gateway` as
subprocesses. A lean publisher sends protobuf `execution` messages on core NATS at
--rate msg/s, each carrying its publish time in executionEpoch; the load client
(bench/loadclient.py, its own processes) holds --clients SSE subscriptions to the feed.

The run is cut into windows of --window seconds. Per window: every subscriber's
publish -> receipt lag (p50, p99, max), events lost or duplicated per subscriber, and the
archive lag (each row's archived_at - its ingest_time, p50/p99, from the catalogue). The
RSS of every process is read at the start (after a warm-up) and at the end; a process
whose RSS grew by more than --rss-bound MiB fails the run. At the end `fanout audit
--wait` must reconcile JetStream, Redis and Postgres (exit 0).

Writes bench/results/soak.md (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import BenchError, percentile_ms, poll, usage
from bench.loadclient import LoadClients
from bench.publishers import NatsPublisher, pace
from fanout.servers import PostgresServer
from shared.connections import redis_client
from shared.feeds import EXECUTION, js_stream_name
from shared.keys import Keys

MIB = 1024 * 1024
# Servers warm their caches (PostgreSQL's shared buffers, JetStream's store): their RSS is
# reported, the bound applies to our processes.
SERVERS = ("nats-server", "redis", "postgres")


async def archive_lag_ms(pg: Any, schema: str, lo: int, hi: int) -> tuple[float | None, float | None, int]:
    """p50/p99 of archived_at - ingest_time over the rows of seqs lo..hi, and their count."""
    row = await pg.fetchrow(
        f"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,"
        f" percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99, count(*) AS n FROM ("
        f" SELECT extract(epoch FROM archived_at - ingest_time) * 1000 AS lag"
        f' FROM "{schema}".execution WHERE seq BETWEEN $1 AND $2) l',
        lo,
        hi,
    )
    return row["p50"], row["p99"], int(row["n"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    tag = f"soak{os.getpid()}"
    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as another user and must reach its folder
    env = {
        "FANOUT_KEY_PREFIX": tag,
        "FANOUT_SUBJECT_PREFIX": f"{tag}.",
        "FANOUT_JS_STREAM": tag.upper(),
        "FANOUT_DB_SCHEMA": tag,
        "FANOUT_INGEST_HTTP": "127.0.0.1:0",
        "FANOUT_ARCHIVE_HTTP": "127.0.0.1:0",
        "FANOUT_LOG_LEVEL": "WARNING",
    }
    if args.retention:  # the hot window: how long Redis keeps archived entries and dedup keys
        env |= {
            "FANOUT_RETENTION": args.retention,
            "FANOUT_DEDUP_TTL": args.retention,
            "FANOUT_ARCHIVE_TRIM_INTERVAL": "5s",
        }
    windows: list[dict[str, Any]] = []
    memory: dict[str, tuple[int, int]] = {}
    async with AsyncExitStack() as stack:
        nats_url, nats_proc = stack.enter_context(harness.private_nats())
        redis_url, redis_proc = stack.enter_context(harness.private_redis())
        postgres = PostgresServer(root / "postgres", database="soak")
        await asyncio.to_thread(postgres.start)
        stack.callback(postgres.stop)
        env |= {"NATS_URL": nats_url, "REDIS_URL": redis_url, "DATABASE_URL": postgres.url}
        ingest = stack.enter_context(harness.fanout_service("ingest", env, log_path=f"{root}/ingest.log"))
        archivers = [
            stack.enter_context(
                harness.fanout_service(
                    "archive", env | {"FANOUT_ARCHIVE_CONSUMER": f"a{i}"}, log_path=f"{root}/archive{i}.log"
                )
            )
            for i in range(args.archivers)
        ]
        port = harness.free_port()
        gateway = stack.enter_context(
            harness.fanout_service(
                "gateway",
                env | {"FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{port}", "FANOUT_MAX_SUBSCRIBERS": "20000"},
                log_path=f"{root}/gateway.log",
                port=port,
            )
        )
        redis = redis_client(redis_url)
        stack.push_async_callback(redis.aclose)
        seq = harness.feed_seq(redis, Keys(tag).meta(EXECUTION.name))
        publisher = await stack.enter_async_context(NatsPublisher(nats_url, f"{tag}.{EXECUTION.name}"))
        js_stream = js_stream_name(tag.upper(), EXECUTION.name)
        await harness.carry_first_message(publisher, ingest, js_stream, seq, f"{root}/ingest.log", 60)
        pg = await asyncpg.connect(postgres.url)
        stack.push_async_callback(pg.close)

        print(f"connecting {args.clients} clients", flush=True)
        pool = LoadClients(
            f"http://127.0.0.1:{port}/v1/stream?feeds=execution", args.clients, args.client_procs
        )
        await stack.enter_async_context(pool)
        if pool.connected != args.clients:
            raise BenchError(f"only {pool.connected} of {args.clients} clients connected")
        procs = {
            "nats-server": nats_proc.pid,
            "redis": redis_proc.pid,
            "postgres": postgres.pid or 0,
            "ingest": ingest.pid,
            "gateway": gateway.pid,
        }
        procs |= {f"archive{i}": a.pid for i, a in enumerate(archivers)}
        procs |= {f"clients{i}": pid for i, pid in enumerate(pool.pids())}

        # Warm-up, then the memory baseline.
        base = await seq()
        await pool.window(base + 1, base + int(args.rate * 5))
        await pace(publisher.publish, args.rate, 5)
        await pool.wait_done(30)
        await pool.report()
        start_rss = {k: usage(p).rss_bytes for k, p in procs.items()}
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < args.duration:
            n += 1
            length = min(args.window, args.duration - (time.monotonic() - started))
            base = await seq()
            total = max(1, round(args.rate * length))
            await pool.window(base + 1, base + total)
            t0 = time.monotonic()
            await pace(publisher.publish, args.rate, length)
            drained = await pool.wait_done(args.drain)
            seconds = time.monotonic() - t0
            rep = await pool.report()

            async def archived(lo: int = base + 1, hi: int = base + total) -> bool:
                return (await archive_lag_ms(pg, tag, lo, hi))[2] >= hi - lo + 1

            try:
                await poll(archived, args.drain, f"window {n} to be archived")
            except BenchError:
                pass
            a50, a99, rows = await archive_lag_ms(pg, tag, base + 1, base + total)
            redis_info = await redis.info("memory")
            w = {
                "window": n,
                "at_s": round(time.monotonic() - started),
                "published": total,
                "rate": total / length,
                "delivered_per_s": rep["delivered"] / seconds,
                "expected": total * rep["connections"],
                "delivered": rep["delivered"],
                "lost": rep["lost"],
                "duplicated": rep["duplicated"],
                "missing": rep["missing"],
                "p50_ms": percentile_ms(rep["hist"], 0.5),
                "p99_ms": percentile_ms(rep["hist"], 0.99),
                "max_ms": percentile_ms(rep["hist"], 1.0),
                "archive_p50_ms": a50,
                "archive_p99_ms": a99,
                "archived": rows,
                "drained": drained,
                "redis_mib": int(redis_info["used_memory"]) / MIB,
                "stream_length": int(await redis.xlen(Keys(tag).stream(EXECUTION.name))),
                "redis_keys": int(await redis.dbsize()),
                "hist": rep["hist"],
            }
            windows.append(w)
            print(
                f"  window {n} at {w['at_s']} s: {w['delivered_per_s']:,.0f} ev/s to "
                f"{rep['connections']} clients, "
                f"lag p50 {_ms(w['p50_ms'])} p99 {_ms(w['p99_ms'])} ms, archive lag p50 {_ms(a50)} "
                f"p99 {_ms(a99)} ms, lost {w['lost']}, dup {w['duplicated']}, missing {w['missing']}, "
                f"Redis {w['redis_mib']:.0f} MiB ({w['stream_length']:,} entries, {w['redis_keys']:,} keys)",
                flush=True,
            )
        end_rss = {k: usage(p).rss_bytes for k, p in procs.items()}
        memory = {k: (start_rss[k], end_rss[k]) for k in procs}
        audit = await asyncio.to_thread(_audit, env)
    errors: list[str] = []
    for name in ("ingest", "gateway", *(f"archive{i}" for i in range(args.archivers))):
        errors += harness.log_errors(root / f"{name}.log")
    return {
        "windows": windows,
        "memory": memory,
        "audit": audit,
        "errors": errors,
        "args": vars(args),
        "load": os.getloadavg()[0],
        "logs": str(root),
    }


def _audit(env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "fanout", "audit", "--wait", "120s"],
        env={**os.environ, **env},
        cwd=harness.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, done.stdout + done.stderr


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:,.0f}")


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    ws = result["windows"]
    hist = harness.merge_histograms([w["hist"] for w in ws])
    lines = [
        f"# Soak: {a['duration']:g} s at {a['rate']:g} msg/s, {a['clients']} SSE subscribers",
        "",
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, `python -m bench.soak "
        f"--duration {a['duration']:g} --rate {a['rate']:g} --clients {a['clients']}"
        f"{' --retention ' + a['retention'] if a['retention'] else ''} --window {a['window']:g}`, "
        f"{os.cpu_count()} cores "
        f"shared by everything (load average at the end {result['load']:.2f}).",
        "",
        "## Whole run",
        "",
        "| measure | value |",
        "|---|---|",
        f"| messages published | {sum(w['published'] for w in ws):,} |",
        f"| events delivered / expected | {sum(w['delivered'] for w in ws):,} / "
        f"{sum(w['expected'] for w in ws):,} |",
        f"| lost / duplicated / missing at end | {sum(w['lost'] for w in ws)} / "
        f"{sum(w['duplicated'] for w in ws)} / {sum(w['missing'] for w in ws)} |",
        f"| subscriber lag p50 / p99 / max (ms) | {_ms(percentile_ms(hist, 0.5))} / "
        f"{_ms(percentile_ms(hist, 0.99))} / {_ms(percentile_ms(hist, 1.0))} |",
        f"| archive lag p50 / p99 (ms, worst window) | {_ms(max((w['archive_p50_ms'] or 0) for w in ws))} / "
        f"{_ms(max((w['archive_p99_ms'] or 0) for w in ws))} |",
        f"| `fanout audit --wait 120s` exit code | {result['audit'][0]} |",
        "",
        f"## Memory (RSS of each process tree, MiB; bound: growth under {a['rss_bound']:g} MiB per process "
        "of ours; the servers' caches warm up)",
        "",
        "| process | start | end | growth | within bound |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (start, end) in result["memory"].items():
        growth = (end - start) / MIB
        lines.append(
            f"| {name} | {start / MIB:.1f} | {end / MIB:.1f} | {growth:+.1f} | "
            f"{'(server)' if name in SERVERS else 'yes' if growth < a['rss_bound'] else 'NO'} |"
        )
    lines += [
        "",
        "## Per window",
        "",
        "| window | at s | msg/s | delivered ev/s | lag p50 / p99 / max ms | archive lag p50 / p99 ms "
        "| lost | dup | missing | Redis MiB | stream entries | Redis keys |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in ws:
        lines.append(
            f"| {w['window']} | {w['at_s']} | {w['rate']:,.0f} | {w['delivered_per_s']:,.0f} | "
            f"{_ms(w['p50_ms'])} / {_ms(w['p99_ms'])} / {_ms(w['max_ms'])} | {_ms(w['archive_p50_ms'])} / "
            f"{_ms(w['archive_p99_ms'])} | {w['lost']} | {w['duplicated']} | {w['missing']} | "
            f"{w['redis_mib']:.1f} | {w['stream_length']:,} | {w['redis_keys']:,} |"
        )
    lines += [
        "",
        "Subscriber lag = the client's socket read - executionEpoch (publish time, same clock). "
        "Archive lag = "
        "archived_at - ingest_time of each catalogue row (archived_at is its transaction's start). Missing = "
        f"not received {a['drain']:g} s after the window's publishing ended.",
    ]
    if result["audit"][0] != 0:
        lines += ["", "`fanout audit` said:", "```", result["audit"][1].strip()[-3000:], "```"]
    lines += [f"- {e}" for e in result["errors"]]
    lines += [f"- logs kept in {result['logs']}"]
    return "\n".join(lines) + "\n"


def failures(result: dict[str, Any]) -> list[str]:
    a = result["args"]
    out = []
    ws = result["windows"]
    if any(w["lost"] or w["duplicated"] or w["missing"] for w in ws):
        out.append("events lost, duplicated or missing")
    grown = [
        k for k, (s, e) in result["memory"].items() if k not in SERVERS and (e - s) / MIB >= a["rss_bound"]
    ]
    if grown:
        out.append(f"RSS grew past the bound: {', '.join(grown)}")
    if result["audit"][0] != 0:
        out.append(f"fanout audit exited {result['audit'][0]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=1800, help="seconds of steady load (default 1800)")
    p.add_argument("--rate", type=float, default=2000, help="messages per second (default 2000)")
    p.add_argument("--clients", type=int, default=500, help="SSE subscribers (default 500)")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--archivers", type=int, default=2)
    p.add_argument("--window", type=float, default=60, help="seconds per measurement window (default 60)")
    p.add_argument("--drain", type=float, default=30, help="seconds to wait for stragglers per window")
    p.add_argument("--rss-bound", type=float, default=64, help="MiB of RSS growth allowed per process")
    p.add_argument(
        "--retention",
        default="",
        help="hot window for the run (FANOUT_RETENTION and FANOUT_DEDUP_TTL, e.g. 2m): Redis memory "
        "should level off once the run is longer than it (default: the services' defaults)",
    )
    p.add_argument("--out", default=str(harness.BENCH_DIR / "results" / "soak.md"))
    args = p.parse_args(argv)
    result = harness.run_and_report("soak", lambda: run(args), markdown, args.out)
    if result is None:
        return 1
    bad = failures(result)
    for b in bad:
        print(f"bench.soak: FAIL: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
