"""Hydration from list pages: one Clopos call, up to a page of orders.

``GET /v2/orders`` with the receipt embedded returns the same order structure as
``GET /v2/orders/{id}`` (shared/clopos-api.md), and "a read after the notice satisfies
it" (product.md). So a page the poller reads anyway, or one the backlog reader reads on
purpose (app/backlog.py), hydrates every order on it without a detail call:

- each listed order becomes a :class:`~app.store.base.ListedState`: its content, the
  snapshot id that content has (the id a detail read of the same state gets), and a
  way to render the body with ``"hydrated_from": "order_list"``;
- the store applies the page :data:`APPLY_CHUNK` orders per transaction
  (``Store.apply_listed``), so webhooks' commits never wait behind a whole page: a new
  state (by content) is stored and delivered, as after a fetch; the order's notices
  received before the page was read are satisfied; coalescing, never-backwards, sinks
  and dead letters are the store's as for any fetch;
- what the page cannot decide (a fetch in flight, an operator's forced fetch, a dead
  job, two states of one second read in an order that cannot be told, an entry that is
  not a usable order) comes back as :attr:`PageResult.fallback`: those orders are left to
  be fetched one by one.

``HYDRATE_FROM_LIST=false`` turns this off (for list payloads that turn out to differ
from detail payloads): the poller then enqueues notices and every change is fetched.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from app.clopos.client import OrdersPage
from app.logs import get_logger
from app.poller import ListedOrder
from app.snapshot import render_listed, snapshot_key
from app.store.base import ListedResult, ListedState, Store

log = get_logger("app.list_hydration")
# A page decides these; the others are left to a fetch.
DECIDED = frozenset({"stored", "unchanged", "stale", "skipped"})
# Orders applied per store transaction. A whole page (up to a hundred orders) in one
# transaction held SQLite's single writer for 13-28 ms, and every webhook's 202 waited
# behind it: the ingest p99 under load (docs/performance.md). Each order's outcome stands
# alone, so nothing needs the page whole; a crash between chunks leaves the rest of the
# page to the next read or to a fetch, as if the page had never been read.
APPLY_CHUNK = 10


class ListObserver(Protocol):
    """Where list hydration is counted (app.metrics.Metrics satisfies it)."""

    def list_applied(self, brand: str, stored: int, satisfied: int, fallback: int) -> None: ...


@dataclass(frozen=True)
class PageResult:
    results: list[ListedResult] = field(default_factory=list)
    fallback: list[ListedOrder] = field(default_factory=list)  # to be fetched one by one

    @property
    def stored(self) -> int:
        return sum(1 for r in self.results if r.outcome == "stored")

    @property
    def satisfied(self) -> int:
        return sum(r.satisfied for r in self.results)


def listed_state(brand: str, order: ListedOrder, *, hydrated_at: float) -> ListedState | None:
    """The state a listed order stands for; None when it cannot stand for a fetch: no
    ``receipt`` key despite the embed (what a fetch would refuse too), or content that is
    not JSON (NaN: a fetch dead-letters it, with the reason)."""
    if "receipt" not in order.order:
        return None
    try:
        key = snapshot_key(brand, order.order_id, order.order)
    except ValueError:
        return None

    # A partial of a function of app.snapshot, not a closure: the state is sent to the
    # store's writer process, where the body is rendered (app/store/sqlite_writer.py),
    # and that module is light to import there.
    render = functools.partial(render_listed, key, brand, order.order_id, order.order, hydrated_at)
    return ListedState(order.order_id, order.venue_id, key, order.updated_at, render)


class ListHydrator:
    """Applies list pages to the store; shared by the poller and the backlog reader."""

    def __init__(
        self,
        *,
        store: Store,
        sinks: list[str],
        observer: ListObserver,
        on_stored: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._sinks = sinks
        self._observer = observer
        self._on_stored = on_stored
        self._clock = clock

    async def apply(
        self,
        brand: str,
        page: OrdersPage,
        orders: Sequence[ListedOrder],
        *,
        notified_only: bool = False,
    ) -> PageResult:
        """Apply the page's ``orders`` (read from ``page``) as of when it was read, a
        chunk of :data:`APPLY_CHUNK` orders per store transaction."""
        now = self._clock()
        result = PageResult()
        try:
            for start in range(0, len(orders), APPLY_CHUNK):
                chunk = orders[start : start + APPLY_CHUNK]
                await self._apply_chunk(brand, page, chunk, now, notified_only, result)
        finally:
            # A chunk that failed (the store) leaves the chunks before it committed:
            # they are logged, counted and their deliveries woken all the same. (The
            # caller reads the page again, so its fallbacks may be counted twice.)
            self._report(brand, page, result)
        return result

    def _report(self, brand: str, page: OrdersPage, result: PageResult) -> None:
        for item in result.results:
            if item.outcome == "stored":
                log.info(
                    "list_hydration.stored",
                    order_id=item.order_id,
                    version=item.version,
                    satisfied=item.satisfied,
                    page=page.page,
                )
        self._observer.list_applied(brand, result.stored, result.satisfied, len(result.fallback))
        if result.stored:
            self._on_stored()

    async def _apply_chunk(
        self,
        brand: str,
        page: OrdersPage,
        orders: Sequence[ListedOrder],
        now: float,
        notified_only: bool,
        into: PageResult,
    ) -> None:
        states: list[ListedState] = []
        for order in orders:
            state = listed_state(brand, order, hydrated_at=now)
            if state is None:
                into.fallback.append(order)
            else:
                states.append(state)
        results = await self._store.apply_listed(
            brand,
            states,
            self._sinks,
            read_at=page.requested_at,
            now=now,
            notified_only=notified_only,
        )
        by_id = {order.order_id: order for order in orders}
        into.fallback.extend(by_id[r.order_id] for r in results if r.outcome not in DECIDED)
        into.results.extend(results)
