"""The store port: the narrow interface every durable backend implements.

Two queues live behind it, both durable and leased:

* **hydration jobs**: one row per ``(brand, order_id)``. Notifications for an order
  that is waiting are coalesced into that one job (its ``generation`` goes up); a
  notification that arrives while the job is being fetched makes the job due again
  when the fetch completes, so it causes exactly one more fetch.
* **deliveries**: one row per (snapshot, sink). Per sink and order at most one delivery
  is in flight, and a sink never receives an older state after a newer one, even when
  an outcome is unknown (a timeout may have landed): once any version of a (sink,
  order) has been *attempted* (claimed for sending, whatever came of it), every older
  version of that (sink, order) is superseded, never sent again, also on replay.

Failures that end in **dead letters**, which keep the reason, the last error and
the attempts, and can be replayed (as a re-hydration or a re-delivery) or purged.
A later success resolves them: a successful hydration of the order deletes its
hydration letters, and a delivered version deletes the sink's delivery letters of
that order up to that version (a replay of those would be superseded anyway).

The reconciliation poller (app/poller.py) keeps one durable **watermark** per brand
(how far its reading of Clopos's change list has got) and asks which listed order
states are already stored (by content: snapshot id), so that polling a state twice
fetches it once, and a second state within one whole second is still seen.

Claims are safe under concurrency on any backend: several claimers (tasks, threads,
replicas) may race for the same work, and each item goes to one of them. A backend
must not rely on running statements one at a time for this: a claim changes an item
only if it is still claimable (pending and due, or running on a lease that ran out;
for a delivery also no sibling in flight and no newer version attempted).

Every mutating call that takes a claimed record checks its ``lease_token``: if the
lease expired and someone else claimed the record meanwhile, the call returns False
and changes nothing (the other claimant's outcome wins). Running work extends its
lease (``extend_*_lease``) so a slow fetch or send keeps it.

**Attempts are counted when work is claimed**, not when it ends, so an attempt that
ends with no outcome (the process died, the lease ran out) still counts. An outcome
that is no failure (a 429, a paused brand, a not-found on its own counter, a release
at shutdown) gives the attempt back. Claims that end with nothing recorded are *lost
leases*; after ``max_lost_leases`` of them in a row, the next claim ends the work in a
dead letter (reason ``lease_lost``) instead of trying it forever.

The decisions behind these semantics are pure functions in :mod:`app.store.rules`
(tested without a database); a backend reads what a rule needs, applies it and writes
the result.

Times are epoch seconds (float) passed in by the caller, so tests can drive a clock.
Implementations raise :class:`~app.errors.StoreError` for any failure, whatever the
backend or the argument binding throws (an id too large for the backend included);
nothing backend-specific leaks out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

DeadLetterKind = Literal["hydration", "delivery"]
WorkKind = Literal["hydration", "delivery"]
ReplayMode = Literal["auto", "hydrate", "deliver"]

# Lost leases in a row (claims that ended with nothing recorded) that end work in a
# dead letter with this reason; MAX_LOST_LEASES in the settings.
DEFAULT_MAX_LOST_LEASES = 3
LEASE_LOST = "lease_lost"
# An enqueue that has no answer within this raises StoreError (the webhook answers 503
# and the sender retries). If it commits later anyway, the retry coalesces or is
# recognised as a duplicate: nothing doubles.
ENQUEUE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Notification:
    """One inbound "order changed" notice, as it is stored."""

    brand: str
    order_id: int
    received_at: float
    venue_id: str | None = None
    # Sender-given message id (webhook-id / Idempotency-Key): exact repeats are dropped.
    # A repeat is the same (brand, dedup_key, order_id); the same id for another order
    # is a new notice.
    dedup_key: str | None = None
    # The signed timestamp when the notice carried a Standard Webhooks signature;
    # the same (brand, dedup_key, order_id) *and* signed_at again is a replay, not a retry.
    signed_at: int | None = None
    # "admin" and "replay" are an operator's "now": the job is due at once even in a
    # failure backoff, and its attempts start over.
    source: Literal["webhook", "poller", "admin", "replay"] = "webhook"
    # Forced hydrations deliver even if the state is unchanged (admin "hydrate now").
    force: bool = False
    # W3C traceparent of the ingest span (app/tracing.py); None when tracing is off.
    traceparent: str | None = None


@dataclass(frozen=True)
class EnqueueResult:
    notification_id: int | None  # None when it was a duplicate
    job_id: int
    duplicate: bool = False
    # For a duplicate: the signed_at stored with the first copy (replay detection).
    previous_signed_at: int | None = None
    # True when the notice joined a job already waiting or in flight.
    coalesced: bool = False


@dataclass(frozen=True)
class HydrationJob:
    """A claimed hydration job."""

    id: int
    brand: str
    order_id: int
    venue_id: str | None
    # Attempts before this one that failed or lost their lease (429s and credential
    # pauses do not count; not-founds count on their own).
    attempts: int
    not_found_attempts: int
    generation: int  # the generation this claim covers
    lease_token: str
    force: bool
    # Notifications this fetch covers (oldest first) and when the oldest arrived.
    notification_ids: tuple[int, ...]
    first_received_at: float
    created_at: float
    # The covered notifications' traceparents (oldest first; those without one left out).
    traceparents: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewSnapshot:
    """What a successful fetch produced, ready to be stored with its deliveries."""

    key: str  # stable id of the order state: the webhook-id every sink sees
    body: bytes  # the exact JSON body sinks receive
    # Parsed Clopos updated_at: kept for the poller (known_states), never compared.
    order_updated_at: float | None
    hydrated_at: float


HydrationOutcome = Literal["stored", "unchanged", "stale", "lost_lease"]


@dataclass(frozen=True)
class CompleteResult:
    outcome: HydrationOutcome
    snapshot_id: int | None = None
    version: int | None = None
    deliveries: int = 0
    # The job was notified again during the fetch and is due once more.
    requeued: bool = False


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery of one snapshot to one sink."""

    id: int
    sink: str
    snapshot_id: int
    snapshot_key: str
    brand: str
    order_id: int
    version: int
    body: bytes
    attempts: int
    lease_token: str
    created_at: float
    first_received_at: float  # when the oldest notification behind it arrived
    # Traceparents of the notifications behind the snapshot (oldest first, at most 32).
    traceparents: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeadLetter:
    id: int
    kind: DeadLetterKind
    brand: str
    order_id: int
    sink: str | None
    reason: str  # stable identifier: not_found, rejected, gave_up, invalid_response...
    last_error: str
    attempts: int
    created_at: float
    job_id: int | None = None
    delivery_id: int | None = None
    snapshot_key: str | None = None


