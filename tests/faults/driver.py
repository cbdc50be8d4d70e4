"""One fault-suite run: the pipeline under load with subscribers connected throughout,
faults injected one at a time (then at random), each followed by its recovery, then the
final drain and the judgement against the independent record (harness.py).

A test gives `Setup` (rates, subscribers, settings) and its faults: each an async function
of the `Run` that injects the fault, heals it and returns a note. While a fault lasts, one
"wanderer" subscriber is away, and comes back (with its last id) only after the Redis hot
window has moved past it, so that it catches up from rows the archiver wrote meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.harness import (
    ROOT,
    FaultRecord,
    HarnessError,
    Pipeline,
    Probe,
    Publisher,
    Subscriber,
    caught_up,
    judge_stores,
    judge_subscriber,
    live_latency,
    make_subscribers,
    read_truth,
    redis_first,
    render,
    stream_epochs,
    until,
)

RESULTS = Path(__file__).with_name("results")


@dataclass
class Setup:
    name: str  # the report's file: results/<name>.md
    mode: str  # short or soak
    rate: float  # messages per second per feed
    subscribers: int = 8
    slow: int = 1
    reconnecting: int = 2
    wanderers: int = 1
    replica: bool = False
    env: dict[str, str] = field(default_factory=dict)
    away_after_heal: float = 0.0  # a wanderer stays away this long after the fault heals (0: none)
    recovery_timeout: float = 90.0
    random_faults: int = 0  # after each fault once: this many at random...
    random_seconds: float = 0.0  # ...or at random for this long
    pairs: bool = False  # at random, sometimes two faults at once
    seed: int = 6


Fault = Callable[["Run"], Awaitable[str]]


@dataclass
class Run:
    setup: Setup
    p: Pipeline
    subs: list[Subscriber]
    pub: Publisher
    probe: Probe
    rng: random.Random
    epochs: dict[str, str] = field(default_factory=dict)
    records: list[FaultRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # a scenario that did not test what it claims

    async def inject(self, name: str, fault: Fault) -> None:
        wanderers = [s for s in self.subs if s.wanders]
        wanderer = wanderers[len(self.records) % len(wanderers)] if wanderers else None
        if wanderer is not None and self.setup.away_after_heal:
            wanderer.away()
        t0 = time.time()
        try:
            note = await fault(self)
        except Exception as exc:
            raise HarnessError(f"injecting `{name}` failed: {exc}\n{self.p.log_tails(15)}") from exc
        record = FaultRecord(name, t0, time.time(), note=note)
        self.records.append(record)
        back: asyncio.Task[int] | None = None
        if wanderer is not None and self.setup.away_after_heal:
            back = asyncio.create_task(self._come_back(wanderer, self.setup.away_after_heal))
        try:
            record.recovery = await caught_up(self.probe, self.subs, self.epochs, self.setup.recovery_timeout)
            if back is not None:
                record.from_postgres = await back
                await caught_up(self.probe, self.subs, self.epochs, self.setup.recovery_timeout)
        except HarnessError as exc:
            record.note += f" did not recover: {exc}"
            dead = self.p.dead_services()
            raise HarnessError(
                f"after `{name}` ({note}): {exc}\ndead services: {dead}\n{self.p.log_tails(25)}"
            ) from None
        finally:
            if back is not None and not back.done():
                back.cancel()
            if wanderer is not None:
                wanderer.back()
        end = record.healed_at + (record.recovery or 0.0)
        record.latency = live_latency(self.subs, self.pub, record.injected_at, end)

    def reconnect_now(self) -> None:
        """The reconnecting subscribers drop their connections and resume with their last
        id at once (e.g. with a cursor ahead of what a refilling Redis holds)."""
        for s in self.subs:
            if s.reconnect_every:
                s.reconnect()

    async def _come_back(self, s: Subscriber, after: float) -> int:
        """Bring a wanderer back `after` s; 1 if Redis's first entry is then beyond its
        position in a feed (so its catch-up must come from PostgreSQL), else 0."""
        await asyncio.sleep(after)  # how long it is away is the scenario, not a synchronisation
        below = 0
        for feed in s.feeds:
            with contextlib.suppress(Exception):
                first = await asyncio.to_thread(redis_first, self.p.redis, feed)
                if first is not None and first > s.last_seq(feed) + 1:
                    below = 1
        s.back()
        return below


def together(faults: list[Fault]) -> Fault:
    """Several faults at once (e.g. the ingestor killed while Redis hangs)."""
    if len(faults) == 1:
        return faults[0]

    async def all_of(r: Run) -> str:
        return " ".join(await asyncio.gather(*(f(r) for f in faults)))

    return all_of


def _audit(p: Pipeline) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fanout", "audit", "--wait", "60s"],
        env=p.env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )


async def run(
    setup: Setup, faults: dict[str, Fault], *, check: Callable[[Run], list[str]] | None = None
) -> None:
    """The whole run; fails with the report (and keeps the data folder) if anything is off."""
    only = [x.strip() for x in os.environ.get("FANOUT_FAULTS_ONLY", "").split(",") if x.strip()]
    if only:
        # e.g. FANOUT_FAULTS_ONLY="failover" to chase one failure; `a+b` injects two at once.
        every = faults
        faults = {}
        for item in only:
            parts = [x.strip() for x in item.split("+")]
            unknown = [x for x in parts if x not in every]
            assert not unknown, f"FANOUT_FAULTS_ONLY: unknown faults {unknown}; known: {list(every)}"
            faults[" + ".join(parts)] = together([every[x] for x in parts])
    rng = random.Random(int(os.environ.get("FANOUT_FAULTS_SEED", str(setup.seed))))
    root = Path(tempfile.mkdtemp(prefix=f"fanout-{setup.name}-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as another user and must reach its data folder
    p = Pipeline(root, replica=setup.replica, env_extra=setup.env)
    subs = make_subscribers(setup.subscribers, setup.slow, setup.reconnecting)
    choices = [("execution", "sport_event"), ("execution",), ("sport_event",)]
    subs += [Subscriber(f"w{i:02d}", choices[i % 3], wanders=True) for i in range(setup.wanderers)]
    pub = Publisher(p.nats.url, setup.rate, seed=setup.seed)
    r = Run(setup, p, subs, pub, Probe(p), rng)
    stop_subs, stop_pub = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    publishing: asyncio.Task[None] | None = None
    started = time.monotonic()
    ok = reported = False
    out = RESULTS / f"{setup.name}_{setup.mode}.md"
    try:
        await p.start_servers()
        await p.start_services()
        try:
            r.epochs = await stream_epochs(p.nats.url)
        except Exception as exc:  # noqa: BLE001 - any answer but the streams: say what is missing
            raise HarnessError(
                f"the ingestor did not create the per-feed JetStream streams (contract v2 §1): {exc}"
            ) from None
        tasks = [asyncio.create_task(s.run(p.gateway_url, stop_subs)) for s in subs]

        async def all_connected() -> bool:
            return all(s.connects for s in subs)

        await until("every subscriber connected", all_connected, 60)
        publishing = asyncio.create_task(pub.run(stop_pub))
        await until("the first messages published",
                    lambda: asyncio.sleep(0, result=pub.count() > setup.rate), 30)
        await caught_up(r.probe, subs, r.epochs, 60)

        for name, fault in faults.items():  # each once
            await r.inject(name, fault)
        deadline = time.monotonic() + setup.random_seconds
        n = 0
        while n < setup.random_faults or time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(1.0, 4.0))  # a random quiet spell between faults
            if setup.pairs and len(faults) > 1 and rng.random() < 0.3:
                a, b = rng.sample(list(faults), 2)
                await r.inject(f"{a} + {b}", together([faults[a], faults[b]]))
            else:
                name = rng.choice(list(faults))
                await r.inject(name, faults[name])
            n += 1

        # The end: stop publishing, let everything drain, then judge.
        stop_pub.set()
        await publishing
        await caught_up(r.probe, subs, r.epochs, setup.recovery_timeout, fast_only=False)
        stop_subs.set()
        await asyncio.gather(*tasks)
        not_ready, ready_late = await p.not_ready()
        metrics = await p.metrics()
        audit = await asyncio.to_thread(_audit, p)
        truth, nats_problems = await read_truth(p.nats.url, pub)
        verdicts = [(s, judge_subscriber(s, truth)) for s in subs]
        stores = await judge_stores(truth, p.redis, p.postgres.url)
        dead = p.dead_services()
        codes = await asyncio.to_thread(p.stop_services)
        scenario_problems = [*r.problems, *(check(r) if check else [])]
        extra = [*nats_problems[:10], *pub.wrong_stream[:5], *stores.details[:20], *scenario_problems]
        extra += [d for _, v in verdicts for d in v.details][:40]
        extra += [f"publisher errors: {dict(pub.errors)}", f"exit codes on SIGTERM: {codes}"]
        extra += [f"not ready at the first probe only: {x}" for x in ready_late]
        extra += ["counters since each process's last start: "
                  + ", ".join(f"{k.removeprefix('fanout_')}={v:g}" for k, v in sorted(metrics.items()))]
        if audit.returncode != 0:
            output = audit.stdout[-3000:] + audit.stderr[-3000:]
            extra.append("fanout audit output:\n```\n" + output + "\n```")
        report = render(setup.mode, r.records, stores, truth, pub, verdicts, audit.returncode,
                        time.monotonic() - started, extra)
        RESULTS.mkdir(exist_ok=True)
        out.write_text(report)
        reported = True
        print("\n" + report)

        failures = []
        if nats_problems or pub.wrong_stream:
            failures.append(f"NATS/JetStream does not match the publisher's record: "
                            f"{(nats_problems + pub.wrong_stream)[:5]}")
        if stores.lost or stores.duplicates or stores.misfiled:
            failures.append(f"PostgreSQL not exactly once: {stores.lost} lost, {stores.duplicates} "
                            f"duplicated, {stores.misfiled} misfiled")
        if stores.redis_problems:
            failures.append(f"Redis hot window: {stores.details[-stores.redis_problems:][:5]}")
        for s, v in verdicts:
            if not v.events:
                failures.append(f"{s.name} got nothing")
            if not v.exact:
                failures.append(f"{s.name}: {v.missing} missing, {v.duplicates} duplicates, {v.wrong} wrong,"
                                f" {v.notices} notices: {v.details[:4]}")
        if audit.returncode != 0:
            failures.append(f"fanout audit exited {audit.returncode}")
        if dead:
            failures.append(f"services died on their own: {dead}")
        if not_ready:
            failures.append(f"services not ready after the drain: {not_ready}")
        if any(code != 0 for code in codes.values()):
            failures.append(f"not every service exited 0 on SIGTERM: {codes}")
        failures += scenario_problems
        assert not failures, "\n".join(failures) + f"\n(report: {out}; data and logs: {root})"
        ok = True
    except BaseException as exc:
        if not reported:
            lines = [f"# Fault suite {setup.name}: FAILED run ({setup.mode} mode)", "",
                     f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: "
                     f"{(str(exc) or type(exc).__name__).splitlines()[0][:500]}", "",
                     "| # | fault | duration (s) | recovery (s) | note |", "| --- | --- | --- | --- | --- |"]
            for i, rec in enumerate(r.records, 1):
                recovery = "-" if rec.recovery is None else f"{rec.recovery:.1f}"
                lines.append(f"| {i} | {rec.name} | {rec.healed_at - rec.injected_at:.1f} | {recovery} |"
                             f" {rec.note.strip()[:300]} |")
            RESULTS.mkdir(exist_ok=True)
            out.write_text("\n".join(lines) + "\n")
        raise
    finally:
        stop_pub.set()
        stop_subs.set()
        if publishing is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(publishing, 10)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await r.probe.close()
        await asyncio.to_thread(p.stop_all)
        if ok and not os.environ.get("FANOUT_FAULTS_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"fault suite: data and logs kept in {root}")

