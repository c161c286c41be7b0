"""Recovery: the p50 from the last notification to delivery after a 4 s sink outage.

    .venv/bin/python benchmarks/recovery.py [--orders 50] [--outage 4]

The service delivers to a counting HTTP sink with its default retry and breaker
settings. Baseline, in the same run: ``--orders`` notifications (one per distinct
order) with the sink up; the figure is the p50 over orders of (first delivery - the
moment the last notification was acknowledged). Then the sink answers 503 for
``--outage`` seconds, starting just before another ``--orders`` notifications, and the
same p50 is measured. What it shows: how long retries and the breaker keep orders
waiting after the sink is back.
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
    http_sink_setting,
    median,
    notify,
    sandbox_server,
    scratch,
    service_cmd,
    service_env,
    sink_orders,
    sink_server,
    wait_delivered,
)


def _p50_to_delivery(service: Server, sink: Server, order_ids: list[int], timeout: float) -> float:
    statuses = asyncio.run(notify(f"{service.url}/webhooks/clopos", order_ids))
    sent_at = time.time()
    if statuses.get(202, 0) != len(order_ids):
        print(f"  service: answers {statuses}")
    already = len(sink_orders(sink))
    wait_delivered(sink, already + len(order_ids), timeout=timeout, idle=timeout)
    delivered = sink_orders(sink)
    waits = [delivered[o] - sent_at for o in order_ids if o in delivered]
    missing = len(order_ids) - len(waits)
    if missing:
        print(f"  {missing} orders not delivered within {timeout:.0f} s")
    return median(waits)


def run(args: argparse.Namespace) -> list[Row]:
    logs = scratch("recovery")
    servers: list[Server] = []
    try:
        sandbox = sandbox_server(logs, seed_orders=args.orders * 2 + 10)
        sink = sink_server(logs)
        servers += [sandbox, sink]
        port = free_port()
        env = service_env(
            sandbox, f"sqlite:///{logs / 'recovery.db'}", SINKS=http_sink_setting(sink)
        )
        service = Server("service", service_cmd(port), port, env=env, logs=logs)
        servers.append(service)
        first = list(range(1001, 1001 + args.orders))
        baseline = _p50_to_delivery(service, sink, first, timeout=60)
        httpx.post(f"{sink.url}/outage", params={"seconds": args.outage}, timeout=60)
        second = list(range(1001 + args.orders, 1001 + 2 * args.orders))
        after_outage = _p50_to_delivery(service, sink, second, timeout=args.timeout)
    finally:
        for server in reversed(servers):
            server.stop()
    print(
        f"recovery: {args.orders} orders; p50 to delivery {baseline:.2f} s with the sink up, "
        f"{after_outage:.2f} s after a {args.outage:.0f} s outage"
    )
    return [
        Row(
            "6. recovery",
            f"p50 last notification -> delivery, {args.outage:.0f} s sink outage",
            f"{after_outage:.2f} s",
            f"no outage {baseline:.2f} s",
            f"{after_outage - args.outage:+.2f} s beyond the outage",
            "(reported)",
            "",
        )
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=50)
    p.add_argument("--outage", type=float, default=4.0)
    p.add_argument("--timeout", type=float, default=120.0)
    return p


if __name__ == "__main__":
    run(parser().parse_args())
