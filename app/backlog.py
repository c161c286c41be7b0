"""Backlog mode: when notices outrun the budget, read recent changes a page at a time.

One detail call hydrates one order, so a brand's budget (300 calls a minute by default)
caps hydration at that many orders a minute. A list page with the receipt embedded
carries up to a page of orders in one call, and "a read after the notice satisfies it"
(product.md). So, per brand, about once a second:

1. **Is there a backlog?** The brand's due hydration jobs are counted per venue
   (``Store.due_by_venue``). When they exceed what ``BACKLOG_HORIZON_SECONDS`` of the
   budget can fetch one by one, a cycle runs; otherwise the workers fetch one by one.
2. **Read pages.** For each venue (most due jobs first; the token's default venue, or
   ``x-venue``), ``GET /v2/orders`` sorted by ``updated_at`` descending, receipt
   embedded, page after page, until a page lists an order older than the venue's oldest
   due notice minus ``BACKLOG_SLACK_SECONDS`` (a change happens before its notice
   arrives; the slack allows for clock skew and a notice that trails its change) and
   satisfied no notice (while pages past that point still satisfy some, notices trail
   their changes by more than the slack, and the next page may hold more), or the list
   ends. The venues share ``BACKLOG_MAX_PAGES`` per cycle. While the brand is
   in backlog mode, the hydration workers leave its due jobs alone (:attr:`holding`):
   the budget is not spent twice on them, and detail calls do not queue for the budget
   ahead of the pages. The hold ends when the backlog does, when a cycle fails or rests
   (below), or when jobs notified before a cycle's first page are still due after it
   (the pages did not show them): then the workers fetch those, oldest first, and the
   next cycle holds again.
3. **Apply each page** (app/list_hydration.py, ``notified_only``): every pending job
   whose order is on a page read after its notices were received is satisfied by that
   page; a new state is stored and delivered. Notices received after the page was read
   keep their job due.
4. **The rest** (orders the pages did not show: changed long before their notice, or in
   a venue that cannot be listed) is fetched one by one by the workers, as without
   backlog mode.

Spending the budget where it carries most orders: a venue with fewer than
:data:`MIN_DUE_FOR_A_PAGE` due jobs gets no list call (a detail call is as cheap), and a
cycle whose pages satisfied fewer than :data:`MIN_ORDERS_PER_PAGE` orders each rests the
brand's backlog mode for one horizon (what waits is then not on the pages; the workers
fetch it). A venue whose list Clopos refuses (a 4xx) is not listed again for
:data:`UNLISTABLE_SECONDS`: its jobs fall back to detail calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Protocol

import structlog

from app.clopos.client import OrdersPage
from app.errors import (
    CloposCredentialsRejected,
    CloposError,
    CloposNotFound,
    CloposPermanentError,
    StoreError,
)
from app.list_hydration import ListHydrator
from app.logs import get_logger
from app.poller import outcome_of, parse_listed, scan_complete, scan_page
from app.store.base import Store, VenueBacklog

log = get_logger("app.backlog")

TICK_SECONDS = 1.0
MIN_DUE_FOR_A_PAGE = 2
MIN_ORDERS_PER_PAGE = 2.0
UNLISTABLE_SECONDS = 600.0


class VenueLister(Protocol):
    """What backlog mode needs from Clopos (satisfied by app.clopos.CloposClient)."""

    async def list_orders(
        self,
        *,
        page: int = 1,
        limit: int = 50,
        sort_by: str = "updated_at",
        descending: bool = True,
        status: str | None = None,
        date_from: date | str | None = None,
        date_to: date | str | None = None,
        with_receipt: bool = True,
        venue_id: str | None = None,
    ) -> OrdersPage: ...


def backlog_threshold(per_minute: int, horizon: float) -> float:
    """Due jobs the budget fetches one by one within ``horizon`` seconds."""
    return per_minute / 60.0 * horizon


def worth_listing(groups: list[VenueBacklog], threshold: float) -> bool:
    """Whether the due work exceeds the horizon's budget and a venue can use a page."""
    return sum(g.due for g in groups) > threshold and any(
        g.due >= MIN_DUE_FOR_A_PAGE for g in groups
    )


