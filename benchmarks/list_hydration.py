"""Hydration from list pages vs one order per call, the same scenarios in one run.

    .venv/bin/python benchmarks/list_hydration.py [--orders 400] [--budget 120]
        [--poll-seconds 20] [--changes-per-second 30] [--off-timeout 120]

Runs the real service process against the sandbox (which enforces the budget) in two
scenarios, each twice: with list hydration (the default) and with
``HYDRATE_FROM_LIST=false`` (the one-order-per-call design), and prints orders per
Clopos call and the budget multiplier (orders delivered per minute over the budget's
calls per minute) side by side:

- **webhook backlog**: ``--orders`` orders notified at once (a tenth of them twice), at
  ``--budget`` calls a minute; with list hydration, a kill -9 and a restart midway.
  The one-per-call run is stopped after ``--off-timeout`` seconds if it has not finished
  (its rate is then measured on what it delivered).
- **poll-only**: no webhooks; 20 orders change ``--changes-per-second`` times a second
  (some twice within one second) for ``--poll-seconds``, the poller every second.

The scenarios are tests/e2e/list_scenarios.py, which the e2e tests assert on at a
smaller size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.sandbox import create_sandbox_app
from tests.e2e.list_scenarios import Run, backlog_sandbox, poll_only, webhook_backlog
from tests.e2e.service import ServiceProcess, service_env
from tests.servers import ServerThread

POLL_ORDERS = 20


def _service_factory(url: str, workdir: Path, **env: str) -> Callable[[str], ServiceProcess]:
    started: list[ServiceProcess] = []

    def start(log_name: str) -> ServiceProcess:
        proc = ServiceProcess(
            service_env(url, workdir / "hydrator.db", **env), workdir / log_name
        ).start()
        started.append(proc)
        return proc

    start.started = started  # type: ignore[attr-defined]
    return start


def _stop_all(start: Callable[[str], ServiceProcess]) -> None:
    for proc in start.started:  # type: ignore[attr-defined]
        proc.stop()


def backlog(args: argparse.Namespace, from_list: bool) -> Run:
    state = backlog_sandbox(args.orders, args.budget)
    with ServerThread(create_sandbox_app(state)) as server, tempfile.TemporaryDirectory() as tmp:
        start = _service_factory(
            f"{server.url}/open-api",
            Path(tmp),
            CLOPOS_RATE_LIMIT_PER_MINUTE=str(args.budget),
            HYDRATE_FROM_LIST=str(from_list).lower(),
        )
        try:
            return webhook_backlog(
                state,
                start,
                list(range(1001, 1001 + args.orders)),
                budget_per_minute=args.budget,
                kill_after=args.orders // 4 if from_list else None,
                timeout=args.off_timeout,
            )
        finally:
            _stop_all(start)


def polling(args: argparse.Namespace, from_list: bool) -> Run:
    state = backlog_sandbox(300, args.poll_budget)
    with ServerThread(create_sandbox_app(state)) as server, tempfile.TemporaryDirectory() as tmp:
        start = _service_factory(
            f"{server.url}/open-api",
            Path(tmp),
            CLOPOS_RATE_LIMIT_PER_MINUTE=str(args.poll_budget),
            HYDRATE_FROM_LIST=str(from_list).lower(),
            POLL_INTERVAL_SECONDS="1",
            POLL_LOOKBACK_SECONDS="60",
            POLL_SLACK_SECONDS="5",
        )
        try:
            return poll_only(
                state,
                start("service.log"),
                list(range(1301 - POLL_ORDERS, 1301)),
                budget_per_minute=args.poll_budget,
                seconds=args.poll_seconds,
                changes_per_second=args.changes_per_second,
                timeout=args.off_timeout,
            )
        finally:
            _stop_all(start)


def row(scenario: str, design: str, run: Run) -> str:
    p95 = f"{run.p95_latency():.2f}" if run.latencies else "-"
    return (
        f"{scenario:<16} {design:<16} {run.done:>4}/{run.orders:<4} {run.changes:>6} "
        f"{run.seconds:>7.1f} {run.list_calls:>5} {run.detail_calls:>6} "
        f"{run.orders_per_call:>9.2f} {run.calls_per_change:>8.3f} "
        f"{run.orders_per_minute:>8.0f} {run.budget_multiplier:>7.2f} {p95:>6} "
        f"{run.rate_limited:>4} {len(run.delivered.backwards()):>4}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--budget", type=int, default=120, help="calls/min (backlog)")
    parser.add_argument("--poll-budget", type=int, default=300, help="calls/min (poll-only)")
    parser.add_argument("--poll-seconds", type=float, default=20.0)
    parser.add_argument("--changes-per-second", type=float, default=30.0)
    parser.add_argument("--off-timeout", type=float, default=120.0)
    args = parser.parse_args()

    runs = [
        ("webhook backlog", "list (kill -9)", backlog(args, True)),
        ("webhook backlog", "one per call", backlog(args, False)),
        ("poll-only", "list", polling(args, True)),
        ("poll-only", "one per call", polling(args, False)),
    ]
    print(
        f"{'scenario':<16} {'design':<16} {'orders':>9} {'changes':>6} {'seconds':>7} "
        f"{'lists':>5} {'details':>6} {'ord/call':>9} {'call/chg':>8} {'ord/min':>8} "
        f"{'x budget':>7} {'p95 s':>6} {'429':>4} {'back':>4}"
    )
    for scenario, design, run in runs:
        print(row(scenario, design, run))
    on, off = runs[0][2], runs[1][2]
    print(
        f"\nwebhook backlog: x{on.budget_multiplier:.1f} the budget with list hydration "
        f"(goal >= 5) vs x{off.budget_multiplier:.2f} one order per call; "
        f"{on.orders_per_call:.1f} vs {off.orders_per_call:.2f} orders per call"
    )
    poll_on, poll_off = runs[2][2], runs[3][2]
    print(
        f"poll-only: {poll_on.calls_per_change:.3f} calls per change (goal <= 0.1) vs "
        f"{poll_off.calls_per_change:.3f}; p95 last change -> delivery "
        f"{poll_on.p95_latency():.2f} s vs {poll_off.p95_latency():.2f} s (goal <= 8 s)"
    )


if __name__ == "__main__":
    main()
