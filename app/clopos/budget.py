"""The tenant rate budget: how many Clopos calls one ``integrator_id:brand`` may make.

Clopos enforces 300 requests per sliding 60 s window per tenant (tier 3), centrally, so
every caller for a tenant must draw on one budget. :class:`RateBudget` is the port; the
in-memory :class:`LocalRateBudget` is right for one process (the SQLite deployment), and a
shared PostgreSQL implementation can replace it for replicas without touching the client.

The local policy, per tenant, combines four rules; a call waits for the latest of them:

1. **Hard cap**: never more than ``per_minute`` grants in any sliding 60 s window
   (counted over 60 s plus a small margin, because Clopos timestamps a call when it
   arrives, a little after we grant it).
2. **Smooth spacing** (GCRA): one call per ``60 / per_minute`` s, with a small burst
   allowance so a handful of notifications arriving together are not serialised.
3. **Server guidance**: the ``RateLimit-Remaining`` of the latest response, minus what we
   granted since and a small reserve, is spread over the ``RateLimit-Reset`` seconds; at or
   below the reserve, calls wait for the reset. Clopos counts every replica and process, so
   this is what slows us down when someone else shares the tenant.
4. **Hold after a 429**: the whole tenant waits until ``now + max(Reset, Retry-After, 1)``.

**Across restarts**: Clopos counts the last minute whichever process made the calls, so a
process that started with a full budget right after a kill -9 sent into its predecessor's
full window and got 429s. With a :class:`SpendLedger` (the store), every grant is recorded
durably *before* the call goes out, with the limit then in force, and :meth:`restore` loads
the last minute of spend when the process starts: the hard cap, the spacing and a lower
limit announced by Clopos carry on where the dead process left them.

A budget shared by several processes at once (PostgreSQL replicas) implements the same
:class:`RateBudget` port over one database row per tenant; its ``restore`` has nothing to do.

Waiters are served first come, first served (one ``asyncio.Lock`` per tenant, which queues
FIFO). Time and sleeping are injected, so the policy is tested with a fake clock and
without real waiting.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from app.logs import get_logger
from app.store.base import TenantSpend

log = get_logger("app.clopos.budget")
WINDOW_SECONDS = 60.0
# Longest single sleep: a waiter re-checks at least this often, so a fresher server
# observation (more remaining after a reset) can let it go earlier than first computed.
_MAX_SLEEP_SECONDS = 2.0
# Float noise in the GCRA arithmetic must not turn into micro-sleeps.
_EPSILON_SECONDS = 1e-6


@dataclass(frozen=True)
class BudgetState:
    """A tenant's budget, for metrics and /readyz.

    ``remaining`` is the smaller of our own estimate and the server's (when fresh);
    ``held_until`` is on the budget's clock (``time.monotonic`` by default), ``None``
    when the tenant is not held after a 429.
    """

    limit: int
    remaining: int
    held_until: float | None
    calls_last_minute: int


class RateBudget(Protocol):
    """The budget port the Clopos client draws on."""

    async def acquire(self, tenant: str) -> None:
        """Return when one call for ``tenant`` may be sent now (waiting if needed)."""

    def observe(self, tenant: str, *, status: int, headers: Mapping[str, str]) -> None:
        """Feed back an authenticated response: its status and ``RateLimit-*`` headers."""

    def state(self) -> dict[str, BudgetState]:
        """The current state of every tenant seen so far."""

    async def restore(self) -> None:
        """Before the first call: take over what earlier processes spent."""


class SpendLedger(Protocol):
    """Where a budget keeps its spend for the next process (the store satisfies it)."""

    async def record_budget_spend(self, tenant: str, *, at: float, limit: int) -> None: ...

    async def budget_spend_since(self, since: float) -> dict[str, TenantSpend]: ...


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    """A non-negative number from a header, tolerant of case and junk (junk -> None)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    if value is None:
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None  # e.g. an HTTP-date Retry-After: Clopos sends seconds.
    if math.isnan(number) or math.isinf(number) or number < 0:
        return None
    return number


MAX_HOLD_SECONDS = 3600.0


def retry_after_seconds(headers: Mapping[str, str]) -> float:
    """How long a 429 asks us to wait: ``max(RateLimit-Reset, Retry-After, 1)`` seconds,
    capped at an hour: the windows are a minute long, and a broken header must not park
    the whole tenant for days."""
    candidates = [
        _header_number(headers, "RateLimit-Reset"),
        _header_number(headers, "Retry-After"),
    ]
    return min(MAX_HOLD_SECONDS, max([1.0, *(c for c in candidates if c is not None)]))


@dataclass
class _Tenant:
    """Per-tenant bookkeeping; every time here is on the budget's clock."""

    grants: deque[float] = field(default_factory=deque)
    tat: float = -math.inf  # GCRA "theoretical arrival time"
    last_grant: float = -math.inf
    held_until: float = -math.inf
    server_limit: int | None = None
    server_remaining: int | None = None
    server_reset_at: float = -math.inf
    granted_since_observation: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def forget_before(self, cutoff: float) -> None:
        while self.grants and self.grants[0] <= cutoff:
            self.grants.popleft()

    def server_left(self, now: float) -> int | None:
        """What the server said remains, minus our grants since; None when stale/unknown."""
        if self.server_remaining is None or self.server_reset_at <= now:
            return None
        return self.server_remaining - self.granted_since_observation