@dataclass
class BacklogCycle:
    outcome: str  # idle, listed, resting, or a failure (rate_limited, transient, ...)
    pages: int = 0
    satisfied: int = 0
    stored: int = 0
    venues: int = 0
    first_read_at: float | None = None  # when the cycle's first page was read


@dataclass
class BacklogStatus:
    """What /admin/status shows of one brand's backlog mode."""

    last_cycle_at: float | None = None
    last_outcome: str | None = None
    last_pages: int = 0
    last_satisfied: int = 0
    cycles: int = 0  # cycles that read pages
    resting_until: float | None = None


class BacklogReader:
    """Runs backlog mode for every configured brand, each in its own loop."""

    def __init__(
        self,
        *,
        store: Store,
        listers: dict[str, VenueLister],
        from_list: ListHydrator,
        per_minute: int,
        horizon: float,
        max_pages: int,
        page_size: int,
        slack: float,
        is_paused: Callable[[str], bool],
        on_credentials_rejected: Callable[[str, CloposError], None],
        on_cycle_end: Callable[[], None],
        clock: Callable[[], float] = time.time,
        tick: float = TICK_SECONDS,
    ) -> None:
        self._store = store
        self._listers = listers
        self._from_list = from_list
        self._threshold = backlog_threshold(per_minute, horizon)
        self._horizon = horizon
        self._max_pages = max_pages
        self._page_size = page_size
        self._slack = slack
        self._is_paused = is_paused
        self._on_credentials_rejected = on_credentials_rejected
        self._on_cycle_end = on_cycle_end
        self._clock = clock
        self._tick = tick
        self._unlistable: dict[tuple[str, str | None], float] = {}
        self._status = {brand: BacklogStatus() for brand in listers}
        # Brands in backlog mode: the workers do not claim their due jobs meanwhile.
        self.holding: set[str] = set()
        self._stop = asyncio.Event()
        self.alive = False

    def status(self, brand: str) -> BacklogStatus:
        return self._status[brand]

    async def run(self) -> None:
        self.alive = True
        try:
            await asyncio.gather(*(self._brand_loop(brand) for brand in self._listers))
        finally:
            self.alive = False

    def stop(self) -> None:
        self._stop.set()

    async def _brand_loop(self, brand: str) -> None:
        while not self._stop.is_set():
            if self._is_paused(brand):
                self.holding.discard(brand)
            else:
                await self.cycle(brand)
            # Held, the pages are the only way its jobs move: look again soon.
            tick = self._tick / 4 if brand in self.holding else self._tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=tick)
        self.holding.discard(brand)

    async def cycle(self, brand: str) -> BacklogCycle:
        """One look at the brand's due work, and a listing cycle if it is a backlog.
        Never raises: failures are logged, and the workers fetch one by one meanwhile."""
        now = self._clock()
        status = self._status[brand]
        if status.resting_until is not None and now < status.resting_until:
            self.holding.discard(brand)
            return BacklogCycle("resting")
        try:
            groups = await self._store.due_by_venue(brand, now=now)
        except StoreError as exc:
            self.holding.discard(brand)
            log.error("backlog.store_error", brand=brand, error=str(exc))
            return BacklogCycle("store_error")
        if not worth_listing(groups, self._threshold):
            if brand in self.holding:
                self.holding.discard(brand)
                self._on_cycle_end()
            return BacklogCycle("idle")
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(brand=brand)
        self.holding.add(brand)
        cycle = BacklogCycle("listed")
        started = time.monotonic()
        try:
            await self._read(brand, groups, cycle)
            if not await self._keep_holding(brand, cycle):
                self.holding.discard(brand)
        except CloposError as exc:
            cycle.outcome = outcome_of(exc)
            if isinstance(exc, CloposCredentialsRejected):
                self._on_credentials_rejected(brand, exc)
            log.warning("backlog.cycle_failed", error=exc.describe(), pages=cycle.pages)
        except StoreError as exc:
            cycle.outcome = "store_error"
            log.error("backlog.cycle_failed", error=str(exc), pages=cycle.pages)
        finally:
            if cycle.outcome != "listed":
                self.holding.discard(brand)
            if brand not in self.holding:
                self._on_cycle_end()
        self._finished(brand, cycle, now)
        (log.info if cycle.pages else log.debug)(
            "backlog.cycle",
            outcome=cycle.outcome,
            due=sum(g.due for g in groups),
            venues=cycle.venues,
            pages=cycle.pages,
            satisfied=cycle.satisfied,
            stored=cycle.stored,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return cycle

    def _finished(self, brand: str, cycle: BacklogCycle, now: float) -> None:
        status = self._status[brand]
        status.last_cycle_at, status.last_outcome = now, cycle.outcome
        status.last_pages, status.last_satisfied = cycle.pages, cycle.satisfied
        status.cycles += 1 if cycle.pages else 0
        thin = cycle.satisfied < MIN_ORDERS_PER_PAGE * cycle.pages
        # What still waits is not on the pages, no venue could be listed, or listing
        # failed: the workers fetch it one by one.
        rest = thin or not cycle.pages or cycle.outcome != "listed"
        status.resting_until = now + self._horizon if rest else None

    async def _keep_holding(self, brand: str, cycle: BacklogCycle) -> bool:
        """Whether the workers should keep leaving the brand to the pages: not when the
        pages were thin, and not when jobs notified before the first page are still due
        (the pages did not show their orders: they are fetched one by one, now)."""
        if cycle.first_read_at is None or cycle.satisfied < MIN_ORDERS_PER_PAGE * cycle.pages:
            return False
        groups = await self._store.due_by_venue(brand, now=self._clock())
        return bool(groups) and all(g.oldest_received_at >= cycle.first_read_at for g in groups)

    async def _read(self, brand: str, groups: list[VenueBacklog], cycle: BacklogCycle) -> None:
        pages_left = self._max_pages
        for group in groups:
            if pages_left <= 0 or group.due < MIN_DUE_FOR_A_PAGE:
                break  # largest first: the rest are smaller
            if not self._listable(brand, group.venue_id):
                continue
            cycle.venues += 1
            try:
                pages_left -= await self._read_venue(brand, group, pages_left, cycle)
            except (CloposPermanentError, CloposNotFound) as exc:
                # This venue cannot be listed (a 4xx): its jobs fall back to detail calls.
                until = self._clock() + UNLISTABLE_SECONDS
                self._unlistable[(brand, group.venue_id)] = until
                log.warning(
                    "backlog.venue_unlistable", venue_id=group.venue_id, error=exc.describe()
                )

    def _listable(self, brand: str, venue_id: str | None) -> bool:
        until = self._unlistable.get((brand, venue_id))
        return until is None or self._clock() >= until

    async def _read_venue(
        self, brand: str, group: VenueBacklog, budget: int, cycle: BacklogCycle
    ) -> int:
        """Read one venue's pages down to its floor; return the pages read."""
        floor = group.oldest_received_at - self._slack
        lister = self._listers[brand]
        for number in range(1, budget + 1):
            page = await lister.list_orders(
                page=number,
                limit=self._page_size,
                sort_by="updated_at",
                descending=True,
                with_receipt=True,
                venue_id=group.venue_id,
            )
            cycle.pages += 1
            if cycle.first_read_at is None:
                cycle.first_read_at = page.requested_at
            scan = scan_page(page.orders, floor)
            # Every order on the page, below the floor too: its state was read after
            # any notice received before the page, wherever its stamp is.
            on_page = {o.order_id: o for o in map(parse_listed, page.orders) if o is not None}
            result = await self._from_list.apply(
                brand, page, list(on_page.values()), notified_only=True
            )
            cycle.satisfied += result.satisfied
            cycle.stored += result.stored
            # Past the floor, read on while pages still satisfy notices: those notices
            # trailed their changes by more than the slack, and so may the next ones.
            if not page.orders or (scan_complete(scan, returned=1) and not result.satisfied):
                return number
        return budget
