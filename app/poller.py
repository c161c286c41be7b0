"""The reconciliation poller: finds order changes by listing them, so none is missed.

Clopos's webhooks are not generally available yet (shared/clopos-api.md), and its advice
is to poll the list endpoint, newest first. So, besides the notifications it receives,
the service lists ``GET /v2/orders`` sorted by ``updated_at`` descending for every
configured brand, every ``POLL_INTERVAL_SECONDS``, and enqueues a notice
(``source="poller"``) for each listed order whose state is not the one stored:
compared by content (the snapshot id the listed order would get), because Clopos
stamps have whole seconds and two states in one second have equal ``updated_at``.
With list hydration on (``HYDRATE_FROM_LIST``, the default), the page itself is the
read: each new state on it is stored and delivered from the page
(app/list_hydration.py), and only what the page cannot decide becomes a notice. From a
notice on it is ordinary work: the hydration workers fetch the order as after a
webhook. A poll and a webhook for one change coalesce into one fetch, and a poll of a
state already stored enqueues nothing, so nothing is delivered twice.

**Watermark.** Per brand, a durable position: the newest ``updated_at`` the poller has
read. A cycle reads pages until it meets an order older than the watermark minus
:data:`SLACK_SECONDS`, then moves the watermark up. Clopos timestamps have whole
seconds, so an order changed in the same second as the watermark, but after the page
was read, has an ``updated_at`` *equal* to it: the slack re-reads those few seconds,
and the store's "already known" answer keeps that from costing fetches. In steady
state a cycle is one list call. The first poll of a brand looks back
``POLL_LOOKBACK_SECONDS``; later ones resume at the watermark, restarts included.

**Backlog.** When a cycle reaches ``POLL_MAX_PAGES`` before the watermark (a burst, or a
restart after downtime), the watermark stays where it is (moving it would skip the
pages not read) and the next cycle continues at the next page. Listing newest first,
pages only shift *down* while orders change (a changed order jumps to the top), so
continuing may re-read an order but does not skip one, as long as the list keeps its
order between calls (orders tied on the same second may be paged in any order by the
server: a known limit); the orders that jumped to the top are newer than the scan's
newest, and the next cycle after the scan sees them.
The cursor lives in memory: after a restart the scan starts over, and what it had
already enqueued comes back as duplicates (same dedup key), not as fetches.

The pure parts (:func:`scan_page`, :func:`changed_orders`, :func:`scan_complete`,
:func:`next_watermark`) decide; :class:`Poller` talks to Clopos and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from opentelemetry.trace import Tracer

from app import ids, tracing
from app.clopos.client import OrdersPage
from app.errors import (
    CloposCredentialsRejected,
    CloposError,
    CloposPermanentError,
    CloposRateLimited,
    CloposTransientError,
    CloposUnauthorized,
    StoreError,
)
from app.logs import get_logger
from app.snapshot import parse_clopos_time, snapshot_key
from app.store.base import KnownState, Notification, Store

if TYPE_CHECKING:  # app.list_hydration reads ListedOrder from here
    from app.list_hydration import ListHydrator

log = get_logger("app.poller")

# A stored ``updated_at`` more than this ahead of our clock is not trusted to order
# states (clock skew between Clopos and us stays well inside it).
FUTURE_TOLERANCE_SECONDS = 120.0

# Seconds re-read below the watermark on every cycle by default (POLL_SLACK_SECONDS):
# whole-second timestamps need a few; a change that becomes visible in the list some
# time after its updated_at (a slow commit, a till syncing late, clock skew) needs more.
# Re-reading costs no fetches: orders already stored are filtered out.
SLACK_SECONDS = 60.0
# Readiness: the last successful cycle may be this many intervals old, and at least...
STALE_INTERVALS = 5
# ...this many seconds (a short interval must not make readiness flap).
STALE_MIN_SECONDS = 300.0


# --- the pure parts ---------------------------------------------------------------------


@dataclass(frozen=True)
class ListedOrder:
    """One listed order: what the poller reads of it, and the order object verbatim
    (its content is what tells one state from another)."""

    order_id: int
    venue_id: str | None
    updated_at: float
    order: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def state_key(self, brand: str) -> str:
        """The snapshot id this listed state has: the id hydration gives the same content."""
        return snapshot_key(brand, self.order_id, self.order)


@dataclass(frozen=True)
class PageScan:
    """One page, read against the floor (the watermark minus the slack)."""

    candidates: list[ListedOrder]  # at or above the floor; newest listed state per order
    newest: float | None  # the newest updated_at on the page
    reached_floor: bool  # an order older than the floor: everything newer has been read
    unusable: int  # orders without a usable id or updated_at (skipped)


@dataclass(frozen=True)
class Cursor:
    """Where a scan stands: the next page, the floor it reads down to, and the newest
    ``updated_at`` read so far (the watermark once the scan completes)."""

    page: int
    floor: float
    newest: float | None = None


def parse_listed(order: Any) -> ListedOrder | None:
    """The id, venue and ``updated_at`` of a listed order; None if any is unusable."""
    if not isinstance(order, dict):
        return None
    order_id = ids.parse_order_id(order.get("id"))  # as the webhook route accepts it
    if order_id is None:
        return None
    updated_at = parse_clopos_time(order.get("updated_at"))
    if updated_at is None:
        return None
    # An unusable venue is dropped (the token's default venue is fetched), never sent on
    # in an x-venue header.
    venue_id = ids.parse_venue_id(order.get("venue_id"))
    return ListedOrder(order_id, venue_id, updated_at, order)


def scan_page(orders: Sequence[Any], floor: float) -> PageScan:
    """Which orders of a page may be new (at or above ``floor``), and whether the page
    reached below it (sorted newest first, nothing after that can be newer)."""
    candidates: dict[int, ListedOrder] = {}
    newest: float | None = None
    reached = False
    unusable = 0
    for raw in orders:
        order = parse_listed(raw)
        if order is None:
            unusable += 1
            continue
        newest = order.updated_at if newest is None else max(newest, order.updated_at)
        if order.updated_at < floor:
            reached = True
            continue
        seen = candidates.get(order.order_id)
        if seen is None or order.updated_at > seen.updated_at:
            candidates[order.order_id] = order
    return PageScan(list(candidates.values()), newest, reached, unusable)


def is_new_state(
    listed_key: str, updated_at: float, stored: KnownState | None, *, now: float
) -> bool:
    """Whether a listed state may be one the store has not seen: compared by content
    (the snapshot id), not by clock. Clopos stamps have whole seconds, so a second
    change within the second of the stored state has an *equal* ``updated_at`` and only
    its content tells it apart. A listed stamp older than the stored one is an older
    state (the list lagging behind a fetch), not a change, unless the stored stamp lies
    ahead of our clock: a stamp in the future proves nothing about order, and trusting
    it would hide every honest change after it (the hydration then compares content:
    a lagging state it already stored is "stale" and delivers nothing)."""
    if stored is None or stored.key is None:
        return True
    if stored.key == listed_key:
        return False
    if stored.updated_at is None or stored.updated_at > now + FUTURE_TOLERANCE_SECONDS:
        return True
    return updated_at >= stored.updated_at


def changed_orders(
    brand: str, candidates: Sequence[ListedOrder], known: dict[int, KnownState], *, now: float
) -> list[ListedOrder]:
    """The candidates whose listed state is not the stored one, nor older than it."""
    return [
        order
        for order in candidates
        if is_new_state(
            order.state_key(brand), order.updated_at, known.get(order.order_id), now=now
        )
    ]


def scan_complete(scan: PageScan, *, returned: int) -> bool:
    """Whether the scan has read everything down to its floor: the page went below it,
    or the list ended (an empty page). Neither a short page nor the total is trusted:
    Clopos documents different page-size caps on different pages, and a server paging
    by 50 while we ask for 100 would otherwise end a scan after half of what it had.
    The cost is one empty page at the very end of a list, which is rare."""
    return scan.reached_floor or returned == 0


def next_watermark(
    current: float | None, newest: float | None, *, floor: float, now: float
) -> float:
    """The watermark after a complete scan down to ``floor``: the newest ``updated_at``
    read (or the floor, when nothing newer was listed: a first poll that found nothing
    must still remember how far back it read, and one that found only older orders
    must not move the next scan below its lookback), never backwards, and never ahead
    of our clock: one order stamped in the future (bad data, a skewed clock) must not
    make every later change look old."""
    reached = floor if newest is None else max(newest, floor)
    candidate = min(reached, now)
    return candidate if current is None else max(current, candidate)


def _newer(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return b if a is None else a
    return max(a, b)


def dedup_key(brand: str, order: ListedOrder) -> str:
    """One key per listed state (by content): a second poll of the same state is a
    duplicate, a second state in the same whole second is not. Where list payloads
    differ from detail payloads (HYDRATE_FROM_LIST=false), this is also what bounds the
    cost of comparing them: one fetch per listed state, not one per poll."""
    return f"poll:{order.order_id}:{order.state_key(brand)}"


def stale_after(interval: float) -> float:
    """How old the last successful cycle may be before readiness says so."""
    return max(STALE_INTERVALS * interval, STALE_MIN_SECONDS)


def outcome_of(exc: CloposError) -> str:
    """The metrics/log outcome of a failed cycle (most specific class first)."""
    if isinstance(exc, CloposRateLimited):
        return "rate_limited"
    if isinstance(exc, CloposCredentialsRejected):
        return "credentials_rejected"
    if isinstance(exc, CloposUnauthorized):
        return "unauthorized"
    if isinstance(exc, CloposTransientError):
        return "transient"
    if isinstance(exc, CloposPermanentError):
        return "rejected"
    return "error"


# --- the mechanism ------------------------------------------------------------------------


class OrderLister(Protocol):
    """What polling needs from Clopos (satisfied by app.clopos.CloposClient)."""

    async def list_orders(
        self,
        *,
        page: int = 1,
        limit: int = 50,
        sort_by: str = "updated_at",
        descending: bool = True,
        with_receipt: bool = True,
    ) -> OrdersPage: ...


class PollObserver(Protocol):
    """Where cycles are counted (app.metrics.Metrics satisfies it)."""

    def poll_finished(self, brand: str, outcome: str, enqueued: int) -> None: ...


@dataclass
class PollStatus:
    """What readiness, /metrics and /admin/status show of one brand's polling."""

    watermark: float | None = None
    last_success_at: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    # While the brand is paused the poller does not poll: readiness must not call that stale.
    last_paused_at: float | None = None
    backlog_page: int | None = None  # the next page of an unfinished scan
    # One process polls a brand among all sharing the store (PostgreSQL replicas): the
    # holder's name, and whether it is this process.
    holder: str | None = None
    leading: bool = True
    lead_since: float | None = None


