"""Coalescing: upstream fetches per notification under a storm.

    .venv/bin/python benchmarks/coalescing.py [--orders 20] [--per-order 50]

A storm of ``--per-order`` notifications for each of ``--orders`` orders, interleaved,
sent as fast as they are taken; then the fetches the sandbox served (GET
/v2/orders/{id}) are counted once they stop. Baseline, in the same run: the naive
design, which starts one fetch per notification whatever the storm (1.0 by
construction; the fetches the sandbox actually served it, and its failed tasks, e.g. on
its connection pool's timeout, are printed beside).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Row,
    Server,
    free_port,
    notify,
    reset_sandbox_counters,
    sandbox_server,
    sandbox_stats,
    scratch,
    service_cmd,
    service_env,
    sink_server,
    uvicorn_cmd,
)

QUIET_SECONDS = 3.0


def _fetches_after_storm(sandbox: Server, server: Server, order_ids: list[int]) -> int:
    reset_sandbox_counters(sandbox)
    statuses = asyncio.run(notify(f"{server.url}/webhooks/clopos", order_ids))
    if statuses.get(202, 0) != len(order_ids):
        print(f"  {server.name}: answers {statuses}")
    calls, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < QUIET_SECONDS:
        now_calls = sandbox_stats(sandbox)["order_calls"]
        if now_calls != calls:
            calls, quiet_since = now_calls, time.monotonic()
        time.sleep(0.2)
    return calls


def _naive_lost(naive: Server) -> int:
    lost: int = httpx.get(f"{naive.url}/healthz", timeout=60).json()["lost"]
    return lost


def run(args: argparse.Namespace) -> list[Row]:
    logs = scratch("coalescing")
    servers: list[Server] = []
    try:
        sandbox = sandbox_server(logs, seed_orders=args.orders * 2 + 10)
        sink = sink_server(logs)
        servers += [sandbox, sink]
        port = free_port()
        env = service_env(sandbox, f"sqlite:///{logs / 'coalescing.db'}")
        service = Server("service", service_cmd(port), port, env=env, logs=logs)
        servers.append(service)
        port = free_port()
        naive_env = {
            "NAIVE_CLOPOS_URL": f"{sandbox.url}/open-api",
            "NAIVE_SINK_URL": f"{sink.url}/hook",
        }
        naive_cmd = uvicorn_cmd("benchmarks.servers:naive_app", port)
        naive = Server("naive", naive_cmd, port, env=naive_env, logs=logs)
        servers.append(naive)
        storm = [1001 + i % args.orders for i in range(args.orders * args.per_order)]
        service_fetches = _fetches_after_storm(sandbox, service, storm)
        # Other orders for the naive design, so nothing is cached or coalesced between.
        naive_storm = [order_id + args.orders for order_id in storm]
        naive_served = _fetches_after_storm(sandbox, naive, naive_storm)
        naive_lost = _naive_lost(naive)
    finally:
        for server in reversed(servers):
            server.stop()
    per_notice = service_fetches / len(storm)
    # One background task, so one fetch attempt, per notification: by construction.
    naive_per_notice = 1.0
    print(
        f"coalescing: {len(storm)} notifications for {args.orders} orders: service "
        f"{service_fetches} fetches ({per_notice:.3f}/notification); naive: one fetch attempt "
        f"per notification, of which the sandbox served {naive_served} ({naive_lost} tasks "
        "failed somewhere)"
    )
    return [
        Row(
            "4. coalescing",
            f"fetches per notification ({args.orders} orders x {args.per_order})",
            f"{per_notice:.3f} ({service_fetches} fetches)",
            f"naive {naive_per_notice:.0f} (served {naive_served}, {naive_lost} failed)",
            f"{per_notice / naive_per_notice:.3f}x",
            "(reported)",
            "",
        )
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=20)
    p.add_argument("--per-order", type=int, default=50)
    return p


if __name__ == "__main__":
    run(parser().parse_args())