@dataclass(frozen=True)
class DeadLetterFilter:
    brand: str | None = None
    sink: str | None = None
    reason: str | None = None
    kind: DeadLetterKind | None = None


@dataclass(frozen=True)
class DeadLetterPage:
    items: list[DeadLetter]
    total: int
    next_cursor: int | None  # pass as ``after_id`` to get the next page


@dataclass(frozen=True)
class QueueStats:
    """Depth and age of one queue.

    ``pending`` counts every pending item, those waiting in a backoff included.
    ``oldest_pending_age`` is the seconds since the oldest notice behind *due* work:
    pending items whose retry time has come, and running ones. Items deliberately
    waiting in a backoff do not age the queue (one order in a day-long backoff must
    not keep readiness red); None when no such item exists.
    """

    pending: int
    running: int
    oldest_pending_age: float | None


@dataclass(frozen=True)
class StoreStats:
    hydration: QueueStats
    deliveries: dict[str, QueueStats]  # per sink
    dead_letters: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # key: (kind, reason, sink or "") -> count

    def queues(self) -> dict[str, QueueStats]:
        """Every queue by its operator-facing name: ``hydration``, ``delivery:<sink>``."""
        named = {"hydration": self.hydration}
        named.update({f"delivery:{sink}": queue for sink, queue in self.deliveries.items()})
        return named


