"""SQLite: applying a list page's states (the store side of app/list_hydration.py).

Run in the writer process, one call per transaction (a chunk of a page:
``app.list_hydration.APPLY_CHUNK`` orders). The decision is the pure
:func:`app.store.listed.judge_listed`; this module reads what it needs, and writes the
outcome the way a completed fetch is written (app/store/sqlite.py): the next version,
one delivery per sink superseding older undelivered ones, notices covered, the job done,
or still pending for the notices received after the page was read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from app.store import sql
from app.store.base import ListedResult, ListedState, VenueBacklog
from app.store.listed import judge_listed

Conn = sqlite3.Connection
Row = sqlite3.Row

# The newest snapshot of an order, with when it was read (hydrated_at).
LATEST_SNAPSHOT_READ = """
SELECT id, version, key, order_updated_at, hydrated_at FROM snapshots
WHERE brand = :brand AND order_id = :order_id
ORDER BY version DESC LIMIT 1
"""
# Whether an older snapshot of the order had this content (a state it already had).
KEY_SEEN = """
SELECT 1 FROM snapshots WHERE brand = :brand AND order_id = :order_id AND key = :key LIMIT 1
"""
# An order the list showed before anyone notified it: a job with nothing waiting.
INSERT_LISTED_JOB = """
INSERT INTO hydration_jobs (
    brand, order_id, venue_id, status, generation, force_generation, retry_at,
    pending_since, last_version, last_snapshot_key, last_updated_at, created_at, updated_at
) VALUES (
    :brand, :order_id, :venue_id, 'done', 1, 0, :now,
    NULL, :last_version, :last_snapshot_key, :last_updated_at, :now, :now
)
"""
# Notices a read satisfies: those received before it was sent (app.store.listed.covers).
NOTICES_BEFORE_READ = """
SELECT id, received_at FROM notifications
WHERE job_id = :job_id AND snapshot_id IS NULL AND received_at < :read_at
ORDER BY id
"""
COVER_BEFORE_READ = """
UPDATE notifications SET snapshot_id = :snapshot_id
WHERE job_id = :job_id AND snapshot_id IS NULL AND received_at < :read_at
"""
# Done when nothing waits any more; else still pending (due as before) for what waits.
FINISH_LISTED_JOB = """
UPDATE hydration_jobs SET
    status = :status,
    attempts = CASE WHEN :status = 'done' THEN 0 ELSE attempts END,
    not_found_attempts = CASE WHEN :status = 'done' THEN 0 ELSE not_found_attempts END,
    last_error = CASE WHEN :status = 'done' THEN NULL ELSE last_error END,
    pending_since = :pending_since, last_version = :last_version,
    last_snapshot_key = :last_snapshot_key, last_updated_at = :last_updated_at,
    updated_at = :now
