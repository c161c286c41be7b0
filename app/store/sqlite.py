"""The SQLite store: the embedded, single-process implementation of the store port.

Every operation is a module-level function of the connection, run in the writer process
of :mod:`app.store.sqlite_writer` (serially, group-committed). The semantics are the
port's (:mod:`app.store.base`); the decisions (coalescing a notice, comparing a fetched
state, lost leases, superseding, replay) are :mod:`app.store.rules`, shared with the
PostgreSQL store; the notes here are about the bookkeeping that keeps them:

* A hydration job remembers what its claim covers: ``claimed_generation`` and
  ``claimed_notification_id`` (the newest notice at claim time). Completion attaches
  exactly those notices to the snapshot and requeues the job when the generation
  moved on meanwhile, so a notice during a fetch causes exactly one more fetch.
* ``force_generation`` is the generation a forced hydration was asked at (0: none),
  so a force that arrives during a fetch survives that fetch's completion (or failure);
  one asked before the claim ends with it, success or dead letter.
* A fetch that ends in a dead letter while its generation moved on still writes the
  letter, but the job goes back to pending (due now, starting over) for the notices
  the fetch did not cover: the same rule as a completion.
* ``pending_since`` is when the oldest notice not yet covered arrived; it drives the
  backlog age and the job's give-up clock (``HydrationJob.first_received_at``). A
  dead job forgets it, so a revived job does not inherit the age of the dead one.
* A new job takes ``last_version``/``last_snapshot_key``/``last_updated_at`` from the
  newest snapshot of its order still stored, so versions never go backwards after
  the previous job was pruned.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.cpus import available_cpus
from app.errors import StoreError
from app.logs import get_logger
from app.store import rules, sql, sqlite_listed
from app.store.base import (
    BUDGET_SPEND_KEEP_SECONDS,
    DEFAULT_MAX_LOST_LEASES,
    ENQUEUE_TIMEOUT_SECONDS,
    LEASE_LOST,
    CompleteResult,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterKind,
    DeadLetterPage,
    Delivery,
    EnqueueResult,
    HydrationJob,
    HydrationOutcome,
    KnownState,
    ListedResult,
    ListedState,
    NewSnapshot,
    Notification,
    PollerLead,
    PruneResult,
    QueueStats,
    ReplayMode,
    StoreStats,
    TenantSpend,
    VenueBacklog,
    WorkKind,
)
from app.store.lock import DatabaseLock
from app.store.sqlite_writer import GroupCommitWriter, ProcessWriter
from app.store.writer_thread import ThreadWriter

if TYPE_CHECKING:
    from app.settings import SqliteWriter

T = TypeVar("T")
log = get_logger("app.store.sqlite")
Row = sqlite3.Row
Conn = sqlite3.Connection

# A claim lists at most this many notification ids (the newest), to bound the body.
MAX_NOTIFICATION_IDS = 1000
# Rows one prune statement deletes at most, so one prune never holds the writer long.
PRUNE_CHUNK = 2000
PROCESS_NAME = f"{socket.gethostname()}:{os.getpid()}"
# The writer process pays about 10 us of CPU per operation for the wire, to run on a
# core of its own: below two CPUs there is none to win (app/store/writer_thread.py).
PROCESS_WRITER_MIN_CPUS = 2.0


def choose_writer(
    mode: SqliteWriter, cpus: Callable[[], float] = available_cpus
) -> type[GroupCommitWriter]:
    """``SQLITE_WRITER``: "process", "thread", or "auto" (a process given two CPUs or more)."""
    if mode == "process":
        return ProcessWriter
    if mode == "thread":
        return ThreadWriter
    return ProcessWriter if cpus() >= PROCESS_WRITER_MIN_CPUS else ThreadWriter


def _token() -> str:
    return secrets.token_hex(16)


class SqliteStore:
    """The store port on one SQLite file. ``commits`` counts committed transactions."""

    def __init__(
        self,
        path: str | Path,
        *,
        batch_limit: int = 256,
        writer: SqliteWriter = "auto",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._batch_limit = batch_limit
        self._writer_mode: SqliteWriter = writer
        # Only for bookkeeping stamps (updated_at) of calls that take no ``now``.
        self._clock = clock
        self._writer: GroupCommitWriter | None = None
        self._lock: DatabaseLock | None = None
        self._commits_before = 0  # commits of writers from earlier open/close cycles

    @property
    def commits(self) -> int:
        current = self._writer.commits if self._writer is not None else 0
        return self._commits_before + current

    async def open(self) -> None:
        if self._writer is not None:
            return
        # Before anything touches the file: voiding leases below is right only when no
        # other process holds any (app/store/lock.py).
        lock = DatabaseLock(self.path)
        try:
            writer = choose_writer(self._writer_mode)(self.path, batch_limit=self._batch_limit)
            await writer.start()
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        self._writer = writer
        log.info("store.writer_started", writer=writer.kind, mode=self._writer_mode)
        voided = await self.run("void_orphaned_leases", _void_orphaned_leases)
        if voided:
            log.warning("store.orphaned_leases_released", count=voided)

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.stop()
            self._commits_before += writer.commits
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    async def run(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        savepoint: bool = True,
        within: float | None = None,
    ) -> T:
        """Run ``fn(connection, *args)`` in the writer process, in the next group commit.
        ``fn`` is a module-level function and ``args`` pickle (they are sent there).

        The escape hatch for SQLite-specific tooling and tests; store semantics live in
        the methods below. ``savepoint`` and ``within``: see
        :meth:`app.store.sqlite_writer.GroupCommitWriter.submit`.
        """
        if self._writer is None:
            raise StoreError(f"{name}: the store is not open")
        return await self._writer.submit(name, fn, *args, savepoint=savepoint, within=within)

    async def pragmas(self) -> dict[str, Any]:
        """The connection settings in force (for diagnostics)."""

        return await self.run("pragmas", _pragmas)

    async def ping(self) -> None:
        await self.run("ping", _ping, self._clock())

    # --- ingest -----------------------------------------------------------------------

    async def enqueue(self, notification: Notification) -> EnqueueResult:
        # No savepoint: the enqueue fails only on a broken database, never as an
        # expected outcome after a write; it is the ingest hot path.
        return await self.run(
            "enqueue",
            _enqueue,
            notification,
            savepoint=False,
            within=ENQUEUE_TIMEOUT_SECONDS,
        )

    async def enqueue_many(self, notifications: Sequence[Notification]) -> list[EnqueueResult]:
        if not notifications:
            return []
        notices = list(notifications)
        return await self.run("enqueue_many", _enqueue_many, notices)

    async def watch_work(self, wake: Callable[[WorkKind], None]) -> None:
        # One process per file: whoever adds work wakes the workers of this process
        # directly (the runtime's wake_*); no other process can add any. What is
        # watched instead is the writer process: the service cannot work without it, so
        # its death ends this call with an error, the runtime's supervisor stops the
        # service (exit 1), and the orchestrator restarts it.
        writer = self._writer
        if writer is None:
            raise StoreError("watch_work: the store is not open")
        if await writer.exited():
            raise StoreError(f"{self.path}: the store writer exited")

    # --- hydration queue ----------------------------------------------------------------

    async def claim_hydrations(
        self,
        *,
        limit: int,
        now: float,
        lease_seconds: float,
        exclude_brands: frozenset[str] = frozenset(),
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
    ) -> list[HydrationJob]:
        if limit <= 0:
            return []
        lease = Lease(now, lease_seconds, max_lost_leases)
        return await self.run("claim_hydrations", _claim_hydrations, limit, lease, exclude_brands)

    async def extend_hydration_lease(
        self, job: HydrationJob, *, now: float, lease_seconds: float
    ) -> bool:
        params = {"id": job.id, "lease_token": job.lease_token, "lease_until": now + lease_seconds}
        return await self.run("extend_hydration_lease", _changed, sql.EXTEND_JOB_LEASE, params)

    async def complete_hydration(
        self, job: HydrationJob, snapshot: NewSnapshot, sinks: list[str], *, now: float
    ) -> CompleteResult:
        return await self.run("complete_hydration", _complete_hydration, job, snapshot, sinks, now)

    async def retry_hydration(
        self,
        job: HydrationJob,
        *,
        retry_at: float,
        error: str,
        count_attempt: bool = True,
        not_found: bool = False,
    ) -> bool:
        params = {
            "id": job.id,
            "lease_token": job.lease_token,
            "retry_at": retry_at,
            "error": error,
            # A not-found counts on its own counter, never as a failed attempt.
            "add_attempt": int(count_attempt and not not_found),
            "add_not_found": int(not_found),
            "now": self._clock(),
        }
        return await self.run("retry_hydration", _changed, sql.RETRY_JOB, params)

    async def release_hydration(self, job: HydrationJob) -> bool:
        params = {"id": job.id, "lease_token": job.lease_token, "now": self._clock()}
        return await self.run("release_hydration", _changed, sql.RELEASE_JOB, params)

    async def dead_letter_hydration(
        self, job: HydrationJob, *, reason: str, error: str, now: float
    ) -> bool:
        return await self.run(
            "dead_letter_hydration",
            _dead_letter_hydration,
            job,
            reason,
            error,
            now,
        )

    # --- delivery queue -------------------------------------------------------------------

    async def claim_deliveries(
        self,
        *,
        sink: str,
        limit: int,
        now: float,
        lease_seconds: float,
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        lease = Lease(now, lease_seconds, max_lost_leases)
        return await self.run("claim_deliveries", _claim_deliveries, sink, limit, lease)

    async def extend_delivery_lease(
        self, delivery: Delivery, *, now: float, lease_seconds: float
    ) -> bool:
        params = {
            "id": delivery.id,
            "lease_token": delivery.lease_token,
            "lease_until": now + lease_seconds,
        }
        return await self.run(
            "extend_delivery_lease",
            _changed,
            sql.EXTEND_DELIVERY_LEASE,
            params,
        )

    async def complete_delivery(self, delivery: Delivery, *, now: float) -> bool:
        params = {"id": delivery.id, "lease_token": delivery.lease_token, "now": now}
        return await self.run("complete_delivery", _complete_delivery, params)

    async def retry_delivery(
        self, delivery: Delivery, *, retry_at: float, error: str, count_attempt: bool = True
    ) -> bool:
        params = {
            "id": delivery.id,
            "lease_token": delivery.lease_token,
            "retry_at": retry_at,
            "error": error,
            "add_attempt": int(count_attempt),
            "now": self._clock(),
        }
        return await self.run("retry_delivery", _changed, sql.RETRY_DELIVERY, params)

    async def release_delivery(self, delivery: Delivery) -> bool:
        params = {"id": delivery.id, "lease_token": delivery.lease_token, "now": self._clock()}
        return await self.run("release_delivery", _changed, sql.RELEASE_DELIVERY, params)

    async def dead_letter_delivery(
        self, delivery: Delivery, *, reason: str, error: str, now: float
    ) -> bool:
        return await self.run(
            "dead_letter_delivery",
            _dead_letter_delivery,
            delivery,
            reason,
            error,
            now,
        )

    # --- dead letters -----------------------------------------------------------------------

    async def list_dead_letters(
        self, filt: DeadLetterFilter, *, limit: int = 50, after_id: int | None = None
    ) -> DeadLetterPage:
        return await self.run("list_dead_letters", _list_dead_letters, filt, limit, after_id)

    async def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        return await self.run("get_dead_letter", _get_dead_letter, dead_letter_id)

    async def replay_dead_letter(
        self, dead_letter_id: int, *, mode: ReplayMode = "auto", now: float
    ) -> bool:
        return await self.run("replay_dead_letter", _replay_dead_letter, dead_letter_id, mode, now)

    async def replay_dead_letters(
        self, filt: DeadLetterFilter, *, mode: ReplayMode = "auto", now: float, limit: int = 1000
    ) -> int:
        params = {**_filter_params(filt), "limit": max(limit, 0)}
        return await self.run("replay_dead_letters", _replay_dead_letters, params, mode, now)

    async def purge_dead_letter(self, dead_letter_id: int) -> bool:
        return await self.run(
            "purge_dead_letter",
            _changed,
            sql.DELETE_DEAD_LETTER,
            {"id": dead_letter_id},
        )

    async def purge_dead_letters(self, filt: DeadLetterFilter) -> int:
        params = _filter_params(filt)
        return await self.run("purge_dead_letters", _rowcount, sql.PURGE_DEAD_LETTERS, params)

    # --- upkeep and observation -------------------------------------------------------------

    async def prune(self, *, older_than: float) -> PruneResult:
        # Order matters: deliveries free snapshots, notifications free jobs and snapshots,
        # and a pruned job frees the newest snapshot of its order.
        steps = (
            ("deliveries", sql.PRUNE_DELIVERIES),
            ("notifications", sql.PRUNE_NOTIFICATIONS),
            ("jobs", sql.PRUNE_JOBS),
            ("snapshots", sql.PRUNE_SNAPSHOTS),
        )
        counts = dict.fromkeys((name for name, _ in steps), 0)
        params = {"cutoff": older_than, "chunk": PRUNE_CHUNK}
        for name, statement in steps:
            while True:
                deleted = await self.run(f"prune_{name}", _rowcount, statement, params)
                counts[name] += deleted
                if deleted < PRUNE_CHUNK:
                    break
        return PruneResult(**counts)

    async def stats(self, *, now: float) -> StoreStats:
        return await self.run("stats", _stats, now)

    async def latest_snapshot_body(self, brand: str, order_id: int) -> bytes | None:
        params = {"brand": brand, "order_id": order_id}
        return await self.run("latest_snapshot_body", _latest_snapshot_body, params)

    # --- reconciliation poller ---------------------------------------------------------------

    async def get_poll_watermark(self, brand: str) -> float | None:
        return await self.run("get_poll_watermark", _get_poll_watermark, brand)

    async def set_poll_watermark(self, brand: str, updated_at: float, *, now: float) -> float:
        params = {"brand": brand, "updated_at": updated_at, "now": now}
        return await self.run("set_poll_watermark", _set_poll_watermark, params)

    async def record_budget_spend(self, tenant: str, *, at: float, limit: int) -> None:
        params = {
            "tenant": tenant,
            "at": at,
            "limit": limit,
            "before": at - BUDGET_SPEND_KEEP_SECONDS,
        }
        await self.run("record_budget_spend", _record_budget_spend, params)

    async def budget_spend_since(self, since: float) -> dict[str, TenantSpend]:
        return await self.run("budget_spend_since", _budget_spend_since, since)

    async def lead_poller(self, brand: str) -> PollerLead:
        # One process per file (an OS lock enforces it): this one polls every brand.
        return PollerLead(leading=True, holder=PROCESS_NAME)

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
        if not states:
            return []
        return await self.run(
            "apply_listed",
            sqlite_listed.apply_listed,
            brand,
            list(states),
            sinks,
            read_at,
            now,
            notified_only,
        )

    async def due_by_venue(self, brand: str, *, now: float) -> list[VenueBacklog]:
        return await self.run("due_by_venue", sqlite_listed.due_by_venue, brand, now)

    async def known_states(self, brand: str, order_ids: Sequence[int]) -> dict[int, KnownState]:
        if not order_ids:
            return {}
        known = dict.fromkeys(order_ids, KnownState())
        # Bound as one JSON list: one statement whatever the page size, no SQL built here.
        params = {"brand": brand, "ids": json.dumps([int(i) for i in known])}
        return await self.run("known_states", _known_states, params, known)


# --- operations (run in the writer process) --------------------------------------------------


def _void_orphaned_leases(conn: Conn) -> int:
    jobs = conn.execute(sql.VOID_JOB_LEASES).rowcount
    deliveries = conn.execute(sql.VOID_DELIVERY_LEASES).rowcount
    return int(jobs + deliveries)


def _pragmas(conn: Conn) -> dict[str, Any]:
    names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}


def _ping(conn: Conn, now: float) -> None:
    if conn.execute(sql.HEARTBEAT, {"now": now}).rowcount != 1:
        raise StoreError("ping: the heartbeat row is missing")


def _rowcount(conn: Conn, statement: str, params: dict[str, Any]) -> int:
    rowcount: int = conn.execute(statement, params).rowcount
    return rowcount


def _enqueue_many(conn: Conn, notices: list[Notification]) -> list[EnqueueResult]:
    return [_enqueue(conn, notice) for notice in notices]


def _get_dead_letter(conn: Conn, dead_letter_id: int) -> DeadLetter | None:
    row = conn.execute(sql.GET_DEAD_LETTER, {"id": dead_letter_id}).fetchone()
    return None if row is None else _dead_letter(row)


def _replay_dead_letter(conn: Conn, dead_letter_id: int, mode: ReplayMode, now: float) -> bool:
    row = conn.execute(sql.GET_DEAD_LETTER, {"id": dead_letter_id}).fetchone()
    if row is None:
        return False
    _replay(conn, row, mode, now)
    return True


def _replay_dead_letters(conn: Conn, params: dict[str, Any], mode: ReplayMode, now: float) -> int:
    ids = [row["id"] for row in conn.execute(sql.DEAD_LETTER_IDS, params)]
    for letter_id in ids:
        row = conn.execute(sql.GET_DEAD_LETTER, {"id": letter_id}).fetchone()
        _replay(conn, row, mode, now)
    return len(ids)


def _latest_snapshot_body(conn: Conn, params: dict[str, Any]) -> bytes | None:
    row = conn.execute(sql.LATEST_SNAPSHOT_BODY, params).fetchone()
    return None if row is None else bytes(row["body"])


def _get_poll_watermark(conn: Conn, brand: str) -> float | None:
    row = conn.execute(sql.GET_POLL_WATERMARK, {"brand": brand}).fetchone()
    return None if row is None else float(row["updated_at"])


def _set_poll_watermark(conn: Conn, params: dict[str, Any]) -> float:
    return float(conn.execute(sql.SET_POLL_WATERMARK, params).fetchone()["updated_at"])


def _record_budget_spend(conn: Conn, params: dict[str, Any]) -> None:
    conn.execute(sql.FORGET_BUDGET_SPEND, params)
    conn.execute(sql.RECORD_BUDGET_SPEND, params)


def _budget_spend_since(conn: Conn, since: float) -> dict[str, TenantSpend]:
    times: dict[str, list[float]] = {}
    limits: dict[str, int] = {}
    for row in conn.execute(sql.BUDGET_SPEND_SINCE, {"since": since}):
        times.setdefault(row["tenant"], []).append(float(row["at"]))
        limits[row["tenant"]] = int(row["limit_per_minute"])  # the newest wins
    return {t: TenantSpend(tuple(at), limits[t]) for t, at in times.items()}


def _known_states(
    conn: Conn, params: dict[str, Any], known: dict[int, KnownState]
) -> dict[int, KnownState]:
    for row in conn.execute(sql.KNOWN_STATES, params):
        known[row["order_id"]] = KnownState(row["last_snapshot_key"], row["last_updated_at"])
    return known


def _changed(conn: Conn, statement: str, params: dict[str, Any]) -> bool:
    """Run a single-row, lease-checked UPDATE/DELETE: did it change the row?"""
    return conn.execute(statement, params).rowcount == 1


def _enqueue(conn: Conn, notice: Notification) -> EnqueueResult:
    if notice.dedup_key is not None:
        params = {
            "brand": notice.brand,
            "dedup_key": notice.dedup_key,
            "order_id": notice.order_id,
        }
        dup = conn.execute(sql.FIND_DUPLICATE, params).fetchone()
        if dup is not None:
            return EnqueueResult(
                notification_id=None,
                job_id=dup["job_id"],
                duplicate=True,
                previous_signed_at=dup["signed_at"],
            )
    job = conn.execute(
        sql.GET_JOB_BY_ORDER, {"brand": notice.brand, "order_id": notice.order_id}
    ).fetchone()
    if job is None:
        job_id, coalesced = _insert_job(conn, notice), False
    else:
        job_id, coalesced = job["id"], _notice_job(conn, job, notice)
    cursor = conn.execute(
        sql.INSERT_NOTIFICATION,
        {
            "job_id": job_id,
            "brand": notice.brand,
            "order_id": notice.order_id,
            "venue_id": notice.venue_id,
            "dedup_key": notice.dedup_key,
            "signed_at": notice.signed_at,
            "source": notice.source,
            "force": int(notice.force),
            "received_at": notice.received_at,
            "traceparent": notice.traceparent,
        },
    )
    return EnqueueResult(notification_id=cursor.lastrowid, job_id=job_id, coalesced=coalesced)


def _insert_job(conn: Conn, notice: Notification) -> int:
    latest = conn.execute(
        sql.LATEST_SNAPSHOT_META, {"brand": notice.brand, "order_id": notice.order_id}
    ).fetchone()
    cursor = conn.execute(
        sql.INSERT_JOB,
        {
            "brand": notice.brand,
            "order_id": notice.order_id,
            "venue_id": notice.venue_id,
            "force_generation": 1 if notice.force else 0,
            "now": notice.received_at,
            "last_version": latest["version"] if latest else 0,
            "last_snapshot_key": latest["key"] if latest else None,
            "last_updated_at": latest["order_updated_at"] if latest else None,
        },
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _notice_job(conn: Conn, job: Row, notice: Notification) -> bool:
    """Fold a notice into an existing job (rules.on_notice); True when it joined live work."""
    state = _job_state(job)
    patch = rules.on_notice(state, notice)
    changes = patch.changes(state)
    conn.execute(
        sql.update_job_on_notice(tuple(changes)),
        {"id": job["id"], "now": notice.received_at, **changes},
    )
    return patch.coalesced


def _job_state(row: Row) -> rules.JobState:
    return rules.JobState(
        status=row["status"],
        venue_id=row["venue_id"],
        generation=row["generation"],
        force_generation=row["force_generation"],
        attempts=row["attempts"],
        not_found_attempts=row["not_found_attempts"],
        retry_at=row["retry_at"],
        pending_since=row["pending_since"],
        last_error=row["last_error"],
    )


@dataclass(frozen=True)
class Lease:
    """The terms of one claim: when, for how long, and how many lost leases in a row
    end the work in a dead letter instead of another try."""

    now: float
    seconds: float
    max_lost: int

    def abandoned(self, candidate: Row) -> bool:
        return rules.abandoned(
            status=candidate["status"],
            lost_leases=candidate["lost_leases"],
            max_lost_leases=self.max_lost,
        )

    def error(self, candidate: Row) -> str:
        return rules.lease_lost_error(candidate["lost_leases"])


def _claim_hydrations(
    conn: Conn, limit: int, lease: Lease, exclude: frozenset[str]
) -> list[HydrationJob]:
    params = {"now": lease.now, "limit": limit, "exclude": json.dumps(sorted(exclude))}
    candidates = conn.execute(sql.DUE_PENDING_JOBS, params).fetchall()
    candidates += conn.execute(sql.EXPIRED_RUNNING_JOBS, params).fetchall()
    candidates.sort(key=lambda row: (row["retry_at"], row["id"]))
    claimed: list[HydrationJob] = []
    for candidate in candidates[:limit]:
        if lease.abandoned(candidate):
            row = conn.execute(sql.GET_JOB, {"id": candidate["id"]}).fetchone()
            if not _end_job_in_letter(conn, row, LEASE_LOST, lease.error(candidate), lease.now):
                continue  # another claimer took it meanwhile
            log.warning(
                "store.lease_lost_dead_letter",
                kind="hydration",
                brand=row["brand"],
                order_id=row["order_id"],
                job_id=row["id"],
                lost_leases=candidate["lost_leases"] + 1,
            )
            continue
        job = _claim_job(conn, candidate["id"], lease.now, lease.seconds)
        if job is not None:
            claimed.append(job)
    return claimed


def _claim_job(conn: Conn, job_id: int, now: float, lease_seconds: float) -> HydrationJob | None:
    """Lease one job, or None when it is no longer claimable (another claimer won)."""
    summary = conn.execute(sql.UNCOVERED_SUMMARY, {"job_id": job_id}).fetchone()
    max_id = summary["max_id"] or 0
    row = conn.execute(
        sql.CLAIM_JOB,
        {
            "id": job_id,
            "lease_until": now + lease_seconds,
            "lease_token": _token(),
            "max_id": max_id,
            "now": now,
        },
    ).fetchone()
    if row is None:
        return None
    newest_first = conn.execute(
        sql.RECENT_UNCOVERED_IDS,
        {"job_id": job_id, "max_id": max_id, "limit": MAX_NOTIFICATION_IDS},
    ).fetchall()
    first_received_at = row["pending_since"]
    if first_received_at is None:
        first_received_at = summary["first_received_at"] or row["created_at"]
    return HydrationJob(
        id=row["id"],
        brand=row["brand"],
        order_id=row["order_id"],
        venue_id=row["venue_id"],
        attempts=row["attempts"] - 1,  # the claim counted this one; the job tells those before
        not_found_attempts=row["not_found_attempts"],
        generation=row["claimed_generation"],
        lease_token=row["lease_token"],
        force=row["force_generation"] > 0,
        notification_ids=tuple(r["id"] for r in reversed(newest_first)),
        first_received_at=first_received_at,
        created_at=row["created_at"],
        traceparents=tuple(r["traceparent"] for r in reversed(newest_first) if r["traceparent"]),
    )


def _complete_hydration(
    conn: Conn, job: HydrationJob, snapshot: NewSnapshot, sinks: list[str], now: float
) -> CompleteResult:
    row = conn.execute(sql.LEASED_JOB, {"id": job.id, "lease_token": job.lease_token}).fetchone()
    if row is None:
        return CompleteResult("lost_lease")
    order = {"brand": row["brand"], "order_id": row["order_id"]}
    latest = conn.execute(sql.LATEST_SNAPSHOT_META, order).fetchone()
    last_version, last_key, last_updated = (
        row["last_version"],
        row["last_snapshot_key"],
        row["last_updated_at"],
    )
    outcome: HydrationOutcome
    deliveries = 0
    # Without a new snapshot, the notices are attached to the newest existing one.
    snapshot_id: int | None = latest["id"] if latest else None
    version: int | None = latest["version"] if latest else None
    outcome = rules.fetched_state(
        key=snapshot.key,
        latest_key=last_key,
        forced=job.force,
        seen_before=_seen_before(conn, order, snapshot.key),
        updated_at=snapshot.order_updated_at,
        latest_updated_at=latest["order_updated_at"] if latest else None,
        latest_read_at=latest["hydrated_at"] if latest else None,
    )
    if outcome == "stored":
        last_version = max(last_version, latest["version"] if latest else 0) + 1
        last_key = snapshot.key
        # The newest stored state's stamp, even if lower than a (wrong, future) earlier one.
        last_updated = snapshot.order_updated_at
        snapshot_id = _insert_snapshot(conn, order, snapshot, last_version)
        version = last_version
        for sink in dict.fromkeys(sinks):  # a sink listed twice still gets one delivery
            _add_delivery(conn, order, sink, snapshot_id, last_version, job, now)
            deliveries += 1
    conn.execute(sql.RESOLVE_HYDRATION_LETTERS, order)
    if snapshot_id is not None:
        conn.execute(
            sql.COVER_NOTIFICATIONS,
            {
                "snapshot_id": snapshot_id,
                "job_id": job.id,
                "max_id": row["claimed_notification_id"],
            },
        )
    requeued = rules.requeued(
        generation=row["generation"], claimed_generation=row["claimed_generation"]
    )
    oldest = conn.execute(sql.OLDEST_UNCOVERED, {"job_id": job.id}).fetchone()["oldest"]
    conn.execute(
        sql.FINISH_JOB,
        {
            "id": job.id,
            "status": "pending" if requeued else "done",
            "retry_at": now if requeued else row["retry_at"],
            "pending_since": oldest if requeued else None,
            "last_version": last_version,
            "last_snapshot_key": last_key,
            "last_updated_at": last_updated,
            "now": now,
        },
    )
    return CompleteResult(
        outcome, snapshot_id=snapshot_id, version=version, deliveries=deliveries, requeued=requeued
    )


def _seen_before(conn: Conn, order: dict[str, Any], key: str) -> bool:
    """Is this state one the order already had, before its newest stored one?"""
    return conn.execute(sql.KNOWN_STATE, {**order, "key": key}).fetchone() is not None


def _insert_snapshot(conn: Conn, order: dict[str, Any], snapshot: NewSnapshot, version: int) -> int:
    cursor = conn.execute(
        sql.INSERT_SNAPSHOT,
        {
            **order,
            "key": snapshot.key,
            "version": version,
            "body": snapshot.body,
            "order_updated_at": snapshot.order_updated_at,
            "hydrated_at": snapshot.hydrated_at,
        },
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _add_delivery(
    conn: Conn,
    order: dict[str, Any],
    sink: str,
    snapshot_id: int,
    version: int,
    job: HydrationJob,
    now: float,
) -> None:
    conn.execute(
        sql.SUPERSEDE_OLDER_PENDING, {**order, "sink": sink, "version": version, "now": now}
    )
    conn.execute(
        sql.INSERT_DELIVERY,
        {
            **order,
            "snapshot_id": snapshot_id,
            "sink": sink,
            "version": version,
            "now": now,
            "first_received_at": job.first_received_at,
        },
    )


def _dead_letter_hydration(
    conn: Conn, job: HydrationJob, reason: str, error: str, now: float
) -> bool:
    row = conn.execute(sql.LEASED_JOB, {"id": job.id, "lease_token": job.lease_token}).fetchone()
    if row is None:
        return False
    return _end_job_in_letter(conn, row, reason, error, now)


def _end_job_in_letter(conn: Conn, row: Row, reason: str, error: str, now: float) -> bool:
    """End a running job (``row``, under its current lease) in a dead letter; False (and
    nothing written) when that lease is no longer current."""
    # Notices that arrived during the fetch are not covered by its failure: they get
    # their own fetch, with a fresh give-up clock from the oldest of them.
    requeue = rules.requeued(
        generation=row["generation"], claimed_generation=row["claimed_generation"]
    )
    pending_since: float | None = None  # a dead job forgets it
    if requeue:
        oldest = conn.execute(
            sql.OLDEST_AFTER_CLAIM,
            {"job_id": row["id"], "after_id": row["claimed_notification_id"]},
        ).fetchone()["oldest"]
        pending_since = now if oldest is None else oldest
    ended = conn.execute(
        sql.END_JOB_FAILED,
        {
            "id": row["id"],
            "lease_token": row["lease_token"],
            "status": "pending" if requeue else "dead",
            "retry_at": now if requeue else row["retry_at"],
            "pending_since": pending_since,
            "error": error,
            "now": now,
        },
    ).rowcount
    if ended != 1:
        return False
    _insert_dead_letter(
        conn,
        kind="hydration",
        brand=row["brand"],
        order_id=row["order_id"],
        sink=None,
        reason=reason,
        error=error,
        # Every attempt made, the one that ends here included (counted when claimed).
        attempts=row["attempts"] + row["not_found_attempts"],
        now=now,
        job_id=row["id"],
    )
    return True


def _complete_delivery(conn: Conn, params: dict[str, Any]) -> bool:
    row = conn.execute(sql.COMPLETE_DELIVERY, params).fetchone()
    if row is None:
        return False
    conn.execute(sql.RESOLVE_DELIVERY_LETTERS, dict(row))
    return True


def _claim_deliveries(conn: Conn, sink: str, limit: int, lease: Lease) -> list[Delivery]:
    """Hand out due deliveries, one per order, superseding those a newer one overtook.

    Works in rounds: a claimed delivery becomes a live in-flight sibling, so the next
    round's query no longer returns its order; superseded ones drop out too.
    """
    claimed: list[Delivery] = []
    seen: set[int] = set()
    while len(claimed) < limit:
        params = {"sink": sink, "now": lease.now, "limit": limit - len(claimed)}
        rows = conn.execute(sql.DUE_PENDING_DELIVERIES, params).fetchall()
        rows += conn.execute(sql.EXPIRED_RUNNING_DELIVERIES, params).fetchall()
        rows = [row for row in rows if row["id"] not in seen]
        if not rows:
            break
        rows.sort(key=lambda row: (row["retry_at"], row["id"]))
        orders_this_round: set[tuple[str, int]] = set()
        for row in rows[: limit - len(claimed)]:
            seen.add(row["id"])
            order = (row["brand"], row["order_id"])
            if order in orders_this_round:
                continue  # one per order; the next round excludes it anyway
            place = {"sink": sink, "brand": order[0], "order_id": order[1]}
            if _overtaken(conn, place, row["version"]):
                conn.execute(sql.SUPERSEDE_DELIVERY, {"id": row["id"], "now": lease.now})
                continue
            if lease.abandoned(row):
                _abandon_delivery(conn, row, lease)
                continue
            delivery = _claim_delivery(conn, row["id"], lease.now, lease.seconds)
            if delivery is None:
                continue  # another claimer won it
            orders_this_round.add(order)
            conn.execute(
                sql.SUPERSEDE_OLDER_UNSENT, {**place, "version": row["version"], "now": lease.now}
            )
            claimed.append(delivery)
    return claimed


def _overtaken(conn: Conn, place: dict[str, Any], version: int) -> bool:
    """Has a newer version of this (sink, order) been attempted, whatever its outcome?"""
    newest = conn.execute(sql.NEWEST_ATTEMPTED_VERSION, place).fetchone()["version"]
    return rules.overtaken(version, newest)


def _abandon_delivery(conn: Conn, candidate: Row, lease: Lease) -> None:
    """End a delivery whose leases keep running out in a dead letter (``lease_lost``)."""
    row = conn.execute(sql.CLAIMED_DELIVERY, {"id": candidate["id"]}).fetchone()
    error = lease.error(candidate)
    dead = conn.execute(
        sql.DEAD_DELIVERY,
        {"id": row["id"], "lease_token": row["lease_token"], "error": error, "now": lease.now},
    ).fetchone()
    if dead is None:
        return  # another claimer took it meanwhile
    _insert_dead_letter(
        conn,
        kind="delivery",
        brand=row["brand"],
        order_id=row["order_id"],
        sink=row["sink"],
        reason=LEASE_LOST,
        error=error,
        attempts=dead["attempts"],
        now=lease.now,
        delivery_id=row["id"],
        snapshot_key=row["snapshot_key"],
    )
    log.warning(
        "store.lease_lost_dead_letter",
        kind="delivery",
        sink=row["sink"],
        brand=row["brand"],
        order_id=row["order_id"],
        delivery_id=row["id"],
        lost_leases=candidate["lost_leases"] + 1,
    )


def _claim_delivery(
    conn: Conn, delivery_id: int, now: float, lease_seconds: float
) -> Delivery | None:
    """Lease one delivery, or None when it is no longer claimable (another claimer won)."""
    token = _token()
    claimed = conn.execute(
        sql.CLAIM_DELIVERY,
        {"id": delivery_id, "lease_until": now + lease_seconds, "lease_token": token, "now": now},
    ).fetchone()
    if claimed is None:
        return None
    row = conn.execute(sql.CLAIMED_DELIVERY, {"id": delivery_id}).fetchone()
    return Delivery(
        id=row["id"],
        sink=row["sink"],
        snapshot_id=row["snapshot_id"],
        snapshot_key=row["snapshot_key"],
        brand=row["brand"],
        order_id=row["order_id"],
        version=row["version"],
        body=bytes(row["body"]),
        attempts=row["attempts"] - 1,  # the claim counted this one; the delivery tells those before
        lease_token=token,
        created_at=row["created_at"],
        first_received_at=row["first_received_at"],
        traceparents=tuple(json.loads(row["traceparents"])),
    )


def _dead_letter_delivery(
    conn: Conn, delivery: Delivery, reason: str, error: str, now: float
) -> bool:
    row = conn.execute(
        sql.DEAD_DELIVERY,
        {"id": delivery.id, "lease_token": delivery.lease_token, "error": error, "now": now},
    ).fetchone()
    if row is None:
        return False
    _insert_dead_letter(
        conn,
        kind="delivery",
        brand=delivery.brand,
        order_id=delivery.order_id,
        sink=delivery.sink,
        reason=reason,
        error=error,
        attempts=row["attempts"],  # counted when claimed, the one that ends here included
        now=now,
        delivery_id=delivery.id,
        snapshot_key=delivery.snapshot_key,
    )
    return True


def _insert_dead_letter(
    conn: Conn,
    *,
    kind: DeadLetterKind,
    brand: str,
    order_id: int,
    sink: str | None,
    reason: str,
    error: str,
    attempts: int,
    now: float,
    job_id: int | None = None,
    delivery_id: int | None = None,
    snapshot_key: str | None = None,
) -> None:
    conn.execute(
        sql.INSERT_DEAD_LETTER,
        {
            "kind": kind,
            "brand": brand,
            "order_id": order_id,
            "sink": sink,
            "reason": reason,
            "last_error": error,
            "attempts": attempts,
            "created_at": now,
            "job_id": job_id,
            "delivery_id": delivery_id,
            "snapshot_key": snapshot_key,
        },
    )


def _filter_params(filt: DeadLetterFilter) -> dict[str, Any]:
    return {"brand": filt.brand, "sink": filt.sink, "reason": filt.reason, "kind": filt.kind}


def _dead_letter(row: Row) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        kind=row["kind"],
        brand=row["brand"],
        order_id=row["order_id"],
        sink=row["sink"],
        reason=row["reason"],
        last_error=row["last_error"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        job_id=row["job_id"],
        delivery_id=row["delivery_id"],
        snapshot_key=row["snapshot_key"],
    )


def _list_dead_letters(
    conn: Conn, filt: DeadLetterFilter, limit: int, after_id: int | None
) -> DeadLetterPage:
    params = _filter_params(filt)
    total = conn.execute(sql.COUNT_DEAD_LETTERS, params).fetchone()[0]
    limit = max(limit, 0)
    # One extra row tells whether another page exists.
    rows = conn.execute(
        sql.LIST_DEAD_LETTERS, {**params, "after_id": after_id or 0, "limit": limit + 1}
    ).fetchall()
    items = [_dead_letter(row) for row in rows[:limit]]
    more = len(rows) > limit and bool(items)
    return DeadLetterPage(items=items, total=total, next_cursor=items[-1].id if more else None)


def _replay(conn: Conn, letter: Row, mode: ReplayMode, now: float) -> None:
    """Re-queue what a dead letter describes (rules.replay_action), then remove the letter."""
    delivery = None
    if letter["delivery_id"] is not None:
        delivery = conn.execute(sql.DELIVERY_PLACE, {"id": letter["delivery_id"]}).fetchone()
    place = dict(delivery) if delivery is not None else {}
    action = rules.replay_action(
        kind=letter["kind"],
        mode=mode,
        delivery_exists=delivery is not None,
        overtaken=delivery is not None and _overtaken(conn, place, delivery["version"]),
    )
    if action == "redeliver":
        conn.execute(sql.REPLAY_DELIVERY, {"id": letter["delivery_id"], "now": now})
    elif action == "supersede":  # a newer state was attempted since: never backwards
        conn.execute(sql.SUPERSEDE_DELIVERY, {"id": letter["delivery_id"], "now": now})
    else:
        job = conn.execute(
            sql.GET_JOB_BY_ORDER, {"brand": letter["brand"], "order_id": letter["order_id"]}
        ).fetchone()
        notice = Notification(
            brand=letter["brand"],
            order_id=letter["order_id"],
            received_at=now,
            venue_id=job["venue_id"] if job is not None else None,
            source="replay",
            force=True,
        )
        _enqueue(conn, notice)
    conn.execute(sql.DELETE_DEAD_LETTER, {"id": letter["id"]})


def _stats(conn: Conn, now: float) -> StoreStats:
    def age(oldest: float | None) -> float | None:
        return None if oldest is None else max(0.0, now - oldest)

    pending = conn.execute(sql.PENDING_JOB_STATS, {"now": now}).fetchone()
    running = conn.execute(sql.RUNNING_JOB_STATS).fetchone()
    oldest_jobs = [v for v in (pending["oldest"], running["oldest"]) if v is not None]
    hydration = QueueStats(
        pending=pending["n"],
        running=running["n"],
        oldest_pending_age=age(min(oldest_jobs) if oldest_jobs else None),
    )
    per_sink: dict[str, dict[str, Any]] = {}
    for status, statement in (
        ("pending", sql.PENDING_DELIVERY_STATS),
        ("running", sql.RUNNING_DELIVERY_STATS),
    ):
        for row in conn.execute(statement, {"now": now}):
            entry = per_sink.setdefault(row["sink"], {"pending": 0, "running": 0, "oldest": []})
            entry[status] = row["n"]
            if row["oldest"] is not None:  # None: all of it waits in a backoff
                entry["oldest"].append(row["oldest"])
    deliveries = {
        sink: QueueStats(
            pending=entry["pending"],
            running=entry["running"],
            oldest_pending_age=age(min(entry["oldest"], default=None)),
        )
        for sink, entry in per_sink.items()
    }
    dead_letters = {
        (row["kind"], row["reason"], row["sink"]): row["n"]
        for row in conn.execute(sql.DEAD_LETTER_STATS)
    }
    return StoreStats(hydration=hydration, deliveries=deliveries, dead_letters=dead_letters)