@dataclass(frozen=True)
class ListedState:
    """One order as a page of ``GET /v2/orders`` (receipt embedded) showed it: a state
    ready to be stored as a snapshot without a detail call (app/list_hydration.py)."""

    order_id: int
    venue_id: str | None  # where a later fetch of the order goes (x-venue)
    key: str  # the snapshot id of this content: the id a detail read of it has
    updated_at: float | None
    # The body sinks receive, given the notices this read covers (oldest first) and when
    # the oldest arrived (the read's own time when it covers none).
    render: Callable[[tuple[int, ...], float], bytes]


# stored: a new state, delivered. unchanged: the stored state. stale: older than the
#   stored state. These three satisfy the order's notices received before the read.
# ambiguous: same stamp, other content, read no later than the stored state: which is
#   newer cannot be told, so nothing changes (a fetch will tell).
# deferred: the order is not the list's to decide (a fetch in flight, an operator's
#   forced fetch, a dead job): nothing changes.
# skipped: not asked for (notified_only, and the order has no notice waiting).
ListedOutcome = Literal["stored", "unchanged", "stale", "ambiguous", "deferred", "skipped"]


@dataclass(frozen=True)
class ListedResult:
    order_id: int
    outcome: ListedOutcome
    satisfied: int = 0  # notices this read covered
    version: int | None = None
    deliveries: int = 0


@dataclass(frozen=True)
class VenueBacklog:
    venue_id: str | None  # None: the token's default venue
    due: int
    oldest_received_at: float


@dataclass(frozen=True)
class KnownState:
    """The newest stored state of an order, as the poller compares a listed one with it:
    by content (``key``, the snapshot id) first; ``updated_at`` only says which is older."""

    key: str | None = None
    updated_at: float | None = None


# Budget spend is read back for one minute (Clopos's window); two are kept.
BUDGET_SPEND_KEEP_SECONDS = 120.0


@dataclass(frozen=True)
class TenantSpend:
    """What one tenant's Clopos budget spent recently: the times its calls were granted
    (epoch seconds, oldest first) and the per-minute limit in force at the newest."""

    times: tuple[float, ...]
    limit: int


@dataclass(frozen=True)
class SharedBudgetRow:
    """One tenant's Clopos budget row shared by the replicas (PostgreSQL), as seconds from
    now on the database's clock, so no replica's clock skews it: ``tat_ahead_seconds`` is
    how far the GCRA theoretical arrival time runs ahead (0 = idle), ``held_for_seconds``
    what is left of a 429's hold, ``server_remaining`` what Clopos last said remains less
    the calls granted since (None once its ``RateLimit-Reset`` passed)."""

    grants: int  # every call granted to the tenant, by every replica
    tat_ahead_seconds: float
    held_for_seconds: float
    server_limit: int | None
    server_remaining: int | None
    server_reset_in_seconds: float


@dataclass(frozen=True)
class PollerLead:
    """Who polls a brand: ``leading`` when this process does; ``holder`` names the
    process that does (``hostname:pid``), None when nobody holds it right now."""

    leading: bool
    holder: str | None


@dataclass(frozen=True)
class PruneResult:
    jobs: int
    notifications: int
    snapshots: int
    deliveries: int

    @property
    def total(self) -> int:
        return self.jobs + self.notifications + self.snapshots + self.deliveries