WHERE id = :id AND status IN ('pending', 'done')
"""
DUE_BY_VENUE = """
SELECT venue_id, COUNT(*) AS due, MIN(COALESCE(pending_since, created_at)) AS oldest
FROM hydration_jobs
WHERE status = 'pending' AND retry_at <= :now AND brand = :brand AND force_generation = 0
GROUP BY venue_id
ORDER BY due DESC
"""


def apply_listed(
    conn: Conn,
    brand: str,
    states: Sequence[ListedState],
    sinks: list[str],
    read_at: float,
    now: float,
    notified_only: bool,
) -> list[ListedResult]:
    return [_apply_one(conn, brand, s, sinks, read_at, now, notified_only) for s in states]


def due_by_venue(conn: Conn, brand: str, now: float) -> list[VenueBacklog]:
    rows = conn.execute(DUE_BY_VENUE, {"brand": brand, "now": now}).fetchall()
    return [VenueBacklog(row["venue_id"], row["due"], row["oldest"]) for row in rows]


def _apply_one(
    conn: Conn,
    brand: str,
    state: ListedState,
    sinks: list[str],
    read_at: float,
    now: float,
    notified_only: bool,
) -> ListedResult:
    order = {"brand": brand, "order_id": state.order_id}
    job = conn.execute(sql.GET_JOB_BY_ORDER, order).fetchone()
    if job is None:
        if notified_only:
            return ListedResult(state.order_id, "skipped")
        job = _insert_job(conn, order, state, now)
    status: str = job["status"]
    if notified_only and status != "pending":
        return ListedResult(state.order_id, "skipped")
    # A fetch in flight will write its own state; an operator's forced fetch must
    # happen; a dead job belongs to its dead letter until a notice revives it.
    if status not in ("pending", "done") or job["force_generation"] > 0:
        return ListedResult(state.order_id, "deferred")
    latest = conn.execute(LATEST_SNAPSHOT_READ, order).fetchone()
    seen = conn.execute(KEY_SEEN, {**order, "key": state.key}).fetchone() is not None
    judgement = judge_listed(
        key=state.key,
        updated_at=state.updated_at,
        read_at=read_at,
        last_key=job["last_snapshot_key"],
        last_updated_at=job["last_updated_at"],
        last_read_at=latest["hydrated_at"] if latest is not None else None,
        seen_before=seen,
    )
    if judgement == "ambiguous":
        return ListedResult(state.order_id, "ambiguous")
    if judgement == "stored":
        return _store(conn, order, job, latest, state, sinks, read_at, now)
    if latest is None:
        # The stored state's snapshot was pruned: there is nothing to attach notices to.
        return ListedResult(state.order_id, "deferred")
    satisfied = _cover(conn, job["id"], latest["id"], read_at)
    if satisfied:
        _finish(conn, job, now, version=job["last_version"], key=job["last_snapshot_key"])
        conn.execute(sql.RESOLVE_HYDRATION_LETTERS, order)
    return ListedResult(state.order_id, judgement, satisfied, latest["version"])


def _insert_job(conn: Conn, order: dict[str, Any], state: ListedState, now: float) -> Row:
    latest = conn.execute(sql.LATEST_SNAPSHOT_META, order).fetchone()
    conn.execute(
        INSERT_LISTED_JOB,
        {
            **order,
            "venue_id": state.venue_id,
            "now": now,
            "last_version": latest["version"] if latest else 0,
            "last_snapshot_key": latest["key"] if latest else None,
            "last_updated_at": latest["order_updated_at"] if latest else None,
        },
    )
    row: Row = conn.execute(sql.GET_JOB_BY_ORDER, order).fetchone()
    return row


def _store(
    conn: Conn,
    order: dict[str, Any],
    job: Row,
    latest: Row | None,
    state: ListedState,
    sinks: list[str],
    read_at: float,
    now: float,
) -> ListedResult:
    covered = conn.execute(
        NOTICES_BEFORE_READ, {"job_id": job["id"], "read_at": read_at}
    ).fetchall()
    ids = tuple(row["id"] for row in covered)
    received_at = min((row["received_at"] for row in covered), default=read_at)
    version = max(job["last_version"], latest["version"] if latest else 0) + 1
    cursor = conn.execute(
        sql.INSERT_SNAPSHOT,
        {
            **order,
            "key": state.key,
            "version": version,
            "body": state.render(ids, received_at),
            "order_updated_at": state.updated_at,
            "hydrated_at": now,
        },
    )
    snapshot_id = cursor.lastrowid
    deliveries = 0
    for sink in dict.fromkeys(sinks):  # a sink listed twice still gets one delivery
        params = {**order, "sink": sink, "version": version, "now": now}
        conn.execute(sql.SUPERSEDE_OLDER_PENDING, params)
        conn.execute(
            sql.INSERT_DELIVERY,
            {**params, "snapshot_id": snapshot_id, "first_received_at": received_at},
        )
        deliveries += 1
    if ids:
        _cover(conn, job["id"], snapshot_id, read_at)
        conn.execute(sql.RESOLVE_HYDRATION_LETTERS, order)
    updated_at = state.updated_at if state.updated_at is not None else job["last_updated_at"]
    _finish(conn, job, now, version=version, key=state.key, updated_at=updated_at)
    return ListedResult(state.order_id, "stored", len(ids), version, deliveries)


def _cover(conn: Conn, job_id: int, snapshot_id: int | None, read_at: float) -> int:
    params = {"job_id": job_id, "snapshot_id": snapshot_id, "read_at": read_at}
    count: int = conn.execute(COVER_BEFORE_READ, params).rowcount
    return count


def _finish(
    conn: Conn,
    job: Row,
    now: float,
    *,
    version: int,
    key: str | None,
    updated_at: float | None = None,
) -> None:
    """Done if nothing waits any more, else pending since the oldest notice still waiting."""
    oldest = conn.execute(sql.OLDEST_UNCOVERED, {"job_id": job["id"]}).fetchone()["oldest"]
    conn.execute(
        FINISH_LISTED_JOB,
        {
            "id": job["id"],
            "status": "done" if oldest is None else "pending",
            "pending_since": oldest,
            "last_version": version,
            "last_snapshot_key": key,
            "last_updated_at": updated_at if updated_at is not None else job["last_updated_at"],
            "now": now,
        },
    )
