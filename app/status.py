"""The service's state at one moment: what /readyz, /metrics and /admin/status render.

:meth:`app.runtime.Runtime.status` reads every component once into a frozen
:class:`ServiceStatus`; the three routes only render it. Nothing is cached between
requests, so a reading that failed is reported as failed (``store is None``), never
replaced by the figures of an earlier read.

To show something new (a field of a brand, a sink, the store), add it to the dataclass
here, fill it in ``Runtime.status`` and render it where it belongs; readiness checks are
the pure :func:`readiness_checks` below.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from app.backlog import BacklogStatus
from app.clopos.budget import BudgetState
from app.poller import PollStatus
from app.store.base import SharedBudgetRow, StoreStats


@dataclass(frozen=True)
class Check:
    """One named readiness check: ``ok``, and a detail an on-call engineer can act on."""

    ok: bool
    detail: str
    warning: bool = False


@dataclass(frozen=True)
class ReadStatus:
    """A brand's Clopos reads: calls and new order states stored, by read ("order": a
    detail call, "order_list": a list page), and backlog mode (app/backlog.py)."""

    from_list: bool  # HYDRATE_FROM_LIST
    calls: Mapping[str, int]
    orders: Mapping[str, int]
    backlog: BacklogStatus | None = None  # None when list hydration is off

    def orders_per_call(self) -> dict[str, float | None]:
        """Orders hydrated per Clopos call, by read and over all reads (None: no call)."""
        ratios: dict[str, float | None] = {}
        for read in ("order", "order_list"):
            calls = self.calls.get(read, 0)
            ratios[read] = round(self.orders.get(read, 0) / calls, 3) if calls else None
        total = sum(self.calls.values())
        ratios["all"] = round(sum(self.orders.values()) / total, 3) if total else None
        return ratios


def budget_used_share(budget: BudgetState | None) -> float | None:
    """Calls in the last 60 s over the per-minute limit (None before the first call)."""
    if budget is None or not budget.limit:
        return None
    return round(budget.calls_last_minute / budget.limit, 3)


@dataclass(frozen=True)
class BrandStatus:
    tenant: str
    calls_by_status: Mapping[str, int]  # Clopos answers by status (or error kind)
    auth_calls: int
    budget: BudgetState | None  # None until the tenant's budget was first used
    paused_since: float | None = None  # epoch seconds; None when credentials are accepted
    paused_reason: str | None = None
    poll: PollStatus | None = None  # None when polling is off
    poll_check: Check | None = None
    reads: ReadStatus | None = None
    # PostgreSQL only: the tenant's row every replica draws on (``budget`` is this one's).
    shared_budget: SharedBudgetRow | None = None

    @property
    def paused(self) -> bool:
        return self.paused_since is not None


@dataclass(frozen=True)
class SinkStatus:
    kind: str  # "http" or "log"
    circuit: str  # closed, open, half_open
    in_flight: int


@dataclass(frozen=True)
class Thresholds:
    """Readiness limits from the settings (READY_MAX_BACKLOG, READY_MAX_OLDEST_SECONDS)."""

    max_backlog: int
    max_oldest_seconds: float


@dataclass(frozen=True)
class ServiceStatus:
    at: float  # epoch seconds of the reading
    uptime_seconds: float
    store: StoreStats | None  # None when the queues could not be read
    store_error: str | None  # why the store failed a ping or a read; None when it answered
    brands: Mapping[str, BrandStatus]
    sinks: Mapping[str, SinkStatus]
    loops_alive: Mapping[str, bool]
    orphaned_sinks: tuple[str, ...] = ()  # sink names with queued work, not in SINKS
    unauthenticated_webhooks: bool = False
    checks: Mapping[str, Check] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks.values())


def _clock_time(moment: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(moment)) + "Z"


def _backlog_check(status: ServiceStatus, limits: Thresholds) -> Check:
    stats = status.store
    if stats is None:
        return Check(False, f"cannot read the queues: store {status.store_error}")
    problems = []
    for name, queue in stats.queues().items():
        if queue.pending > limits.max_backlog:
            problems.append(f"{name} has {queue.pending} waiting (> {limits.max_backlog})")
        age = queue.oldest_pending_age or 0.0
        if age > limits.max_oldest_seconds:
            problems.append(
                f"{name} oldest waiting {age:.0f}s (> {limits.max_oldest_seconds:.0f}s)"
            )
    if problems:
        return Check(False, "; ".join(problems))
    return Check(True, f"hydration waiting {stats.hydration.pending}")


def readiness_checks(
    status: ServiceStatus, limits: Thresholds, *, store_writable: bool
) -> dict[str, Check]:
    """Every readiness check of ``status``, by name (pure: no I/O, no clock)."""
    checks: dict[str, Check] = {
        "store": Check(True, "writable")
        if store_writable
        else Check(False, f"store cannot commit: {status.store_error}")
    }
    dead = [name for name, alive in status.loops_alive.items() if not alive]
    checks["workers"] = Check(not dead, f"not running: {', '.join(dead)}" if dead else "running")
    for name, brand in status.brands.items():
        checks[f"credentials:{name}"] = (
            Check(False, f"paused since {_clock_time(brand.paused_since)}: {brand.paused_reason}")
            if brand.paused_since is not None
            else Check(True, "accepted")
        )
    for name, sink in status.sinks.items():
        checks[f"sink:{name}"] = Check(
            sink.circuit == "closed",
            "circuit closed"
            if sink.circuit == "closed"
            else f"circuit {sink.circuit} after repeated failures",
        )
    for name, brand in status.brands.items():
        if brand.poll_check is not None:
            checks[f"poller:{name}"] = brand.poll_check
    if status.orphaned_sinks:
        checks["unconfigured_sinks"] = Check(
            False,
            "deliveries wait for sinks not in SINKS: "
            + ", ".join(status.orphaned_sinks)
            + " (restore their names in SINKS: renaming a sink strands its queue)",
        )
    checks["backlog"] = _backlog_check(status, limits)
    if status.unauthenticated_webhooks:
        checks["webhook_auth"] = Check(
            True, "WEBHOOK_ALLOW_UNAUTHENTICATED=true: anyone can post notifications", warning=True
        )
    return checks
