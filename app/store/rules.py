"""The queue's decisions as pure functions over small values: no I/O, no SQL, no clock.

Every store backend (app/store/sqlite.py, app/store/postgres.py) reads what a rule
needs, applies the rule here and writes the result, so the subtle parts (coalescing,
force generations, requeue on generation, lost leases, superseding, replay) are
decided once, the same way on every backend, and tested without a database
(tests/test_store_rules.py). What stays in a backend is how it reads and writes:
locking, transactions, and claims whose SQL states their own preconditions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.store.base import HydrationOutcome, Notification, ReplayMode

# Notices an operator sent ("hydrate now", a replay): due at once even in a backoff.
OPERATOR_SOURCES = frozenset({"admin", "replay"})


# --- a notice for an order that has a job -------------------------------------------------


@dataclass(frozen=True)
class JobState:
    """What :func:`on_notice` reads of an order's job."""

    status: str  # pending, running, done, dead
    venue_id: str | None
    generation: int
    force_generation: int
    attempts: int
    not_found_attempts: int
    retry_at: float
    pending_since: float | None
    last_error: str | None


@dataclass(frozen=True)
class JobPatch:
    """The job's new values after a notice, and whether the notice joined live work."""

    status: str
    venue_id: str | None
    generation: int
    force_generation: int
    attempts: int
    not_found_attempts: int
    retry_at: float
    pending_since: float
    last_error: str | None
    coalesced: bool

    def changes(self, job: JobState) -> dict[str, object]:
        """The columns whose value differs from ``job``'s (the generation always does)."""
        return {
            name: value for name, value in self.columns().items() if getattr(job, name) != value
        }

    def columns(self) -> dict[str, object]:
        """The patch as the columns an ``UPDATE_JOB_ON_NOTICE`` statement binds."""
        return {
            "status": self.status,
            "venue_id": self.venue_id,
            "generation": self.generation,
            "force_generation": self.force_generation,
            "attempts": self.attempts,
            "not_found_attempts": self.not_found_attempts,
            "retry_at": self.retry_at,
            "pending_since": self.pending_since,
            "last_error": self.last_error,
        }


def on_notice(job: JobState, notice: Notification) -> JobPatch:
    """Fold a notice into an existing job.

    Every notice moves the generation on (a fetch running now then causes exactly one
    more). A waiting job becomes due now, unless it waits in a failure backoff; an
    operator's notice makes it due regardless and starts its attempts over. A done or
    dead job revives, starting over. A running job only moves its generation: its
    completion makes it due again. A forced notice records the generation it was asked
    at, so it outlives a fetch that was already running.
    """
    now = notice.received_at
    generation = job.generation + 1
    status, attempts, not_found = job.status, job.attempts, job.not_found_attempts
    retry_at, last_error = job.retry_at, job.last_error
    if status == "pending":
        if notice.source in OPERATOR_SOURCES:  # an operator asked for it now: start over
            attempts = not_found = 0
            retry_at = min(retry_at, now)
        elif attempts == 0:  # not in a failure backoff: due now
            retry_at = min(retry_at, now)
    elif status in ("done", "dead"):
        status, attempts, not_found, retry_at, last_error = "pending", 0, 0, now, None
    return JobPatch(
        status=status,
        venue_id=notice.venue_id if notice.venue_id is not None else job.venue_id,
        generation=generation,
        force_generation=generation if notice.force else job.force_generation,
        attempts=attempts,
        not_found_attempts=not_found,
        retry_at=retry_at,
        pending_since=now if job.pending_since is None else min(job.pending_since, now),
        last_error=last_error,
        coalesced=job.status in ("pending", "running"),
    )


# --- what a fetch brought -------------------------------------------------------------------


# A stored stamp more than this ahead of our clock when it was read is not trusted to
# order states (Clopos clocks may lie in the future; whole seconds need a little slack).
TRUSTED_STAMP_SKEW_SECONDS = 5.0


