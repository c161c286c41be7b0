"""PostgreSQL: applying a list page's states (the store side of app/list_hydration.py).

The same steps as :mod:`app.store.sqlite_listed`, in one transaction per call (a chunk
of a page), with the decision in the pure :func:`app.store.listed.judge_listed`. Several
replicas may apply pages (and complete fetches) at once: each order's job row is locked
(``FOR UPDATE``) before it is judged, as a completion locks it, so two writers of one
order serialize. Orders are locked in id order, so two pages that share orders cannot
deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import DictRow

from app.store import pg_sql as sql
from app.store.base import ListedResult, ListedState, VenueBacklog
from app.store.listed import judge_listed

Conn = psycopg.AsyncConnection[DictRow]

LATEST_SNAPSHOT_READ = """
SELECT id, version, key, order_updated_at, hydrated_at FROM snapshots
WHERE brand = %(brand)s AND order_id = %(order_id)s
ORDER BY version DESC LIMIT 1
"""
# Whether an older snapshot of the order had this content (a state it already had).
KEY_SEEN = """
SELECT 1 FROM snapshots
WHERE brand = %(brand)s AND order_id = %(order_id)s AND key = %(key)s LIMIT 1
"""
# An order the list showed before anyone notified it: a job with nothing waiting.
INSERT_LISTED_JOB = """
INSERT INTO hydration_jobs (
    brand, order_id, venue_id, status, generation, force_generation, retry_at,
    pending_since, last_version, last_snapshot_key, last_updated_at, created_at, updated_at
)
SELECT %(brand)s, %(order_id)s, %(venue_id)s, 'done', 1, 0, %(now)s,
       NULL, COALESCE(s.version, 0), s.key, s.order_updated_at, %(now)s, %(now)s
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT version, key, order_updated_at FROM snapshots
    WHERE brand = %(brand)s AND order_id = %(order_id)s
    ORDER BY version DESC LIMIT 1
) AS s ON TRUE
ON CONFLICT (brand, order_id) DO NOTHING
"""
NOTICES_BEFORE_READ = """
SELECT id, received_at FROM notifications
WHERE job_id = %(job_id)s AND snapshot_id IS NULL AND received_at < %(read_at)s
ORDER BY id
"""
COVER_BEFORE_READ = """
UPDATE notifications SET snapshot_id = %(snapshot_id)s
WHERE job_id = %(job_id)s AND snapshot_id IS NULL AND received_at < %(read_at)s
"""
FINISH_LISTED_JOB = """
UPDATE hydration_jobs SET
    status = %(status)s,
    attempts = CASE WHEN %(status)s = 'done' THEN 0 ELSE attempts END,
    not_found_attempts = CASE WHEN %(status)s = 'done' THEN 0 ELSE not_found_attempts END,
    last_error = CASE WHEN %(status)s = 'done' THEN NULL ELSE last_error END,
    pending_since = %(pending_since)s, last_version = %(last_version)s,
    last_snapshot_key = %(last_snapshot_key)s, last_updated_at = %(last_updated_at)s,
    updated_at = %(now)s
WHERE id = %(id)s AND status IN ('pending', 'done')
"""
DUE_BY_VENUE = """
SELECT venue_id, COUNT(*) AS due, MIN(COALESCE(pending_since, created_at)) AS oldest
FROM hydration_jobs
WHERE status = 'pending' AND retry_at <= %(now)s AND brand = %(brand)s
  AND force_generation = 0