@dataclass(frozen=True)
class Cycle:
    outcome: str  # ok, partial (backlog: continues next cycle), or a failure (outcome_of)
    enqueued: int = 0
    pages: int = 0
    retry_after: float = 0.0
    hydrated: int = 0  # new states stored straight from the pages (list hydration)


@dataclass
class _Progress:
    """Counted while a cycle runs, so a failure still reports what it did."""

    pages: int = 0
    enqueued: int = 0
    duplicates: int = 0
    unusable: int = 0
    hydrated: int = 0


class Poller:
    """Polls every configured brand, each in its own loop, until stopped."""

    def __init__(
        self,
        *,
        store: Store,
        listers: dict[str, OrderLister],
        interval: float,
        page_size: int,
        max_pages: int,
        lookback: float,
        is_paused: Callable[[str], bool],
        slack: float = SLACK_SECONDS,
        on_credentials_rejected: Callable[[str, CloposError], None],
        on_enqueued: Callable[[], None],
        observer: PollObserver,
        from_list: ListHydrator | None = None,
        clock: Callable[[], float] = time.time,
        tracer: Tracer | None = None,
    ) -> None:
        """``from_list``: hydrate changed orders from the pages (HYDRATE_FROM_LIST);
        without it, a changed order is a notice and the hydration workers fetch it."""
        self._tracer = tracer  # None unless tracing is on
        self._store = store
        self._from_list = from_list
        self._listers = listers
        self.interval = interval
        self._page_size = page_size
        self._max_pages = max_pages
        self._lookback = lookback
        self._slack = slack
        self._is_paused = is_paused
        self._on_credentials_rejected = on_credentials_rejected
        self._on_enqueued = on_enqueued
        self._observer = observer
        self._clock = clock
        self._cursors: dict[str, Cursor] = {}
        self._status: dict[str, PollStatus] = {brand: PollStatus() for brand in listers}
        self._stop = asyncio.Event()
        self.started_at = clock()
        self.alive = False

    # --- observation ---

    def status(self, brand: str) -> PollStatus:
        return self._status[brand]

    def readiness(self, brand: str) -> tuple[bool, str]:
        """(ok, detail): stale when no cycle succeeded for :func:`stale_after` seconds.
        A paused brand is not polled and not stale: its credentials check says why."""
        status = self._status[brand]
        now = self._clock()
        if self._is_paused(brand):
            return True, "not polling while the brand is paused"
        if not status.leading:
            # Another replica polls it; its own readiness says how that goes.
            return True, f"polled by {status.holder or 'another replica (taking over)'}"
        marks = (self.started_at, status.last_success_at, status.last_paused_at, status.lead_since)
        since = max(mark for mark in marks if mark is not None)
        limit = stale_after(self.interval)
        if now - since > limit:
            error = f": {status.last_outcome} {status.last_error}" if status.last_error else ""
            return False, f"no successful poll for {now - since:.0f}s (> {limit:.0f}s){error}"
        # Which process polls it: on PostgreSQL the fleet's readiness names the holder.
        here = f" (polled by {status.holder})" if status.holder else ""
        if status.last_success_at is None:
            return True, f"no poll finished yet{here}"
        return True, f"last poll {now - status.last_success_at:.0f}s ago{here}"

    # --- the loop ---

    async def run(self) -> None:
        """One loop per brand, concurrently, so a slow brand never delays another."""
        self.started_at = self._clock()
        self.alive = True
        try:
            await asyncio.gather(*(self._brand_loop(brand) for brand in self._listers))
        finally:
            self.alive = False

    def stop(self) -> None:
        self._stop.set()

    async def _brand_loop(self, brand: str) -> None:
        while not self._stop.is_set():
            wait = self.interval
            if self._is_paused(brand):
                # Listing would only be refused again; the pause's own probe resumes it.
                self._status[brand].last_paused_at = self._clock()
            elif not await self._lead(brand):
                pass  # another replica polls this brand; ask again next interval
            else:
                cycle = await self.cycle(brand)
                wait = max(self.interval, cycle.retry_after)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=wait)

    async def _lead(self, brand: str) -> bool:
        """Whether this process polls ``brand`` now (one poller per brand across replicas;
        a dead holder's brand is taken over at the next interval)."""
        status = self._status[brand]
        try:
            lead = await self._store.lead_poller(brand)
        except StoreError as exc:
            log.warning("poller.lead_unknown", brand=brand, error=str(exc))
            return False
        if lead.leading and (not status.leading or status.lead_since is None):
            # Polling starts (or is taken over) now: staleness counts from here.
            status.lead_since = self._clock()
        status.holder, status.leading = lead.holder, lead.leading
        return lead.leading

    async def cycle(self, brand: str) -> Cycle:
        """One cycle of one brand, never raising: its outcome is logged and counted."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(brand=brand)
        progress = _Progress()
        started = time.monotonic()
        try:
            cycle = await self._poll(brand, progress)
        except CloposError as exc:
            cycle = self._failed(brand, outcome_of(exc), exc.describe(), progress)
            if isinstance(exc, CloposCredentialsRejected):
                self._on_credentials_rejected(brand, exc)
            if isinstance(exc, CloposRateLimited):
                cycle = Cycle(
                    cycle.outcome, cycle.enqueued, cycle.pages, exc.retry_after, cycle.hydrated
                )
        except StoreError as exc:
            cycle = self._failed(brand, "store_error", str(exc), progress)
        except Exception as exc:
            # Supervisor boundary: a bug met in one cycle (an answer shape nobody foresaw)
            # must not end polling for every brand; it is logged with its traceback and
            # counted, and the next cycle tries again.
            log.exception("poller.cycle_crashed", pages=progress.pages)
            cycle = self._failed(brand, "crashed", f"{type(exc).__name__}: {exc}", progress)
        self._observer.poll_finished(brand, cycle.outcome, cycle.enqueued)
        if cycle.enqueued:
            self._on_enqueued()
        self._log_cycle(cycle, progress, time.monotonic() - started)
        return cycle

    def _failed(self, brand: str, outcome: str, error: str, progress: _Progress) -> Cycle:
        status = self._status[brand]
        status.last_outcome, status.last_error = outcome, error
        # Also the number of the page that failed: the next cycle continues there.
        status.backlog_page = self._cursors[brand].page if brand in self._cursors else None
        return Cycle(outcome, progress.enqueued, progress.pages, hydrated=progress.hydrated)

    def _log_cycle(self, cycle: Cycle, progress: _Progress, elapsed: float) -> None:
        status_fields = {
            "outcome": cycle.outcome,
            "pages": progress.pages,
            "enqueued": progress.enqueued,
            "hydrated": progress.hydrated,
            "duplicates": progress.duplicates or None,
            "unusable": progress.unusable or None,
            "duration_ms": round(elapsed * 1000, 1),
        }
        if cycle.outcome not in ("ok", "partial"):
            log.warning("poller.cycle_failed", **status_fields)
        elif cycle.enqueued or cycle.hydrated or cycle.outcome == "partial" or progress.unusable:
            log.info("poller.cycle", **status_fields)
        else:
            # The steady state (nothing new, one call) every interval: not worth a line.
            log.debug("poller.cycle", **status_fields)

    async def _poll(self, brand: str, progress: _Progress) -> Cycle:
        """Read pages from the cursor until the scan completes or the page cap is hit."""
        now = self._clock()
        status = self._status[brand]
        cursor = self._cursors.get(brand) or await self._fresh_cursor(brand, now)
        while True:
            page = await self._listers[brand].list_orders(
                page=cursor.page,
                limit=self._page_size,
                sort_by="updated_at",
                descending=True,
                # With the receipt, as a fetch would have it: a listed state then has the
                # content, and so the id, its fetch would give (receipt changes included).
                with_receipt=True,
            )
            progress.pages += 1
            scan = scan_page(page.orders, cursor.floor)
            progress.unusable += scan.unusable
            if page.orders and scan.unusable == len(page.orders):
                # Nothing on it can be read (an answer shape we do not know): reading on
                # would walk the whole history and report success while seeing nothing.
                raise CloposPermanentError(
                    f"none of the {len(page.orders)} listed orders has a usable id and updated_at"
                )
            await self._take_page(brand, page, scan.candidates, now, progress)
            cursor = Cursor(cursor.page + 1, cursor.floor, _newer(cursor.newest, scan.newest))
            # From here on, an error (or the page cap) continues after this page.
            self._cursors[brand] = cursor
            if scan_complete(scan, returned=len(page.orders)):
                await self._finish_scan(brand, cursor, now)
                self._succeeded(status, "ok", now)
                return Cycle("ok", progress.enqueued, progress.pages, hydrated=progress.hydrated)
            if progress.pages >= self._max_pages:
                status.backlog_page = cursor.page
                self._succeeded(status, "partial", now)
                return Cycle(
                    "partial", progress.enqueued, progress.pages, hydrated=progress.hydrated
                )

    async def _finish_scan(self, brand: str, cursor: Cursor, now: float) -> None:
        """Move the watermark to what the scan read; only then forget the cursor, so a
        store failure here costs one page past the end next cycle, not a whole re-scan."""
        status = self._status[brand]
        watermark = next_watermark(status.watermark, cursor.newest, floor=cursor.floor, now=now)
        if watermark != status.watermark:
            status.watermark = await self._store.set_poll_watermark(brand, watermark, now=now)
        self._cursors.pop(brand, None)
        status.backlog_page = None

    @staticmethod
    def _succeeded(status: PollStatus, outcome: str, now: float) -> None:
        status.last_success_at = now
        status.last_outcome = outcome
        status.last_error = None

    async def _fresh_cursor(self, brand: str, now: float) -> Cursor:
        """A scan from page 1 down to the watermark (read from the store: it survives
        restarts), or down to the lookback on a brand's very first poll."""
        watermark = await self._store.get_poll_watermark(brand)
        self._status[brand].watermark = watermark
        # The slack applies to the lookback too: an order changed a moment ago carries
        # the whole second before it, which can be earlier than ``now - lookback``.
        start = now - self._lookback if watermark is None else watermark
        return Cursor(page=1, floor=start - self._slack)

    async def _take_page(
        self,
        brand: str,
        page: OrdersPage,
        candidates: list[ListedOrder],
        now: float,
        progress: _Progress,
    ) -> None:
        """Hydrate the page's new states from it (list hydration on), enqueueing only
        what the page could not decide; or enqueue every new state (list hydration off)."""
        if not candidates:
            return
        if self._from_list is not None:
            applied = await self._from_list.apply(brand, page, candidates)
            progress.hydrated += applied.stored
            changed = applied.fallback
        else:
            known = await self._store.known_states(brand, [o.order_id for o in candidates])
            changed = changed_orders(brand, candidates, known, now=now)
        if not changed:
            return
        # One transaction and one commit for the whole page, not one per order.
        traceparents = tracing.found_by_poller(
            self._tracer, brand, [order.order_id for order in changed]
        )
        notices = [
            Notification(
                brand=brand,
                order_id=order.order_id,
                received_at=now,
                venue_id=order.venue_id,
                dedup_key=dedup_key(brand, order),
                source="poller",
                traceparent=traceparent,
            )
            for order, traceparent in zip(changed, traceparents, strict=True)
        ]
        results = await self._store.enqueue_many(notices)
        for order, result in zip(changed, results, strict=True):
            if result.duplicate:
                progress.duplicates += 1
                continue
            progress.enqueued += 1
            log.info(
                "poller.order_changed",
                order_id=order.order_id,
                updated_at=order.updated_at,
                job_id=result.job_id,
                notification_id=result.notification_id,
                coalesced=result.coalesced,
            )
