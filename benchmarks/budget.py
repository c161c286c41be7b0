"""Budget: orders delivered per minute with a backlog, divided by the documented budget.

    .venv/bin/python benchmarks/budget.py [--backlog 400] [--window 60]

The sandbox enforces Clopos's documented tenant limit (300 calls a minute) and the
service, on its defaults (list hydration on), runs with the documented
CLOPOS_RATE_LIMIT_PER_MINUTE (300), delivering to a counting sink. A backlog of
``--backlog`` distinct orders is notified at once; the orders delivered from the first
notification until the last delivery (or ``--window`` seconds, whichever ends first)
give orders per minute; divided by the budget that is the multiplier (1.0: one order
per call). Beside it, orders per Clopos call, which does not depend on the clock. The
429s the sandbox answered are counted: the budget is only worth anything if upstream
never has to refuse.

(The whole run is measured, not a window after a warm-up: with list hydration the
backlog is served from list pages within seconds, so a window after a warm-up saw
nothing at all. The run includes the budget's small initial burst.)

If benchmarks/list_hydration.py exists (list-page hydration), ``make bench`` runs it too
and quotes its output beside this figure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Row,
    Server,
    free_port,
    http_sink_setting,
    notify,
    sandbox_server,
    sandbox_stats,
    scratch,
    service_cmd,
    service_env,
    sink_count,
    sink_server,
    wait_delivered,
)

BUDGET = 300


def run(args: argparse.Namespace) -> list[Row]:
    logs = scratch("budget")
    servers: list[Server] = []
    try:
        sandbox = sandbox_server(logs, seed_orders=args.backlog + 10, limit=BUDGET)
        sink = sink_server(logs)
        servers += [sandbox, sink]
        port = free_port()
        env = service_env(
            sandbox,
            f"sqlite:///{logs / 'budget.db'}",
            SINKS=http_sink_setting(sink),
            CLOPOS_RATE_LIMIT_PER_MINUTE=str(BUDGET),
        )
        service = Server("service", service_cmd(port), port, env=env, logs=logs)
        servers.append(service)
        orders = list(range(1001, 1001 + args.backlog))
        started = time.time()
        statuses = asyncio.run(notify(f"{service.url}/webhooks/clopos", orders))
        if statuses.get(202, 0) != len(orders):
            print(f"  service: answers {statuses}")
        last_at = wait_delivered(sink, args.backlog, timeout=args.window, idle=args.window)
        delivered = sink_count(sink)["orders"]
        stats = sandbox_stats(sandbox)
    finally:
        for server in reversed(servers):
            server.stop()
    elapsed = (last_at if delivered >= args.backlog else time.time()) - started
    per_minute = delivered / max(elapsed, 1e-9) * 60
    multiplier = per_minute / BUDGET
    calls = stats["calls"]
    print(
        f"budget: {delivered} of {args.backlog} orders delivered in {elapsed:.1f} s at a budget "
        f"of {BUDGET} calls/min: {per_minute:.0f} orders/min, multiplier {multiplier:.2f}; "
        f"{calls} calls in all ({delivered / max(calls, 1):.1f} orders per call), "
        f"{stats['rate_limited']} answered 429"
    )
    return [
        Row(
            "3. budget",
            f"orders/min per budgeted call/min (backlog {args.backlog})",
            f"{per_minute:.0f} orders/min ({delivered / max(calls, 1):.1f} orders per call)",
            f"budget {BUDGET} calls/min",
            f"{multiplier:.2f}x",
            "(reported; 429s: 0)",
            f"{stats['rate_limited']} x 429",
        )
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backlog", type=int, default=400)
    p.add_argument("--window", type=float, default=60.0)
    return p


if __name__ == "__main__":
    run(parser().parse_args())
