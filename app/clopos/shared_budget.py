"""The tenant budget shared by every replica on one PostgreSQL database.

Clopos counts a tenant's calls centrally, so replicas must draw on one budget, not one
each. :class:`SharedRateBudget` implements the :class:`~app.clopos.budget.RateBudget`
port over one database row per tenant (``rate_budgets``, see
``app/store/migrations_pg/0004_rate_budgets.sql``):

* **Spacing and the hard cap**: GCRA, the theoretical arrival time updated atomically
  by one function call on the database's clock (``clock_timestamp()``). With interval
  ``T = (60 s + margin) / (limit - burst)`` no sliding minute ever holds more than
  ``limit`` calls, whichever replicas made them, poll calls included.
* **Server guidance and 429s**: every response's ``RateLimit-*`` headers and every 429's
  hold are written to the row, so one replica's 429 holds them all.
* The row lock lasts one statement; it is never held across an HTTP call. A waiting
  call sleeps in this process (at most 2 s at a time) and asks again.

Within one process, waiters still queue FIFO per tenant behind an ``asyncio.Lock``, as
in :class:`~app.clopos.budget.LocalRateBudget`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from app.clopos.budget import (
    WINDOW_SECONDS,
    BudgetState,
    _header_number,
    retry_after_seconds,
)
from app.errors import StoreError
from app.logs import get_logger

log = get_logger("app.clopos.shared_budget")
_MAX_SLEEP_SECONDS = 2.0
WINDOW_MARGIN_SECONDS = 0.5
RESERVE_FRACTION = 0.02


class BudgetRows(Protocol):
    """Where the shared rows live (the PostgreSQL store)."""

    async def take_rate_budget(
        self, tenant: str, *, limit: int, burst: int, margin: float, reserve_fraction: float
    ) -> float: ...

    async def observe_rate_budget(
        self,
        tenant: str,
        *,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        hold: float | None,
    ) -> None: ...


class SharedRateBudget:
    """:class:`~app.clopos.budget.RateBudget` for replicas: one row per tenant."""

    def __init__(
        self,
        rows: BudgetRows,
        per_minute: int,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._rows = rows
        self._burst = burst if burst is not None else max(1, min(10, per_minute // 30))
        self._clock = clock
        self._sleep = sleep
        self._locks: dict[str, asyncio.Lock] = {}
        # This replica's own view, for state(): its grants and the last hold it saw.
        self._grants: dict[str, deque[float]] = {}
        self._held_until: dict[str, float] = {}
        self._server_limit: dict[str, int] = {}
        self._writes: set[asyncio.Task[None]] = set()

    async def acquire(self, tenant: str) -> None:
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            while True:
                wait = await self._rows.take_rate_budget(
                    tenant,
                    limit=self.per_minute,
                    burst=self._burst,
                    margin=WINDOW_MARGIN_SECONDS,
                    reserve_fraction=RESERVE_FRACTION,
                )
                if wait <= 0:
                    self._grants.setdefault(tenant, deque()).append(self._clock())
                    return
                await self._sleep(min(wait, _MAX_SLEEP_SECONDS))

    def observe(self, tenant: str, *, status: int, headers: Mapping[str, str]) -> None:
        limit = _header_number(headers, "RateLimit-Limit")
        remaining = _header_number(headers, "RateLimit-Remaining")
        reset = _header_number(headers, "RateLimit-Reset")
        hold = retry_after_seconds(headers) if status == 429 else None
        if limit is not None and limit >= 1:
            self._server_limit[tenant] = int(limit)
        if hold is not None:
            self._held_until[tenant] = max(self._held_until.get(tenant, 0.0), self._clock() + hold)
        if limit is None and (remaining is None or reset is None) and hold is None:
            return
        # The port's observe is synchronous (it sits on the client's hot path); the row is
        # written in the background, and the next acquire of any replica reads it.
        task = asyncio.get_running_loop().create_task(
            self._write(
                tenant,
                limit=int(limit) if limit is not None and limit >= 1 else None,
                remaining=int(remaining) if remaining is not None else None,
                reset=reset if remaining is not None else None,
                hold=hold,
            )
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(
        self,
        tenant: str,
        *,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        hold: float | None,
    ) -> None:
        try:
            await self._rows.observe_rate_budget(
                tenant, limit=limit, remaining=remaining, reset=reset, hold=hold
            )
        except StoreError as error:
            # Lost guidance only: the spacing and the cap still hold on the row.
            log.warning("budget.observe_failed", tenant=tenant, error=str(error))

    async def restore(self) -> None:
        """Nothing to take over: the spend lives in the shared row already."""

    def state(self) -> dict[str, BudgetState]:
        """This replica's view: its own calls in the last minute, and the hold it saw."""
        now = self._clock()
        result: dict[str, BudgetState] = {}
        for tenant, grants in self._grants.items():
            while grants and grants[0] <= now - WINDOW_SECONDS:
                grants.popleft()
            limit = min(self.per_minute, self._server_limit.get(tenant, self.per_minute))
            held = self._held_until.get(tenant)
            result[tenant] = BudgetState(
                limit=limit,
                remaining=max(0, limit - len(grants)),
                held_until=held if held is not None and held > now else None,
                calls_last_minute=len(grants),
            )
        return result
