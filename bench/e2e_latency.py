"""End-to-end latency: publish on NATS -> JetStream -> `fanout ingest` -> Redis ->
`fanout gateway` -> 1,000 SSE clients.

    .venv/bin/python -m bench.e2e_latency                  # 1,000 clients at 50 msg/s, 20 s
    .venv/bin/python -m bench.e2e_latency --rates 50,100 --duration 15

Everything runs privately: a nats-server with JetStream and a redis-server on free ports,
`fanout ingest` and `fanout gateway` as subprocesses with their own key prefix, subject
prefix and JetStream stream. The publisher sends protobuf `execution` messages on the
feed's subject (core NATS publish, as the upstream feeds do), each with executionEpoch =
its publish time in ns; the load client (bench/loadclient.py) subscribes to
/v1/stream?feeds=execution and measures publish -> receipt for every event, and counts
per client every seq lost or duplicated.

Writes bench/results/e2e_latency.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import BenchError, percentile_ms, usage
from bench.loadclient import LoadClients
from bench.publishers import NatsPublisher, pace
from shared.codec import parse_iso
from shared.connections import redis_client
from shared.feeds import EXECUTION, js_stream_name
from shared.keys import Keys

TARGET_P99_MS = 100.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = f"e2e{os.getpid()}"
    env = {
        "FANOUT_KEY_PREFIX": tag,
        "FANOUT_SUBJECT_PREFIX": f"{tag}.",
        "FANOUT_JS_STREAM": tag.upper(),
        "FANOUT_JS_CONSUMER": "ingestor",
        "FANOUT_INGEST_HTTP": "127.0.0.1:0",
        "FANOUT_LOG_LEVEL": "WARNING",
    }
    log_dir = tempfile.mkdtemp(prefix="bench-e2e-")  # kept: the services' logs, for a look
    rows: list[dict[str, Any]] = []
    async with AsyncExitStack() as stack:
        nats_url, nats_proc = stack.enter_context(harness.private_nats())
        redis_url, redis_proc = stack.enter_context(harness.private_redis())
        env |= {"NATS_URL": nats_url, "REDIS_URL": redis_url}
        ingest = stack.enter_context(harness.fanout_service("ingest", env, log_path=f"{log_dir}/ingest.log"))
        port = harness.free_port()
        if args.fanout == "lean":  # the reference fan-out (bench/lean_fanout.py) in the gateway's place
            gateway = stack.enter_context(
                harness.python_module(
                    "bench.lean_fanout",
                    ["--redis-url", redis_url, "--prefix", tag, "--port", str(port)],
                    port,
                )
            )
        else:
            gateway = stack.enter_context(
                harness.fanout_service(
                    "gateway",
                    env | {"FANOUT_GATEWAY_LISTEN": f"127.0.0.1:{port}", "FANOUT_MAX_SUBSCRIBERS": "20000"},
                    log_path=f"{log_dir}/gateway.log",
                    port=port,
                )
            )
        redis = redis_client(redis_url)
        stack.push_async_callback(redis.aclose)
        seq = harness.feed_seq(redis, Keys(tag).meta(EXECUTION.name))
        publisher = await stack.enter_async_context(NatsPublisher(nats_url, f"{tag}.{EXECUTION.name}"))
        js_stream = js_stream_name(tag.upper(), EXECUTION.name)
        await harness.carry_first_message(publisher, ingest, js_stream, seq, f"{log_dir}/ingest.log", 30)

        print(f"connecting {args.clients} clients", flush=True)
        pool = LoadClients(
            f"http://127.0.0.1:{port}/v1/stream?feeds=execution", args.clients, args.client_procs
        )
        await stack.enter_async_context(pool)
        if pool.connected != args.clients:
            raise BenchError(f"only {pool.connected} of {args.clients} clients connected")
        procs = {
            "nats-server": nats_proc.pid,
            "ingest": ingest.pid,
            "redis": redis_proc.pid,
            args.fanout: gateway.pid,
        }
        for label, rate, duration in [("warm-up", 20.0, 2.0)] + [
            (f"{args.clients} clients @ {r:g}/s", r, args.duration) for r in map(float, args.rates.split(","))
        ]:
            base = await seq()
            total = max(1, round(rate * duration))
            await pool.window(base + 1, base + total)
            before = {k: usage(p) for k, p in procs.items()}
            busy0 = harness.machine_busy_s()
            started = time.monotonic()
            await pace(publisher.publish, rate, duration)
            drained = await pool.wait_done(args.drain)
            seconds = time.monotonic() - started
            after = {k: usage(p) for k, p in procs.items()}
            busy = harness.machine_busy_s() - busy0
            rep = await pool.report()
            to_redis = await _to_redis_ms(redis, Keys(tag).stream(EXECUTION.name), total)
            if label == "warm-up":
                continue
            row = {
                "scenario": label,
                "expected": total * rep["connections"],
                "delivered": rep["delivered"],
                "delivered_per_s": rep["delivered"] / seconds,
                "lost": rep["lost"],
                "duplicated": rep["duplicated"],
                "missing": rep["missing"],
                "closed": rep["closed"],
                "p50_ms": percentile_ms(rep["hist"], 0.50),
                "p99_ms": percentile_ms(rep["hist"], 0.99),
                "max_ms": percentile_ms(rep["hist"], 1.0),
                "to_redis_p50_ms": to_redis[0],
                "to_redis_p99_ms": to_redis[1],
                "cpu_pct": {k: after[k].cpu_percent_since(before[k]) for k in procs}
                | {"clients": 100 * rep["cpu_s"] / seconds},
                "other_cpu_pct": max(
                    0.0,
                    100 * (busy - sum(after[k].cpu_since(before[k]) for k in procs) - rep["cpu_s"]) / seconds,
                ),
                "drained": drained,
            }
            rows.append(row)
            print(
                f"  {label}: {row['delivered_per_s']:,.0f} ev/s, p50 {_ms(row['p50_ms'])} ms, "
                f"p99 {_ms(row['p99_ms'])} ms (to Redis: p50 {_ms(row['to_redis_p50_ms'])}, "
                f"p99 {_ms(row['to_redis_p99_ms'])}), lost {row['lost']}, dup {row['duplicated']}, "
                f"missing {row['missing']}, CPU % "
                + ", ".join(f"{k} {v:.0f}" for k, v in row["cpu_pct"].items())
                + f"; other {row['other_cpu_pct']:.0f}",
                flush=True,
            )
    errors = []
    for name in ("ingest", "gateway"):
        errors += await asyncio.to_thread(harness.log_errors, Path(log_dir, f"{name}.log"))
    return {"rows": rows, "errors": errors, "args": vars(args), "load": os.getloadavg()[0]}


async def _to_redis_ms(redis: Any, stream: str, count: int) -> tuple[float | None, float | None]:
    """p50/p99 of ingest_time - publish time over the last `count` stream entries: the part
    of the latency spent before the gateway (ingest_time has ms precision)."""
    entries = await redis.xrevrange(stream, count=count)
    lags = sorted(
        parse_iso(f[b"ingest_time"].decode()).timestamp() * 1000 - int(f[b"executionEpoch"]) / 1e6
        for _, f in entries
    )
    if not lags:
        return None, None
    return lags[len(lags) // 2], lags[min(len(lags) - 1, int(len(lags) * 0.99))]


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:,.0f}")


def markdown(result: dict[str, Any]) -> str:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    fanout = result["args"]["fanout"]
    lines = [
        f"# End to end: NATS publish -> JetStream -> ingestor -> Redis -> {fanout} -> SSE clients",
        "",
        f"Run {started}, `python -m bench.e2e_latency{' --fanout lean' if fanout == 'lean' else ''}`, "
        f"{os.cpu_count()} cores shared by everything "
        f"(load average at the end {result['load']:.2f}).",
        "",
        "| scenario | delivered ev/s | expected events | p50 ms | p99 ms | max ms | to Redis p50 / p99 ms "
        f"| lost | dup | missing at end | CPU % (nats, ingest, redis, {fanout}, clients; other) "
        "| p99 < 100 ms, nothing lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        ok = r["p99_ms"] is not None and r["p99_ms"] < TARGET_P99_MS and not (r["lost"] or r["missing"])
        cpu = ", ".join(f"{v:.0f}" for v in r["cpu_pct"].values()) + f"; {r['other_cpu_pct']:.0f}"
        lines.append(
            f"| {r['scenario']} | {r['delivered_per_s']:,.0f} | {r['expected']:,} | {_ms(r['p50_ms'])} | "
            f"{_ms(r['p99_ms'])} | {_ms(r['max_ms'])} | {_ms(r['to_redis_p50_ms'])} / "
            f"{_ms(r['to_redis_p99_ms'])} | {r['lost']} | {r['duplicated']} | {r['missing']} | "
            f"{cpu} | {'yes' if ok and not r['duplicated'] else 'NO'} |"
        )
    lines += [
        "",
        "Latency = the client's socket read - executionEpoch (the publish time, ns, same clock); "
        "to Redis = the entry's ingest_time - executionEpoch (ms precision): the part before the gateway. "
        "Other CPU = the machine's busy time (/proc/stat) less the processes listed: other work on the "
        "shared machine. "
        "Lost = a seq skipped in a client's stream; missing at end = not received "
        f"{result['args']['drain']:g} s after publishing ended. CPU: 100% = one core.",
    ]
    lines += [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rates", default="50", help="msg/s, comma-separated (default 50)")
    p.add_argument("--duration", type=float, default=20, help="seconds of publishing per rate")
    p.add_argument("--drain", type=float, default=5, help="seconds after publishing to wait for stragglers")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument(
        "--fanout",
        choices=("gateway", "lean"),
        default="gateway",
        help="what serves the clients: `fanout gateway`, or bench/lean_fanout.py (a reference)",
    )
    p.add_argument("--out", default=str(harness.BENCH_DIR / "results" / "e2e_latency.md"))
    args = p.parse_args(argv)
    result = harness.run_and_report("e2e_latency", lambda: run(args), markdown, args.out)
    if result is None:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