def stamp_says_older(
    updated_at: float | None, last_updated_at: float | None, last_read_at: float | None
) -> bool:
    """Whether a state's ``updated_at`` proves it older than the newest stored state's:
    only when the stored stamp is trustworthy, i.e. was not ahead of our clock when it
    was read (``last_read_at``). A stamp in the future proves nothing, and trusting it
    would freeze the order. Equal stamps prove nothing either (whole seconds)."""
    if updated_at is None or last_updated_at is None or last_read_at is None:
        return False
    trusted = last_updated_at <= last_read_at + TRUSTED_STAMP_SKEW_SECONDS
    return trusted and updated_at < last_updated_at


def fetched_state(
    *,
    key: str,
    latest_key: str | None,
    forced: bool,
    seen_before: bool,
    updated_at: float | None = None,
    latest_updated_at: float | None = None,
    latest_read_at: float | None = None,
) -> HydrationOutcome:
    """Compare a fetched state with the order's stored ones, by content first.

    ``unchanged``: the same as the newest stored state. ``stale``: a state the order
    already had before its newest one, or one whose ``updated_at`` is older than a
    trustworthy stamp of the newest (a read lagging behind, possibly of a state that
    was never stored: delivering it would go backwards). Anything else is ``stored``,
    an equal stamp or a stamp below one that lay in the future included (Clopos stamps
    have whole seconds and may lie ahead). A forced hydration is always stored.
    ``seen_before``: whether any stored snapshot of the order has this key;
    ``latest_updated_at``/``latest_read_at``: the newest snapshot's stamp and when it
    was read (its ``hydrated_at``).
    """
    if forced:
        return "stored"
    if key == latest_key:
        return "unchanged"
    if seen_before or stamp_says_older(updated_at, latest_updated_at, latest_read_at):
        return "stale"
    return "stored"


def requeued(*, generation: int, claimed_generation: int) -> bool:
    """A fetch that ends (stored, unchanged, stale, or in a dead letter) leaves its job
    due again at once when notices arrived during it: they are not covered by it."""
    return generation > claimed_generation


# --- leases ---------------------------------------------------------------------------------


def abandoned(*, status: str, lost_leases: int, max_lost_leases: int) -> bool:
    """A claim candidate that is still ``running`` lost its lease once more (its claim
    ended with nothing recorded). At ``max_lost_leases`` in a row it is not tried again:
    it ends in a ``lease_lost`` dead letter."""
    return status == "running" and lost_leases + 1 >= max_lost_leases


def lease_lost_error(lost_leases: int) -> str:
    """The dead letter's error for work :func:`abandoned` ends."""
    return (
        f"its lease ran out {lost_leases + 1} times in a row with no outcome "
        "(the process died, or the work outlived its lease)"
    )


# --- deliveries -----------------------------------------------------------------------------


def overtaken(version: int, newest_attempted: int | None) -> bool:
    """Never backwards: once a newer version of a (sink, order) has been attempted
    (claimed for sending, whatever its outcome: a timeout may have landed), an older
    version is superseded, on claim and on replay alike."""
    return newest_attempted is not None and newest_attempted > version


ReplayAction = Literal["redeliver", "supersede", "rehydrate"]


def replay_action(
    *, kind: str, mode: ReplayMode, delivery_exists: bool, overtaken: bool
) -> ReplayAction:
    """What replaying a dead letter does.

    A delivery letter in ``auto`` or ``deliver`` mode re-sends its snapshot, unless a
    newer version was attempted since (then it is superseded: nothing is sent), or its
    delivery was pruned (then the order is fetched afresh). A hydration letter, or
    ``hydrate`` mode, forces a fresh fetch of the order for every sink.
    """
    if kind == "delivery" and mode in ("auto", "deliver") and delivery_exists:
        return "supersede" if overtaken else "redeliver"
    return "rehydrate"