class Store(Protocol):
    """The durable store. One instance per process; safe for concurrent coroutines."""

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Prove the store can commit a write now; raise StoreError if not."""

    # --- ingest ---

    async def enqueue(self, notification: Notification) -> EnqueueResult:
        """Commit a notification (durably) and coalesce it into its order's job.

        Answers within ``ENQUEUE_TIMEOUT_SECONDS`` or raises StoreError. A notice makes
        a waiting job due now unless it is in a failure backoff; an operator's notice
        (source "admin" or "replay") makes it due now regardless and resets its
        attempts. A notice revives a done or dead job.
        """

    async def enqueue_many(self, notifications: Sequence[Notification]) -> list[EnqueueResult]:
        """Enqueue several notifications in one transaction (one commit); the results
        are in the order given, each as :meth:`enqueue` would have answered it in that
        order. All or nothing: on StoreError none of them is stored."""

    async def watch_work(self, wake: Callable[[WorkKind], None]) -> None:
        """Until cancelled: call ``wake(kind)`` when another process sharing this store
        made work of that kind due, so its workers need not wait for their next poll.
        Polling stays the fallback: a lost wake-up delays work, it never loses it."""

    # --- hydration queue ---

    async def claim_hydrations(
        self,
        *,
        limit: int,
        now: float,
        lease_seconds: float,
        exclude_brands: frozenset[str] = frozenset(),
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
    ) -> list[HydrationJob]:
        """Lease up to ``limit`` due jobs (pending and due, or running with an expired lease),
        counting an attempt for each. A running job whose lease ran out for the
        ``max_lost_leases``-th time in a row is dead-lettered (``lease_lost``) instead."""

    async def extend_hydration_lease(
        self, job: HydrationJob, *, now: float, lease_seconds: float
    ) -> bool:
        """Keep the lease of running work: it now ends at ``now + lease_seconds``. False
        when the lease is no longer this claim's."""

    async def complete_hydration(
        self, job: HydrationJob, snapshot: NewSnapshot, sinks: list[str], *, now: float
    ) -> CompleteResult:
        """Store the snapshot and one delivery per sink, in one transaction.

        States are compared by content, never by clock (a Clopos ``updated_at`` may lie
        in the future): the snapshot is skipped when it equals the latest one for the
        order (``unchanged``) or an older stored one (``stale``: a read that lags behind
        what was already stored); a forced job stores and delivers whatever it fetched.
        Supersedes older undelivered deliveries of the order on each sink.
        Marks the job done, or due again at once if its generation moved on. Any
        outcome but ``lost_lease`` resolves (deletes) the order's hydration dead letters.
        """

    async def retry_hydration(
        self,
        job: HydrationJob,
        *,
        retry_at: float,
        error: str,
        count_attempt: bool = True,
        not_found: bool = False,
    ) -> bool:
        """Put the job back, due at ``retry_at``; optionally count a (not-found) attempt.

        A forced notice that arrived during the fetch wins over the backoff: the job
        stays due at once and its attempts start over.
        """

    async def release_hydration(self, job: HydrationJob) -> bool:
        """Give a claimed job back untouched (shutdown): due now, no attempt counted."""

    async def dead_letter_hydration(
        self, job: HydrationJob, *, reason: str, error: str, now: float
    ) -> bool:
        """End the job in a dead letter (it revives on the next notification or replay).

        The force of a forced job ends here. If the job was notified again during the
        fetch, the letter is still written but the job is due again at once, starting
        over (attempts reset, its age from the oldest of those notices), so they are
        not lost; a force asked during the fetch survives.
        """

    # --- delivery queue ---

    async def claim_deliveries(
        self,
        *,
        sink: str,
        limit: int,
        now: float,
        lease_seconds: float,
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
    ) -> list[Delivery]:
        """Lease due deliveries of one sink: at most one in flight per (sink, order), and
        never one older than a version already attempted on that (sink, order), whatever
        that attempt's outcome (those are superseded). Claiming a version supersedes the
        older ones of its (sink, order) still waiting. Attempts and lost leases count as
        for :meth:`claim_hydrations`."""

    async def extend_delivery_lease(
        self, delivery: Delivery, *, now: float, lease_seconds: float
    ) -> bool:
        """As :meth:`extend_hydration_lease`."""

    async def complete_delivery(self, delivery: Delivery, *, now: float) -> bool:
        """Mark it delivered; delete this sink's delivery dead letters of the same order
        with an older or equal version (they are superseded by what was delivered)."""

    async def retry_delivery(
        self, delivery: Delivery, *, retry_at: float, error: str, count_attempt: bool = True
    ) -> bool: ...

    async def release_delivery(self, delivery: Delivery) -> bool: ...

    async def dead_letter_delivery(
        self, delivery: Delivery, *, reason: str, error: str, now: float
    ) -> bool: ...

    # --- dead letters ---

    async def list_dead_letters(
        self, filt: DeadLetterFilter, *, limit: int = 50, after_id: int | None = None
    ) -> DeadLetterPage: ...

    async def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None: ...

    async def replay_dead_letter(
        self, dead_letter_id: int, *, mode: ReplayMode = "auto", now: float
    ) -> bool:
        """Re-queue and remove it. ``auto``: a hydration letter re-hydrates (forced), a
        delivery letter re-delivers its snapshot, unless a newer version of that (sink,
        order) was attempted since: then the delivery is superseded and nothing is sent.
        ``hydrate`` forces a fresh fetch for the order. Returns False when no such dead
        letter exists."""

    async def replay_dead_letters(
        self, filt: DeadLetterFilter, *, mode: ReplayMode = "auto", now: float, limit: int = 1000
    ) -> int: ...

    async def purge_dead_letter(self, dead_letter_id: int) -> bool: ...

    async def purge_dead_letters(self, filt: DeadLetterFilter) -> int: ...

    # --- upkeep and observation ---

    async def prune(self, *, older_than: float) -> PruneResult:
        """Delete finished records last touched before ``older_than``.

        Keeps what live work, ordering and dead letters need: a dead record while its
        letter exists, and the newest *attempted* version of a (sink, order) while an
        older one of that (sink, order) is pending, running or dead with a letter, so
        neither a retry nor a replay can send an older state after it, however short
        the retention.
        """

    async def stats(self, *, now: float) -> StoreStats: ...

    async def latest_snapshot_body(self, brand: str, order_id: int) -> bytes | None:
        """The newest stored snapshot body of an order (for operators)."""

    # --- reconciliation poller ---

    async def get_poll_watermark(self, brand: str) -> float | None:
        """The brand's poll watermark (epoch seconds, Clopos ``updated_at``), None if unset."""

    async def set_poll_watermark(self, brand: str, updated_at: float, *, now: float) -> float:
        """Advance the brand's watermark to ``updated_at``, never backwards; return the
        watermark now stored (the larger of the two)."""

    async def lead_poller(self, brand: str) -> PollerLead:
        """Become, or stay, the one process polling ``brand`` among all that share this
        store; if another holds it, say which. A holder that dies (even kill -9) lets go,
        and the next process to ask takes over."""

    async def apply_listed(
        self,
        brand: str,
        states: Sequence[ListedState],
        sinks: list[str],
        *,
        read_at: float,
        now: float,
        notified_only: bool = False,
    ) -> list[ListedResult]:
        """Apply list states (a page, or a chunk of one) in one transaction ("a read after
        the notice satisfies it"): each order's state is judged against its newest
        stored one by content; a new state is stored as the next version with one
        delivery per sink (superseding older undelivered ones), as a completed fetch
        would be; and every notice of the order received before ``read_at`` is covered.
        Notices received later keep the job pending. Orders with a fetch in flight, a
        forced fetch asked, or a dead job are ``deferred`` untouched. With
        ``notified_only``, orders with no pending job are ``skipped``; otherwise an
        order never seen gets a job (done).
        """

    async def due_by_venue(self, brand: str, *, now: float) -> list[VenueBacklog]:
        """The brand's due hydration jobs (pending and due, not forced) per venue: how
        many, and when the oldest notice behind them arrived; the largest group first."""

    async def known_states(self, brand: str, order_ids: Sequence[int]) -> dict[int, KnownState]:
        """For each order id: the id and Clopos ``updated_at`` of its newest stored state
        (both None when the order has no job; ``updated_at`` None when its snapshot had
        no usable one)."""

    # --- the Clopos rate budget (what a restarted process must know it spent) ---

    async def record_budget_spend(self, tenant: str, *, at: float, limit: int) -> None:
        """Record one call granted to ``tenant`` at ``at`` (epoch seconds) with the
        per-minute ``limit`` then in force; committed when this returns, which is before
        the call goes out, so a process killed right after sending cannot hide it."""

    async def budget_spend_since(self, since: float) -> dict[str, TenantSpend]:
        """Per tenant, the calls recorded after ``since``."""
