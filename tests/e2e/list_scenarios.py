"""The two "done when" scenarios of issue 10, driven against the real service process.

Shared by tests/e2e/test_list_hydration.py (which asserts on them, at a size that runs
in seconds) and benchmarks/list_hydration.py (which prints them at full size, with list
hydration on and off in the same run). Each scenario changes orders in the sandbox,
lets the service find or hear about the changes, and reads what the log sink delivered
(``sink.log.order`` lines, in delivery order, across every run of the service).

- :func:`webhook_backlog`: every order changed and notified at once (a tenth of them
  changed and notified again), optionally a kill -9 and a restart midway; done when
  every order's newest notified state is delivered.
- :func:`poll_only`: no webhooks; orders change many times a second (some twice within
  one second) while the poller runs; done when every order's last state is delivered.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from app.sandbox import SandboxState
from tests.e2e.service import ServiceProcess, log_events, notify, wait_until

LIST_PATH = "/open-api/v2/orders"
NOTIFIERS = 16
DETAIL_PREFIX = "/open-api/v2/orders/"


@dataclass
class Delivered:
    """What the log sink received, per order, in order: (seq, when, hydrated_from)."""

    by_order: dict[int, list[tuple[int, float, str]]] = field(default_factory=dict)

    @classmethod
    def read(cls, logs: list[Path]) -> Delivered:
        found = cls()
        for path in logs:
            if not path.exists():
                continue
            for event in log_events(path, "sink.log.order"):
                body = event["body"]
                seq = body["order"].get("seq")
                if not isinstance(seq, int):
                    continue  # a seeded state, not one of the scenario's
                when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                found.by_order.setdefault(body["order_id"], []).append(
                    (seq, when.timestamp(), body.get("hydrated_from", "order"))
                )
        return found

    def newest(self, order_id: int) -> int | None:
        seen = self.by_order.get(order_id)
        return seen[-1][0] if seen else None

    def backwards(self) -> dict[int, list[int]]:
        """Orders whose deliveries went back to an older state at some point."""
        result = {}
        for order_id, seen in self.by_order.items():
            seqs = [seq for seq, _, _ in seen]
            if any(later < earlier for earlier, later in itertools.pairwise(seqs)):
                result[order_id] = seqs
        return result

    def count(self) -> int:
        return sum(len(seen) for seen in self.by_order.values())


def calls_since(state: SandboxState, since: float) -> tuple[int, int, int]:
    """(list calls, detail calls, 429s) the sandbox answered since ``since``."""
    lists = details = limited = 0
    for call in state.calls:
        if call.time < since:
            continue
        if call.path == LIST_PATH:
            lists += 1
        elif call.path.startswith(DETAIL_PREFIX):
            details += 1
        if call.status == 429:
            limited += 1
    return lists, details, limited


@dataclass
class Run:
    """What one scenario measured."""

    orders: int
    changes: int  # states notified (backlog) or made (poll-only)
    budget_per_minute: int
    seconds: float  # from the first change to the last newest state delivered
    list_calls: int
    detail_calls: int
    rate_limited: int
    delivered: Delivered
    missing: dict[int, tuple[int | None, int]]  # order -> (newest delivered, expected)
    latencies: list[float] = field(default_factory=list)  # poll-only: last change -> delivery

    @property
    def calls(self) -> int:
        return self.list_calls + self.detail_calls

    @property
    def done(self) -> int:
        """Orders whose newest state was delivered (all of them, unless timed out)."""
        return self.orders - len(self.missing)

    @property
    def orders_per_call(self) -> float:
        return self.done / self.calls if self.calls else float("inf")

    @property
    def calls_per_change(self) -> float:
        return self.calls / self.changes if self.changes else float("nan")

    @property
    def orders_per_minute(self) -> float:
        return self.done / self.seconds * 60 if self.seconds else float("inf")

    @property
    def budget_multiplier(self) -> float:
        """Orders delivered per minute over the budget's calls per minute."""
        return self.orders_per_minute / self.budget_per_minute

    def p95_latency(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0


def _missing(delivered: Delivered, expected: dict[int, int]) -> dict[int, tuple[int | None, int]]:
    return {
        order_id: (delivered.newest(order_id), seq)
        for order_id, seq in expected.items()
        if (delivered.newest(order_id) or 0) < seq
    }


def webhook_backlog(
    state: SandboxState,
    start: Callable[[str], ServiceProcess],
    orders: list[int],
    *,
    budget_per_minute: int,
    kill_after: int | None,
    timeout: float,
) -> Run:
    """Notify every order (a tenth twice), kill -9 after ``kill_after`` deliveries and
    restart, until every order's newest notified state is delivered (or ``timeout``)."""
    service = start("run1.log")
    logs = [service.log_path]
    expected: dict[int, int] = {}
    began = time.time()

    def change_and_notify(order_id: int, seq: int) -> None:
        state.update_order(order_id, seq=seq)  # as Clopos: the change, then its notice
        notify(service, order_id)

    with ThreadPoolExecutor(NOTIFIERS) as pool:  # Clopos would not send them one by one
        for seq, batch in ((1, orders), (2, orders[::10])):
            expected.update(dict.fromkeys(batch, seq))
            list(pool.map(lambda order_id, seq=seq: change_and_notify(order_id, seq), batch))

    def done() -> bool:
        return not _missing(Delivered.read(logs), expected)

    if kill_after is not None:
        wait_until(lambda: Delivered.read(logs).count() >= kill_after, timeout=timeout)
        service.kill()
        service = start("run2.log")
        logs.append(service.log_path)
    wait_until(done, timeout=max(1.0, began + timeout - time.time()), interval=0.05)
    finished = time.time()
    delivered = Delivered.read(logs)
    lists, details, limited = calls_since(state, began)
    return Run(
        orders=len(orders),
        changes=len(orders) + len(orders[::10]),
        budget_per_minute=budget_per_minute,
        seconds=finished - began,
        list_calls=lists,
        detail_calls=details,
        rate_limited=limited,
        delivered=delivered,
        missing=_missing(delivered, expected),
    )


def poll_only(
    state: SandboxState,
    service: ServiceProcess,
    orders: list[int],
    *,
    budget_per_minute: int,
    seconds: float,
    changes_per_second: float,
    timeout: float,
) -> Run:
    """Change ``orders`` round-robin at ``changes_per_second`` for ``seconds`` (every
    fifth change is followed at once by another of the same order: two states within
    one second), with no webhook; wait until each order's last state is delivered."""
    expected: dict[int, int] = {}
    last_change: dict[int, float] = {}
    counter = itertools.count(1)
    made = 0
    began = time.time()
    cycle = itertools.cycle(orders)
    tick = 1.0 / changes_per_second
    while time.time() - began < seconds:
        order_id = next(cycle)
        repeats = 2 if made % 5 == 4 else 1
        for _ in range(repeats):
            seq = next(counter)
            state.update_order(order_id, seq=seq)
            expected[order_id] = seq
            last_change[order_id] = time.time()
            made += 1
        time.sleep(tick)
    logs = [service.log_path]

    def done() -> bool:
        return not _missing(Delivered.read(logs), expected)

    wait_until(done, timeout=timeout, interval=0.05)
    delivered = Delivered.read(logs)
    finished = max(
        (when for seen in delivered.by_order.values() for _, when, _ in seen), default=began
    )
    latencies = []
    for order_id, seq in expected.items():
        at = next((w for s, w, _ in delivered.by_order.get(order_id, []) if s == seq), None)
        if at is not None:
            latencies.append(at - last_change[order_id])
    lists, details, limited = calls_since(state, began)
    return Run(
        orders=len(orders),
        changes=made,
        budget_per_minute=budget_per_minute,
        seconds=finished - began,
        list_calls=lists,
        detail_calls=details,
        rate_limited=limited,
        delivered=delivered,
        missing=_missing(delivered, expected),
        latencies=latencies,
    )


def backlog_sandbox(orders: int, budget_per_minute: int) -> SandboxState:
    """A sandbox enforcing ``budget_per_minute`` with ``orders`` orders (1001...), all
    last changed ten minutes or more ago."""
    return SandboxState(seed_orders=orders, tenant_limit_per_minute=budget_per_minute)