class LocalRateBudget:
    """Per-process :class:`RateBudget`, kept in memory and, given a ledger, in the store for
    the next process (see the module docstring for the policy)."""

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        burst: int | None = None,
        reserve_fraction: float = 0.02,
        window_margin: float = 0.5,
        ledger: SpendLedger | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` times the policy; ``wall_clock`` (epoch seconds) stamps what the
        ``ledger`` keeps, because the next process's monotonic clock starts elsewhere."""
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        # A few calls may go back to back; ~3 % of the minute's quota, 1..10.
        self._burst = burst if burst is not None else max(1, min(10, per_minute // 30))
        self._reserve_fraction = reserve_fraction
        self._window_margin = window_margin
        self._tenants: dict[str, _Tenant] = {}
        self._ledger = ledger
        self._wall_clock = wall_clock

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        return state

    def _limit(self, state: _Tenant) -> int:
        """Ours, or the server's when it announced a lower one."""
        if state.server_limit is not None and 0 < state.server_limit < self.per_minute:
            return state.server_limit
        return self.per_minute

    def _reserve(self, state: _Tenant) -> int:
        return max(1, round(self._limit(state) * self._reserve_fraction))

    # --- the pure policy ---------------------------------------------------------

    def wait_seconds(self, tenant: str) -> float:
        """How long a call for ``tenant`` would have to wait if asked now (0 = go)."""
        state = self._tenant(tenant)
        now = self._clock()
        state.forget_before(now - WINDOW_SECONDS - self._window_margin)
        limit = self._limit(state)
        ready_at = state.held_until
        if len(state.grants) >= limit:
            # Hard cap: the oldest counted grant must leave the (margined) window first.
            oldest = state.grants[len(state.grants) - limit]
            ready_at = max(ready_at, oldest + WINDOW_SECONDS + self._window_margin)
        interval = WINDOW_SECONDS / limit
        ready_at = max(ready_at, state.tat - (self._burst - 1) * interval)
        server_left = state.server_left(now)
        if server_left is not None:
            ready_at = max(ready_at, self._server_ready_at(state, server_left, now))
        wait = ready_at - now
        return wait if wait > _EPSILON_SECONDS else 0.0

    def _server_ready_at(self, state: _Tenant, server_left: int, now: float) -> float:
        """Spread what the server says remains over the time until its reset."""
        usable = server_left - self._reserve(state)
        if usable <= 0:
            return state.server_reset_at
        spacing = (state.server_reset_at - now) / usable
        return state.last_grant + spacing

    def _grant(self, state: _Tenant, now: float) -> None:
        interval = WINDOW_SECONDS / self._limit(state)
        state.grants.append(now)
        state.tat = max(state.tat, now) + interval
        state.last_grant = now
        state.granted_since_observation += 1

    # --- the port --------------------------------------------------------------------

    async def acquire(self, tenant: str) -> None:
        state = self._tenant(tenant)
        # The lock makes waiters queue FIFO; the head waits for its slot, the rest behind it.
        async with state.lock:
            while True:
                delay = self.wait_seconds(tenant)
                if delay <= 0:
                    self._grant(state, self._clock())
                    break
                await self._sleep(min(delay, _MAX_SLEEP_SECONDS))
        if self._ledger is not None:
            # Committed before the call goes out: a kill -9 right after sending must not
            # hide it from the next process. Outside the lock, so that the grants of
            # concurrent callers share one commit. If the write fails, the grant stays
            # counted here and the call is not made (the caller sees the StoreError).
            await self._ledger.record_budget_spend(
                tenant, at=self._wall_clock(), limit=self._limit(state)
            )

    async def restore(self) -> None:
        """Load the last minute of spend from the ledger, as grants on this clock."""
        if self._ledger is None:
            return
        wall_now, now = self._wall_clock(), self._clock()
        since = wall_now - WINDOW_SECONDS - self._window_margin
        for tenant, spend in (await self._ledger.budget_spend_since(since)).items():
            state = self._tenant(tenant)
            if 0 < spend.limit < self.per_minute:
                state.server_limit = spend.limit  # Clopos had announced a lower limit
            for at in spend.times:
                self._grant(state, now - max(0.0, wall_now - at))
            state.granted_since_observation = 0
            log.info(
                "budget.restored",
                tenant=tenant,
                calls_last_minute=len(spend.times),
                limit=self._limit(state),
            )

    def observe(self, tenant: str, *, status: int, headers: Mapping[str, str]) -> None:
        state = self._tenant(tenant)
        now = self._clock()
        limit = _header_number(headers, "RateLimit-Limit")
        remaining = _header_number(headers, "RateLimit-Remaining")
        reset = _header_number(headers, "RateLimit-Reset")
        if limit is not None and limit >= 1:
            state.server_limit = int(limit)
        if remaining is not None and reset is not None:
            state.server_remaining = int(remaining)
            state.server_reset_at = now + reset
            state.granted_since_observation = 0
        if status == 429:
            hold = now + retry_after_seconds(headers)
            state.held_until = max(state.held_until, hold)
            state.server_remaining = 0
            state.server_reset_at = max(state.server_reset_at, state.held_until)
            state.granted_since_observation = 0

    def state(self) -> dict[str, BudgetState]:
        now = self._clock()
        result: dict[str, BudgetState] = {}
        for name, state in self._tenants.items():
            limit = self._limit(state)
            last_minute = sum(1 for t in state.grants if t > now - WINDOW_SECONDS)
            remaining = max(0, limit - last_minute)
            server_left = state.server_left(now)
            if server_left is not None:
                remaining = min(remaining, max(0, server_left))
            held = state.held_until if state.held_until > now else None
            result[name] = BudgetState(
                limit=limit,
                remaining=remaining,
                held_until=held,
                calls_last_minute=last_minute,
            )
        return result