GROUP BY venue_id
ORDER BY due DESC
"""


async def apply_listed(
    conn: Conn,
    brand: str,
    states: Sequence[ListedState],
    sinks: list[str],
    read_at: float,
    now: float,
    notified_only: bool,
) -> list[ListedResult]:
    by_id = {state.order_id: state for state in states}
    results = {}
    for order_id in sorted(by_id):
        results[order_id] = await _apply_one(
            conn, brand, by_id[order_id], sinks, read_at, now, notified_only
        )
    return [results[state.order_id] for state in states if state.order_id in results]


async def due_by_venue(conn: Conn, brand: str, now: float) -> list[VenueBacklog]:
    rows = await (await conn.execute(DUE_BY_VENUE, {"brand": brand, "now": now})).fetchall()
    return [VenueBacklog(row["venue_id"], int(row["due"]), row["oldest"]) for row in rows]


async def _one(conn: Conn, statement: str, params: dict[str, Any]) -> DictRow | None:
    return await (await conn.execute(statement, params)).fetchone()


async def _apply_one(
    conn: Conn,
    brand: str,
    state: ListedState,
    sinks: list[str],
    read_at: float,
    now: float,
    notified_only: bool,
) -> ListedResult:
    order = {"brand": brand, "order_id": state.order_id}
    job = await _one(conn, sql.LOCK_JOB_BY_ORDER, order)
    if job is None:
        if notified_only:
            return ListedResult(state.order_id, "skipped")
        await conn.execute(INSERT_LISTED_JOB, {**order, "venue_id": state.venue_id, "now": now})
        job = await _one(conn, sql.LOCK_JOB_BY_ORDER, order)
        assert job is not None
    status: str = job["status"]
    if notified_only and status != "pending":
        return ListedResult(state.order_id, "skipped")
    if status not in ("pending", "done") or job["force_generation"] > 0:
        return ListedResult(state.order_id, "deferred")
    latest = await _one(conn, LATEST_SNAPSHOT_READ, order)
    seen = await _one(conn, KEY_SEEN, {**order, "key": state.key}) is not None
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
        return await _store(conn, order, job, latest, state, sinks, read_at, now)
    if latest is None:
        return ListedResult(state.order_id, "deferred")
    satisfied = await _cover(conn, job["id"], latest["id"], read_at)
    if satisfied:
        await _finish(conn, job, now, version=job["last_version"], key=job["last_snapshot_key"])
        await conn.execute(sql.RESOLVE_HYDRATION_LETTERS, order)
    return ListedResult(state.order_id, judgement, satisfied, latest["version"])


async def _store(
    conn: Conn,
    order: dict[str, Any],
    job: DictRow,
    latest: DictRow | None,
    state: ListedState,
    sinks: list[str],
    read_at: float,
    now: float,
) -> ListedResult:
    covered = await (
        await conn.execute(NOTICES_BEFORE_READ, {"job_id": job["id"], "read_at": read_at})
    ).fetchall()
    ids = tuple(row["id"] for row in covered)
    received_at = min((row["received_at"] for row in covered), default=read_at)
    version = max(job["last_version"], latest["version"] if latest else 0) + 1
    inserted = await _one(
        conn,
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
    assert inserted is not None
    deliveries = 0
    for sink in dict.fromkeys(sinks):  # a sink listed twice still gets one delivery
        params = {**order, "sink": sink, "version": version, "now": now}
        await conn.execute(sql.SUPERSEDE_OLDER_PENDING, params)
        await conn.execute(
            sql.INSERT_DELIVERY,
            {**params, "snapshot_id": inserted["id"], "first_received_at": received_at},
        )
        deliveries += 1
    if ids:
        await _cover(conn, job["id"], inserted["id"], read_at)
        await conn.execute(sql.RESOLVE_HYDRATION_LETTERS, order)
    updated_at = state.updated_at if state.updated_at is not None else job["last_updated_at"]
    await _finish(conn, job, now, version=version, key=state.key, updated_at=updated_at)
    return ListedResult(state.order_id, "stored", len(ids), version, deliveries)


async def _cover(conn: Conn, job_id: int, snapshot_id: int, read_at: float) -> int:
    params = {"job_id": job_id, "snapshot_id": snapshot_id, "read_at": read_at}
    return (await conn.execute(COVER_BEFORE_READ, params)).rowcount


async def _finish(
    conn: Conn,
    job: DictRow,
    now: float,
    *,
    version: int,
    key: str | None,
    updated_at: float | None = None,
) -> None:
    row = await _one(conn, sql.OLDEST_UNCOVERED, {"job_id": job["id"]})
    oldest = row["oldest"] if row is not None else None
    await conn.execute(
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
