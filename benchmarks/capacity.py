"""End-to-end capacity: orders/s hydrated and delivered, and CPU seconds per 1,000 orders.

    .venv/bin/python benchmarks/capacity.py [--orders 1500] [--rounds 2]
        [--compare NAME=CHECKOUT]

The sandbox (budget lifted) and a counting sink run on the same cores as the design
under test. A burst of ``--orders`` notifications, one per distinct order, is sent
as fast as the design takes them; the clock stops when the sink holds every order
(or nothing new arrives for 10 s: what never arrived was lost). Designs, in the same
run, alternated round by round:

* the service: durable queue, hydration, signed HTTP delivery, with HYDRATION_CONCURRENCY
  and the sink's ``concurrency`` at ``--concurrency`` (32; the defaults are 8 and 4);
* the naive design it replaces: FastAPI ``BackgroundTasks`` that fetch and forward
  in-process with httpx, no store (benchmarks/servers.py ``naive_app``), in a fresh
  process each round (killed after it, so its tasks still waiting for httpx's pool do
  not run on into the next round);
* a raw aiohttp fetch-and-forward loop in this process (``--concurrency`` in flight):
  the ceiling;
* the same raw loop fed by webhooks (benchmarks/servers.py ``relay_app``, its own
  process): it answers 202 and forwards from memory, keeping nothing. Not a goal: it
  splits the distance to the raw ceiling into what taking the notifications costs on
  these cores (the load generator included: the raw loop has none) and what the
  service's store, retries and signing cost.

CPU is the design's own process (for the loop, this process during the loop).
``--compare NAME=PATH`` adds the service as checked out at PATH (e.g. a ``git worktree``
of an older commit), alternated with the others: before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.clopos.client import RECEIPT_QUERY
from benchmarks.common import (
    SANDBOX_AUTH,
    Row,
    Server,
    free_port,
    http_sink_setting,
    median,
    notify,
    reset_sink,
    sandbox_server,
    scratch,
    service_cmd,
    service_env,
    sink_count,
    sink_server,
    uvicorn_cmd,
    wait_delivered,
)

GOAL_VS_NAIVE = 1.5
GOAL_VS_RAW = 0.5


@dataclass
class Design:
    name: str
    rates: list[float] = field(default_factory=list)
    cpu_per_1000: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    # The share of the main thread (the event loop); the rest is the other threads'
    # (in the service chiefly its store writer process). Empty for the raw loop (this process).
    loop_cpu_per_1000: list[float] = field(default_factory=list)


class Through(NamedTuple):
    rate: float  # orders/s delivered
    cpu: float  # CPU s per 1,000 orders
    lost: int
    loop_cpu: float | None = None  # the main thread's CPU s per 1,000 orders


def _burst_through(server: Server, sink: Server, order_ids: list[int]) -> Through:
    """Orders/s delivered, CPU s per 1,000 orders (all, the main thread's), orders lost."""
    reset_sink(sink)
    loop0, cpu0, started = server.main_thread_cpu_seconds(), server.cpu_seconds(), time.time()
    statuses = asyncio.run(notify(f"{server.url}/webhooks/clopos", order_ids))
    if statuses.get(202, 0) != len(order_ids):
        print(f"  {server.name}: answers {statuses}")
    last_at = wait_delivered(sink, len(order_ids), timeout=300)
    if server.name in ("naive", "relay"):  # their own account: how many failed, and why
        print(f"  {server.name}: {httpx.get(f'{server.url}/healthz', timeout=60).json()}")
    cpu, loop = server.cpu_seconds() - cpu0, server.main_thread_cpu_seconds() - loop0
    delivered = sink_count(sink)["orders"]
    return Through(
        delivered / max(last_at - started, 1e-9),
        cpu / len(order_ids) * 1000,
        len(order_ids) - delivered,
        loop / len(order_ids) * 1000,
    )


async def _raw_loop(sandbox: Server, sink: Server, order_ids: list[int], concurrency: int) -> int:
    base = f"{sandbox.url}/open-api"
    ids = iter(order_ids)
    delivered = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        async with session.post(f"{base}/v2/auth", json=SANDBOX_AUTH) as answer:
            token = (await answer.json())["token"]

        async def worker() -> None:
            nonlocal delivered
            for order_id in ids:
                url = f"{base}/v2/orders/{order_id}?{RECEIPT_QUERY}"
                async with session.get(url, headers={"x-token": token}) as response:
                    answer = await response.json()
                    if "data" not in answer:
                        raise SystemExit(f"raw loop: {order_id}: {answer}")
                    order = answer["data"]
                body = {"order_id": order_id, "order": order}
                async with session.post(f"{sink.url}/hook", json=body) as posted:
                    delivered += posted.status == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return delivered


def _raw_through(sandbox: Server, sink: Server, order_ids: list[int], concurrency: int) -> Through:
    reset_sink(sink)
    cpu0, started = time.process_time(), time.time()
    delivered = asyncio.run(_raw_loop(sandbox, sink, order_ids, concurrency))
    elapsed, cpu = time.time() - started, time.process_time() - cpu0
    return Through(delivered / elapsed, cpu / len(order_ids) * 1000, len(order_ids) - delivered)


def _naive_through(env: dict[str, str], logs: Path, sink: Server, order_ids: list[int]) -> Through:
    """The naive design in a fresh process, killed after its round: its background
    tasks that are still waiting must not run on into the next design's round."""
    port = free_port()
    naive = Server(
        "naive", uvicorn_cmd("benchmarks.servers:naive_app", port), port, env=env, logs=logs
    )
    try:
        return _burst_through(naive, sink, order_ids)
    finally:
        naive.proc.kill()
        naive.stop()


def measure(args: argparse.Namespace) -> list[Design]:
    logs = scratch("capacity")
    servers: list[Server] = []
    try:
        designs_count = 4 + len(args.compare)
        sandbox = sandbox_server(logs, seed_orders=args.orders * args.rounds * designs_count + 10)
        sink = sink_server(logs)
        servers += [sandbox, sink]
        port = free_port()
        env = service_env(
            sandbox,
            f"sqlite:///{logs / 'capacity.db'}",
            SINKS=http_sink_setting(sink, concurrency=args.concurrency),
            HYDRATION_CONCURRENCY=str(args.concurrency),
        )
        service = Server("service", service_cmd(port), port, env=env, logs=logs)
        services = {"service": service}
        for index, (label, checkout) in enumerate(_checkouts(args.compare), start=1):
            port = free_port()
            database = f"sqlite:///{logs / f'capacity-{index}.db'}"
            services[label] = Server(
                label,
                service_cmd(port),
                port,
                env={**env, "DATABASE_URL": database},
                cwd=checkout,
                logs=logs,
            )
        naive_env = {
            "NAIVE_CLOPOS_URL": f"{sandbox.url}/open-api",
            "NAIVE_SINK_URL": f"{sink.url}/hook",
        }
        servers += services.values()
        relay_env = {**naive_env, "RELAY_CONCURRENCY": str(args.concurrency)}
        port = free_port()
        relay_cmd = uvicorn_cmd("benchmarks.servers:relay_app", port)
        relay = Server("relay", relay_cmd, port, env=relay_env, logs=logs)
        servers.append(relay)
        services["relay"] = relay
        designs = {name: Design(name) for name in (*services, "naive", "raw")}
        next_id = 1001
        for _ in range(args.rounds):
            for name in designs:
                ids = list(range(next_id, next_id + args.orders))
                next_id += args.orders
                if name == "raw":
                    through = _raw_through(sandbox, sink, ids, args.concurrency)
                elif name == "naive":
                    through = _naive_through(naive_env, logs, sink, ids)
                else:
                    through = _burst_through(services[name], sink, ids)
                design = designs[name]
                design.rates.append(through.rate)
                design.cpu_per_1000.append(through.cpu)
                design.lost.append(through.lost)
                if through.loop_cpu is not None:
                    design.loop_cpu_per_1000.append(through.loop_cpu)
        return list(designs.values())
    finally:
        for server in reversed(servers):
            server.stop()


def report(designs: list[Design], args: argparse.Namespace) -> list[Row]:
    by = {d.name: d for d in designs}
    print(
        f"capacity: bursts of {args.orders} distinct orders, {args.rounds} alternated rounds "
        "(sandbox and sink on the same cores)"
    )
    for d in designs:
        print(
            f"  {d.name:8s} {median(d.rates):7.0f} orders/s delivered  "
            f"{median(d.cpu_per_1000):5.2f} CPU s / 1,000 orders{_threads(d)}  "
            f"lost {sum(d.lost)}  (rounds: {', '.join(f'{r:.0f}' for r in d.rates)})"
        )
    service = median(by["service"].rates)
    vs_naive = _ratios(by["service"], by["naive"])
    vs_raw = _ratios(by["service"], by["raw"])
    # Below one order a second the naive design delivered (almost) nothing: a ratio to
    # that says nothing, its count of lost orders says it all.
    naive_none = median(by["naive"].rates) < 1.0
    naive_delivered = args.orders * args.rounds - sum(by["naive"].lost)
    shown = (
        f"n/a (naive delivered {naive_delivered} of {args.orders * args.rounds})"
        if naive_none
        else f"{median(vs_naive):.2f}x"
    )
    print(
        f"  service / naive {shown}, "
        f"service / raw {median(vs_raw):.2f}x (per round: {_listed(vs_raw)})"
    )
    relay_vs_raw = _ratios(by["relay"], by["raw"])
    print(f"  relay / raw {median(relay_vs_raw):.2f}x (per round: {_listed(relay_vs_raw)})")
    for name in by:
        if name not in ("service", "naive", "raw"):
            ratios = _ratios(by["service"], by[name])
            print(f"  service / {name} {median(ratios):.2f}x (per round: {_listed(ratios)})")
    cpu = median(by["service"].cpu_per_1000)
    return [
        Row(
            "2. capacity",
            "service orders/s (vs naive)",
            f"{service:.0f}",
            f"naive {median(by['naive'].rates):.0f} (lost {sum(by['naive'].lost)} of "
            f"{args.orders * args.rounds})",
            shown,
            f">= {GOAL_VS_NAIVE}x",
            "met" if median(vs_naive) >= GOAL_VS_NAIVE else "NOT met",
        ),
        Row(
            "2. capacity",
            "service orders/s (vs raw loop)",
            f"{service:.0f} (lost {sum(by['service'].lost)})",
            f"raw {median(by['raw'].rates):.0f}",
            f"{median(vs_raw):.2f}x",
            f">= {GOAL_VS_RAW}x",
            "met" if median(vs_raw) >= GOAL_VS_RAW else "NOT met",
        ),
        Row(
            "2. capacity",
            "relay orders/s (webhooks in, nothing kept; vs raw loop)",
            f"{median(by['relay'].rates):.0f}",
            f"raw {median(by['raw'].rates):.0f}",
            f"{median(relay_vs_raw):.2f}x",
            "(reported: the ceiling with notifications taken on these cores)",
            "",
        ),
        Row(
            "2. capacity",
            "service orders/s (vs relay)",
            f"{service:.0f}",
            f"relay {median(by['relay'].rates):.0f}",
            f"{median(_ratios(by['service'], by['relay'])):.2f}x",
            "(reported: what the service does beyond it: store, retries, checks, signing, logs)",
            "",
        ),
        Row(
            "2. capacity",
            "CPU s per 1,000 orders",
            f"service {cpu:.2f}",
            f"naive {median(by['naive'].cpu_per_1000):.2f}, raw "
            f"{median(by['raw'].cpu_per_1000):.2f}, relay {median(by['relay'].cpu_per_1000):.2f}",
            f"{cpu / median(by['naive'].cpu_per_1000):.2f}x naive's",
            "(reported)",
            "",
        ),
    ]


def _threads(design: Design) -> str:
    """`` (main thread X, others Y)``: the median of the main thread's CPU per round, and
    the median of the rest per round (for the service chiefly its store writer process). With an
    odd number of rounds the two need not add up to the printed median total."""
    if not design.loop_cpu_per_1000:
        return ""
    loop = median(design.loop_cpu_per_1000)
    pairs = zip(design.cpu_per_1000, design.loop_cpu_per_1000, strict=True)
    others = max(0.0, median([every - main for every, main in pairs]))
    return f" (main thread {loop:.2f}, others {others:.2f})"


def _ratios(design: Design, baseline: Design) -> list[float]:
    """Per-round ratios of neighbours in time (the machine's load moves between rounds)."""
    return [d / max(b, 1e-9) for d, b in zip(design.rates, baseline.rates, strict=True)]


def _checkouts(compare: list[str]) -> list[tuple[str, Path]]:
    return [(name, Path(path).resolve()) for name, path in (c.split("=", 1) for c in compare)]


def _listed(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="orders in flight: the raw loop's, the service's hydrations and deliveries each",
    )
    p.add_argument("--compare", action="append", default=[], metavar="NAME=CHECKOUT")
    return p


def run(args: argparse.Namespace) -> list[Row]:
    return report(measure(args), args)


if __name__ == "__main__":
    run(parser().parse_args())
