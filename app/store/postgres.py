"""The PostgreSQL store: the store port shared by several replicas of the service.

Semantics are the port's (:mod:`app.store.base`) and SQLite's (:mod:`app.store.sqlite`
explains the bookkeeping columns); this module is about keeping them when several
processes work on one database at once:

* Every operation is one transaction on a pooled connection (psycopg 3,
  ``psycopg_pool``). A hydration job's row lock serializes everything about its order's
  job; claims lock with ``FOR UPDATE SKIP LOCKED`` (see :mod:`app.store.pg_sql`).
* Nothing is voided when a store opens: other replicas' leases are live. A lease ends
  when it expires by the **database's** clock (``lease_clock="database"``, the default),
  never by a replica's. ``lease_clock="caller"`` measures leases by the ``now`` the caller
  passes, as SQLite does; the store contract tests drive time that way.
* Schema migrations run under an advisory lock (:mod:`app.store.pg_migrate`), so
  replicas may start together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from app.errors import StoreError
from app.logs import get_logger
from app.store import pg_listed, rules
from app.store import pg_sql as sql
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
    SharedBudgetRow,
    StoreStats,
    TenantSpend,
    VenueBacklog,
    WorkKind,
)
from app.store.pg_migrate import migrate

log = get_logger("app.store.postgres")
Conn = psycopg.AsyncConnection[DictRow]
LeaseClock = Literal["database", "caller"]

MAX_NOTIFICATION_IDS = 1000
PRUNE_CHUNK = 2000
INT8_MAX = 2**63 - 1
# Transient conflicts between replicas' transactions: the operation is simply run again.
RETRIED_ERRORS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
ATTEMPTS_ON_CONFLICT = 5
WORK_KINDS: tuple[WorkKind, ...] = ("hydration", "delivery")
LISTEN_RETRY_SECONDS = 0.5
LISTEN_RETRY_MAX_SECONDS = 30.0
# What other replicas see of this one (pg_stat_activity.application_name, 63 bytes max).
PROCESS_NAME = f"{socket.gethostname()}:{os.getpid()}"[-63:]


def _int8(value: int) -> int:
    """Refuse an id PostgreSQL's bigint cannot hold (psycopg would bind it as numeric)."""
    if not -INT8_MAX - 1 <= value <= INT8_MAX:
        raise StoreError(f"id {value} is out of range")
    return value


class PostgresStore:
    """The store port on one PostgreSQL database (libpq URL or key/value conninfo)."""

    def __init__(
        self,
        conninfo: str,
        *,
        pool_size: int = 10,
        lease_clock: LeaseClock = "database",
        clock: Callable[[], float] = time.time,
        process_name: str = PROCESS_NAME,
    ) -> None:
        self.conninfo = conninfo
        self._pool_size = pool_size
        self._lease_clock = lease_clock
        # Only for bookkeeping stamps (updated_at) of calls that take no ``now``.
        self._clock = clock
        self._pool: AsyncConnectionPool[Conn] | None = None
        self.process_name = process_name
        # The poller's leadership: a connection of its own holds the brands' locks.
        self._leader: Conn | None = None
        self._leading: set[str] = set()
        self._leader_lock = asyncio.Lock()

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            async with await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True
            ) as conn:
                applied = await migrate(conn)
            pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
                self.conninfo,
                min_size=1,
                max_size=self._pool_size,
                kwargs={"autocommit": True, "row_factory": dict_row},
                open=False,
                name="clopos-hydrator",
            )
            await pool.open(wait=True, timeout=30)
        except (psycopg.Error, OSError) as error:
            raise StoreError(f"open: {error}") from error
        self._pool = pool
        if applied:
            log.info("store.migrated", applied=applied)

    async def close(self) -> None:
        leader, self._leader = self._leader, None
        self._leading.clear()
        if leader is not None:
            await leader.close()  # lets go of every brand this process polled
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _transaction(self, name: str) -> AsyncIterator[Conn]:
        if self._pool is None:
            raise StoreError(f"{name}: the store is not open")
        async with self._pool.connection() as conn, conn.transaction():
            yield conn

    async def _run(self, name: str, op: Callable[[Conn], Any]) -> Any:
        """Run ``op`` in one transaction; conflicts with other replicas are retried."""
        for attempt in range(ATTEMPTS_ON_CONFLICT):
            try:
                async with self._transaction(name) as conn:
                    return await op(conn)
            except RETRIED_ERRORS:
                if attempt + 1 == ATTEMPTS_ON_CONFLICT:
                    raise
            except StoreError:
                raise
            except (psycopg.Error, OSError) as error:
                raise StoreError(f"{name}: {error}") from error
        raise StoreError(f"{name}: gave up after repeated conflicts")  # pragma: no cover

    def _lease_now(self, now: float) -> float | None:
        return now if self._lease_clock == "caller" else None

    async def ping(self) -> None:
        async def beat(conn: Conn) -> None:
            cursor = await conn.execute(sql.HEARTBEAT, {"now": self._clock()})
            if cursor.rowcount != 1:
                raise StoreError("ping: the heartbeat row is missing")

        await self._run("ping", beat)

    # --- ingest -------------------------------------------------------------------------

    async def enqueue(self, notification: Notification) -> EnqueueResult:
        try:
            async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                result: EnqueueResult = await self._run(
                    "enqueue", lambda conn: _enqueue(conn, notification)
                )
        except TimeoutError as exc:
            raise StoreError(f"enqueue: no answer within {ENQUEUE_TIMEOUT_SECONDS:g} s") from exc
        return result

    async def enqueue_many(self, notifications: Sequence[Notification]) -> list[EnqueueResult]:
        if not notifications:
            return []
        # Jobs are locked in one global order (brand, order id), so two replicas enqueueing
        # overlapping batches wait for each other instead of deadlocking.
        order = sorted(range(len(notifications)), key=lambda i: _order_key(notifications[i]))

        async def enqueue_all(conn: Conn) -> list[EnqueueResult]:
            results: dict[int, EnqueueResult] = {}
            for index in order:
                results[index] = await _enqueue(conn, notifications[index])
            return [results[index] for index in range(len(notifications))]

        done: list[EnqueueResult] = await self._run("enqueue_many", enqueue_all)
        return done

    async def watch_work(self, wake: Callable[[WorkKind], None]) -> None:
        """LISTEN on a connection of its own (not the pool's); reconnect with a backoff."""
        backoff = LISTEN_RETRY_SECONDS
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {sql.WORK_CHANNEL}")
                    backoff = LISTEN_RETRY_SECONDS
                    for kind in WORK_KINDS:  # whatever was notified while not listening
                        wake(kind)
                    async for note in conn.notifies():
                        if note.payload in WORK_KINDS:
                            wake(note.payload)
            except (psycopg.Error, OSError) as error:
                log.warning("store.listen_failed", error=str(error), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, LISTEN_RETRY_MAX_SECONDS)

    # --- hydration queue ------------------------------------------------------------------

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
        params = {
            "now": now,
            "lease_now": self._lease_now(now),
            "lease_seconds": lease_seconds,
            "limit": limit,
            "exclude": sorted(exclude_brands),
            "max_lost_leases": max_lost_leases,
        }
        jobs: list[HydrationJob] = await self._run(
            "claim_hydrations", lambda conn: _claim_hydrations(conn, params)
        )
        return jobs

    async def extend_hydration_lease(
        self, job: HydrationJob, *, now: float, lease_seconds: float
    ) -> bool:
        params = {
            "id": job.id,
            "lease_token": job.lease_token,
            "lease_now": self._lease_now(now),
            "lease_seconds": lease_seconds,
        }
        return await self._changed("extend_hydration_lease", sql.EXTEND_JOB_LEASE, params)

    async def complete_hydration(
        self, job: HydrationJob, snapshot: NewSnapshot, sinks: list[str], *, now: float
    ) -> CompleteResult:
        result: CompleteResult = await self._run(
            "complete_hydration", lambda conn: _complete_hydration(conn, job, snapshot, sinks, now)
        )
        return result

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
            "add_attempt": int(count_attempt and not not_found),
            "add_not_found": int(not_found),
            "now": self._clock(),
        }
        return await self._changed("retry_hydration", sql.RETRY_JOB, params)

    async def release_hydration(self, job: HydrationJob) -> bool:
        params = {"id": job.id, "lease_token": job.lease_token, "now": self._clock()}
        return await self._changed("release_hydration", sql.RELEASE_JOB, params)

    async def dead_letter_hydration(
        self, job: HydrationJob, *, reason: str, error: str, now: float
    ) -> bool:
        done: bool = await self._run(
            "dead_letter_hydration",
            lambda conn: _dead_letter_hydration(conn, job, reason, error, now),
        )
        return done

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
        params = {
            "sink": sink,
            "now": now,
            "lease_now": self._lease_now(now),
            "lease_seconds": lease_seconds,
            "max_lost_leases": max_lost_leases,
        }
        claimed: list[Delivery] = await self._run(
            "claim_deliveries", lambda conn: _claim_deliveries(conn, params, limit)
        )
        return claimed

    async def extend_delivery_lease(
        self, delivery: Delivery, *, now: float, lease_seconds: float
    ) -> bool:
        params = {
            "id": delivery.id,
            "lease_token": delivery.lease_token,
            "lease_now": self._lease_now(now),
            "lease_seconds": lease_seconds,
        }
        return await self._changed("extend_delivery_lease", sql.EXTEND_DELIVERY_LEASE, params)

    async def complete_delivery(self, delivery: Delivery, *, now: float) -> bool:
        params = {"id": delivery.id, "lease_token": delivery.lease_token, "now": now}

        async def complete(conn: Conn) -> bool:
            row = await (await conn.execute(sql.COMPLETE_DELIVERY, params)).fetchone()
            if row is None:
                return False
            await conn.execute(sql.RESOLVE_DELIVERY_LETTERS, row)
            return True

        done: bool = await self._run("complete_delivery", complete)
        return done

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
        return await self._changed("retry_delivery", sql.RETRY_DELIVERY, params)

    async def release_delivery(self, delivery: Delivery) -> bool:
        params = {"id": delivery.id, "lease_token": delivery.lease_token, "now": self._clock()}
        return await self._changed("release_delivery", sql.RELEASE_DELIVERY, params)

    async def dead_letter_delivery(
        self, delivery: Delivery, *, reason: str, error: str, now: float
    ) -> bool:
        done: bool = await self._run(
            "dead_letter_delivery",
            lambda conn: _dead_letter_delivery(conn, delivery, reason, error, now),
        )
        return done

    # --- dead letters -----------------------------------------------------------------------

    async def list_dead_letters(
        self, filt: DeadLetterFilter, *, limit: int = 50, after_id: int | None = None
    ) -> DeadLetterPage:
        page: DeadLetterPage = await self._run(
            "list_dead_letters", lambda conn: _list_dead_letters(conn, filt, limit, after_id)
        )
        return page

    async def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        params = {"id": _int8(dead_letter_id)}

        async def get(conn: Conn) -> DeadLetter | None:
            row = await (await conn.execute(sql.GET_DEAD_LETTER, params)).fetchone()
            return None if row is None else _dead_letter(row)

        letter: DeadLetter | None = await self._run("get_dead_letter", get)
        return letter

    async def replay_dead_letter(
        self, dead_letter_id: int, *, mode: ReplayMode = "auto", now: float
    ) -> bool:
        params = {"id": _int8(dead_letter_id)}

        async def replay(conn: Conn) -> bool:
            row = await (await conn.execute(sql.LOCK_DEAD_LETTER, params)).fetchone()
            if row is None:
                return False
            await _replay(conn, row, mode, now)
            return True

        done: bool = await self._run("replay_dead_letter", replay)
        return done

    async def replay_dead_letters(
        self, filt: DeadLetterFilter, *, mode: ReplayMode = "auto", now: float, limit: int = 1000
    ) -> int:
        async def replay_many(conn: Conn) -> int:
            params = {**_filter_params(filt), "limit": max(limit, 0)}
            cursor = await conn.execute(sql.DEAD_LETTER_IDS, params)
            ids = [row["id"] for row in await cursor.fetchall()]
            replayed = 0
            for letter_id in ids:
                cursor = await conn.execute(sql.LOCK_DEAD_LETTER, {"id": letter_id})
                row = await cursor.fetchone()
                if row is not None:  # another replica replayed or purged it meanwhile
                    await _replay(conn, row, mode, now)
                    replayed += 1
            return replayed

        count: int = await self._run("replay_dead_letters", replay_many)
        return count

    async def purge_dead_letter(self, dead_letter_id: int) -> bool:
        return await self._changed(
            "purge_dead_letter", sql.DELETE_DEAD_LETTER, {"id": _int8(dead_letter_id)}
        )

    async def purge_dead_letters(self, filt: DeadLetterFilter) -> int:
        params = _filter_params(filt)

        async def purge(conn: Conn) -> int:
            return (await conn.execute(sql.PURGE_DEAD_LETTERS, params)).rowcount

        count: int = await self._run("purge_dead_letters", purge)
        return count

    # --- upkeep and observation -------------------------------------------------------------

    async def prune(self, *, older_than: float) -> PruneResult:
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
                deleted = await self._rowcount(f"prune_{name}", statement, params)
                counts[name] += deleted
                if deleted < PRUNE_CHUNK:
                    break
        return PruneResult(**counts)

    async def stats(self, *, now: float) -> StoreStats:
        stats: StoreStats = await self._run("stats", lambda conn: _stats(conn, now))
        return stats

    async def latest_snapshot_body(self, brand: str, order_id: int) -> bytes | None:
        params = {"brand": brand, "order_id": _int8(order_id)}

        async def latest(conn: Conn) -> bytes | None:
            row = await (await conn.execute(sql.LATEST_SNAPSHOT_BODY, params)).fetchone()
            return None if row is None else bytes(row["body"])

        body: bytes | None = await self._run("latest_snapshot_body", latest)
        return body

    # --- reconciliation poller ---------------------------------------------------------------

    async def get_poll_watermark(self, brand: str) -> float | None:
        async def get(conn: Conn) -> float | None:
            cursor = await conn.execute(sql.GET_POLL_WATERMARK, {"brand": brand})
            row = await cursor.fetchone()
            return None if row is None else float(row["updated_at"])

        mark: float | None = await self._run("get_poll_watermark", get)
        return mark

    async def set_poll_watermark(self, brand: str, updated_at: float, *, now: float) -> float:
        params = {"brand": brand, "updated_at": updated_at, "now": now}

        async def advance(conn: Conn) -> float:
            row = await (await conn.execute(sql.SET_POLL_WATERMARK, params)).fetchone()
            assert row is not None  # INSERT ... RETURNING always returns the row
            return float(row["updated_at"])

        mark: float = await self._run("set_poll_watermark", advance)
        return mark

    async def record_budget_spend(self, tenant: str, *, at: float, limit: int) -> None:
        params = {
            "tenant": tenant,
            "at": at,
            "limit": limit,
            "before": at - BUDGET_SPEND_KEEP_SECONDS,
        }

        async def record(conn: Conn) -> None:
            await conn.execute(sql.FORGET_BUDGET_SPEND, params)
            await conn.execute(sql.RECORD_BUDGET_SPEND, params)

        await self._run("record_budget_spend", record)

    async def budget_spend_since(self, since: float) -> dict[str, TenantSpend]:
        async def read(conn: Conn) -> dict[str, TenantSpend]:
            times: dict[str, list[float]] = {}
            limits: dict[str, int] = {}
            cursor = await conn.execute(sql.BUDGET_SPEND_SINCE, {"since": since})
            for row in await cursor.fetchall():
                times.setdefault(row["tenant"], []).append(float(row["at"]))
                limits[row["tenant"]] = int(row["limit_per_minute"])  # the newest wins
            return {t: TenantSpend(tuple(at), limits[t]) for t, at in times.items()}

        spent: dict[str, TenantSpend] = await self._run("budget_spend_since", read)
        return spent

    async def lead_poller(self, brand: str) -> PollerLead:
        params = {"class": sql.POLLER_LOCK_CLASS, "brand": brand}
        async with self._leader_lock:
            try:
                conn = await self._leader_connection()
                if brand in self._leading:
                    await conn.execute(sql.STILL_CONNECTED)  # the lock lives with the session
                else:
                    row = await (await conn.execute(sql.TRY_LEAD_POLLER, params)).fetchone()
                    if row is not None and row["locked"]:
                        self._leading.add(brand)
                        log.info("poller.lead_taken", brand=brand, process=self.process_name)
                if brand in self._leading:
                    return PollerLead(leading=True, holder=self.process_name)
                row = await (await conn.execute(sql.POLLER_HOLDER, params)).fetchone()
                return PollerLead(leading=False, holder=row["holder"] if row else None)
            except (psycopg.Error, OSError) as error:
                # The session is gone, and every lock with it: poll nothing until it is back.
                await self._drop_leader(error)
                return PollerLead(leading=False, holder=None)

    async def _leader_connection(self) -> Conn:
        if self._leader is None or self._leader.closed:
            self._leading.clear()
            self._leader = await psycopg.AsyncConnection.connect(
                self.conninfo,
                autocommit=True,
                row_factory=dict_row,
                application_name=self.process_name,
            )
        return self._leader

    async def _drop_leader(self, error: BaseException) -> None:
        leader, self._leader = self._leader, None
        if self._leading:
            log.warning("poller.lead_lost", brands=sorted(self._leading), error=str(error))
        self._leading.clear()
        if leader is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await leader.close()

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
        for state in states:
            _int8(state.order_id)

        async def apply(conn: Conn) -> list[ListedResult]:
            return await pg_listed.apply_listed(
                conn, brand, states, sinks, read_at, now, notified_only
            )

        results: list[ListedResult] = await self._run("apply_listed", apply)
        return results

    async def due_by_venue(self, brand: str, *, now: float) -> list[VenueBacklog]:
        async def read(conn: Conn) -> list[VenueBacklog]:
            return await pg_listed.due_by_venue(conn, brand, now)

        groups: list[VenueBacklog] = await self._run("due_by_venue", read)
        return groups

    async def known_states(self, brand: str, order_ids: Sequence[int]) -> dict[int, KnownState]:
        if not order_ids:
            return {}
        known = dict.fromkeys((_int8(int(i)) for i in order_ids), KnownState())
        params = {"brand": brand, "ids": list(known)}

        async def read(conn: Conn) -> dict[int, KnownState]:
            for row in await (await conn.execute(sql.KNOWN_STATES, params)).fetchall():
                known[row["order_id"]] = KnownState(
                    row["last_snapshot_key"], row["last_updated_at"]
                )
            return known

        result: dict[int, KnownState] = await self._run("known_states", read)
        return result

    # --- the Clopos budget shared by replicas (app/clopos/shared_budget.py) ---------------

    async def take_rate_budget(
        self, tenant: str, *, limit: int, burst: int, margin: float, reserve_fraction: float
    ) -> float:
        """Take one call's slot now (0.0) or say how many seconds to wait first."""
        params = {
            "tenant": tenant,
            "limit": limit,
            "burst": burst,
            "margin": margin,
            "reserve_fraction": reserve_fraction,
        }

        async def take(conn: Conn) -> float:
            row = await _fetchone(conn, sql.TAKE_RATE_BUDGET, params)
            return float(row["wait"]) if row is not None else 0.0

        wait: float = await self._run("take_rate_budget", take)
        return wait

    async def observe_rate_budget(
        self,
        tenant: str,
        *,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        hold: float | None,
    ) -> None:
        """Record what Clopos answered (RateLimit-* headers; ``hold`` s after a 429)."""
        params = {
            "tenant": tenant,
            "limit": limit,
            "remaining": remaining,
            "reset": reset,
            "hold": hold,
        }
        await self._rowcount("observe_rate_budget", sql.OBSERVE_RATE_BUDGET, params)

    async def rate_budgets(self) -> dict[str, tuple[int, int | None, float]]:
        """Per tenant: calls granted so far (all replicas), the limit Clopos announced,
        and the seconds it is still held after a 429."""

        async def read(conn: Conn) -> dict[str, tuple[int, int | None, float]]:
            rows = await (await conn.execute(sql.RATE_BUDGETS)).fetchall()
            return {r["tenant"]: (r["grants"], r["server_limit"], r["held_for"]) for r in rows}

        budgets: dict[str, tuple[int, int | None, float]] = await self._run("rate_budgets", read)
        return budgets

    async def shared_budgets(self) -> dict[str, SharedBudgetRow]:
        """Every tenant's shared budget row, as /admin/status shows it (the fleet's view)."""

        async def read(conn: Conn) -> dict[str, SharedBudgetRow]:
            rows = await (await conn.execute(sql.SHARED_BUDGETS)).fetchall()
            return {
                r["tenant"]: SharedBudgetRow(
                    grants=int(r["grants"]),
                    tat_ahead_seconds=float(r["tat_ahead"]),
                    held_for_seconds=float(r["held_for"]),
                    server_limit=r["server_limit"],
                    server_remaining=r["remaining"],
                    server_reset_in_seconds=float(r["reset_in"]),
                )
                for r in rows
            }

        budgets: dict[str, SharedBudgetRow] = await self._run("shared_budgets", read)
        return budgets

    # --- helpers ------------------------------------------------------------------------------

    async def _rowcount(self, name: str, statement: str, params: dict[str, Any]) -> int:
        async def execute(conn: Conn) -> int:
            return (await conn.execute(statement, params)).rowcount

        count: int = await self._run(name, execute)
        return count

    async def _changed(self, name: str, statement: str, params: dict[str, Any]) -> bool:
        """A single-row, lease-checked UPDATE/DELETE: did it change the row?"""
        return await self._rowcount(name, statement, params) == 1


# --- operations (each inside one transaction) -------------------------------------------


async def _fetchone(conn: Conn, statement: str, params: dict[str, Any]) -> DictRow | None:
    return await (await conn.execute(statement, params)).fetchone()


def _order_key(notice: Notification) -> tuple[str, int]:
    return (notice.brand, notice.order_id)


async def _enqueue(conn: Conn, notice: Notification) -> EnqueueResult:
    order = {"brand": notice.brand, "order_id": _int8(notice.order_id)}
    inserted = await _fetchone(
        conn,
        sql.INSERT_JOB,
        {
            **order,
            "venue_id": notice.venue_id,
            "force_generation": 1 if notice.force else 0,
            "now": notice.received_at,
        },
    )
    if inserted is not None:
        job_id, coalesced = inserted["id"], False
    else:
        # The job's row lock serializes this order's notices (and their dedup check).
        job = await _fetchone(conn, sql.LOCK_JOB_BY_ORDER, order)
        if job is None:  # pragma: no cover - the conflicting row cannot vanish while locked
            raise StoreError("enqueue: the order's job vanished")
        if notice.dedup_key is not None:
            dup = await _fetchone(
                conn, sql.FIND_DUPLICATE, {**order, "dedup_key": notice.dedup_key}
            )
            if dup is not None:
                return EnqueueResult(
                    notification_id=None,
                    job_id=dup["job_id"],
                    duplicate=True,
                    previous_signed_at=dup["signed_at"],
                )
        job_id, coalesced = job["id"], await _notice_job(conn, job, notice)
    row = await _fetchone(
        conn,
        sql.INSERT_NOTIFICATION,
        {
            **order,
            "job_id": job_id,
            "venue_id": notice.venue_id,
            "dedup_key": notice.dedup_key,
            "signed_at": notice.signed_at,
            "source": notice.source,
            "force": notice.force,
            "received_at": notice.received_at,
            "traceparent": notice.traceparent,
        },
    )
    assert row is not None
    return EnqueueResult(notification_id=row["id"], job_id=job_id, coalesced=coalesced)


async def _notice_job(conn: Conn, job: DictRow, notice: Notification) -> bool:
    """Fold a notice into an existing (locked) job: rules.on_notice, as on SQLite."""
    patch = rules.on_notice(
        rules.JobState(
            status=job["status"],
            venue_id=job["venue_id"],
            generation=job["generation"],
            force_generation=job["force_generation"],
            attempts=job["attempts"],
            not_found_attempts=job["not_found_attempts"],
            retry_at=job["retry_at"],
            pending_since=job["pending_since"],
            last_error=job["last_error"],
        ),
        notice,
    )
    await conn.execute(
        sql.UPDATE_JOB_ON_NOTICE, {"id": job["id"], "now": notice.received_at, **patch.columns()}
    )
    return patch.coalesced


def _abandoned(candidate: DictRow, max_lost: int) -> bool:
    return rules.abandoned(
        status=candidate["status"],
        lost_leases=candidate["lost_leases"],
        max_lost_leases=max_lost,
    )


def _lease_lost_error(candidate: DictRow) -> str:
    return rules.lease_lost_error(candidate["lost_leases"])


async def _claim_hydrations(conn: Conn, params: dict[str, Any]) -> list[HydrationJob]:
    picked: list[int] = []
    for candidate in await (await conn.execute(sql.PICK_JOBS, params)).fetchall():
        if not _abandoned(candidate, params["max_lost_leases"]):
            picked.append(candidate["id"])
            continue
        row = await _fetchone(conn, sql.GET_JOB_FOR_UPDATE, {"id": candidate["id"]})
        assert row is not None  # locked by PICK_JOBS
        error = _lease_lost_error(candidate)
        if await _end_job_in_letter(conn, row, LEASE_LOST, error, params["now"]):
            log.warning(
                "store.lease_lost_dead_letter",
                kind="hydration",
                brand=row["brand"],
                order_id=row["order_id"],
                job_id=row["id"],
                lost_leases=candidate["lost_leases"] + 1,
            )
    if not picked:
        return []
    rows = await (await conn.execute(sql.CLAIM_JOBS, {**params, "ids": picked})).fetchall()
    rows.sort(key=lambda row: (row["retry_at"], row["id"]))
    covered: dict[int, list[int]] = {row["id"]: [] for row in rows}
    traces: dict[int, list[str]] = {row["id"]: [] for row in rows}
    id_rows = await conn.execute(
        sql.CLAIMED_NOTIFICATION_IDS,
        {
            "ids": [row["id"] for row in rows],
            "max_ids": [row["claimed_notification_id"] for row in rows],
            "limit": MAX_NOTIFICATION_IDS,
        },
    )
    for id_row in await id_rows.fetchall():
        covered[id_row["job_id"]].append(id_row["id"])
        if id_row["traceparent"]:
            traces[id_row["job_id"]].append(id_row["traceparent"])
    return [_hydration_job(row, covered[row["id"]], traces[row["id"]]) for row in rows]


def _hydration_job(
    row: DictRow, notification_ids: list[int], traceparents: list[str]
) -> HydrationJob:
    first_received_at = row["pending_since"]
    if first_received_at is None:
        first_received_at = row["uncovered_since"] or row["created_at"]
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
        notification_ids=tuple(notification_ids),
        first_received_at=first_received_at,
        created_at=row["created_at"],
        traceparents=tuple(traceparents),
    )


async def _complete_hydration(
    conn: Conn, job: HydrationJob, snapshot: NewSnapshot, sinks: list[str], now: float
) -> CompleteResult:
    row = await _fetchone(conn, sql.LOCK_LEASED_JOB, {"id": job.id, "lease_token": job.lease_token})
    if row is None:
        return CompleteResult("lost_lease")
    order = {"brand": row["brand"], "order_id": row["order_id"]}
    latest = await _fetchone(conn, sql.LATEST_SNAPSHOT_META, order)
    last_version, last_key, last_updated = (
        row["last_version"],
        row["last_snapshot_key"],
        row["last_updated_at"],
    )
    outcome: HydrationOutcome
    deliveries = 0
    snapshot_id: int | None = latest["id"] if latest else None
    version: int | None = latest["version"] if latest else None
    seen_before = await _fetchone(conn, sql.KNOWN_STATE, {**order, "key": snapshot.key})
    outcome = rules.fetched_state(
        key=snapshot.key,
        latest_key=last_key,
        forced=job.force,
        seen_before=seen_before is not None,
        updated_at=snapshot.order_updated_at,
        latest_updated_at=latest["order_updated_at"] if latest else None,
        latest_read_at=latest["hydrated_at"] if latest else None,
    )
    if outcome == "stored":
        last_version = max(last_version, latest["version"] if latest else 0) + 1
        last_key = snapshot.key
        last_updated = snapshot.order_updated_at
        inserted = await _fetchone(
            conn,
            sql.INSERT_SNAPSHOT,
            {
                **order,
                "key": snapshot.key,
                "version": last_version,
                "body": snapshot.body,
                "order_updated_at": snapshot.order_updated_at,
                "hydrated_at": snapshot.hydrated_at,
            },
        )
        assert inserted is not None
        snapshot_id = inserted["id"]
        version = last_version
        for sink in dict.fromkeys(sinks):  # a sink listed twice still gets one delivery
            params = {**order, "sink": sink, "version": last_version, "now": now}
            await conn.execute(sql.SUPERSEDE_OLDER_PENDING, params)
            await conn.execute(
                sql.INSERT_DELIVERY,
                {**params, "snapshot_id": snapshot_id, "first_received_at": job.first_received_at},
            )
            deliveries += 1
        if deliveries:
            await conn.execute(sql.NOTIFY_WORK, {"kind": "delivery"})
    await conn.execute(sql.RESOLVE_HYDRATION_LETTERS, order)
    if snapshot_id is not None:
        await conn.execute(
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
    oldest = await _fetchone(conn, sql.OLDEST_UNCOVERED, {"job_id": job.id})
    await conn.execute(
        sql.FINISH_JOB,
        {
            "id": job.id,
            "status": "pending" if requeued else "done",
            "retry_at": now if requeued else row["retry_at"],
            "pending_since": oldest["oldest"] if requeued and oldest else None,
            "last_version": last_version,
            "last_snapshot_key": last_key,
            "last_updated_at": last_updated,
            "now": now,
        },
    )
    return CompleteResult(
        outcome, snapshot_id=snapshot_id, version=version, deliveries=deliveries, requeued=requeued
    )


async def _dead_letter_hydration(
    conn: Conn, job: HydrationJob, reason: str, error: str, now: float
) -> bool:
    lease = {"id": job.id, "lease_token": job.lease_token}
    row = await _fetchone(conn, sql.LOCK_LEASED_JOB, lease)
    if row is None:
        return False
    return await _end_job_in_letter(conn, row, reason, error, now)


async def _end_job_in_letter(conn: Conn, row: DictRow, reason: str, error: str, now: float) -> bool:
    """End a running job (``row``, locked, under its current lease) in a dead letter;
    False (and nothing written) when that lease is no longer current."""
    requeue = rules.requeued(
        generation=row["generation"], claimed_generation=row["claimed_generation"]
    )
    pending_since: float | None = None
    if requeue:
        oldest = await _fetchone(
            conn,
            sql.OLDEST_AFTER_CLAIM,
            {"job_id": row["id"], "after_id": row["claimed_notification_id"]},
        )
        pending_since = now if oldest is None or oldest["oldest"] is None else oldest["oldest"]
    ended = await conn.execute(
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
    )
    if ended.rowcount != 1:
        return False
    await _insert_dead_letter(
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


async def _claim_deliveries(conn: Conn, params: dict[str, Any], limit: int) -> list[Delivery]:
    """Hand out due deliveries of one sink, one per order, superseding overtaken ones.

    Candidates come oldest first and locked (SKIP LOCKED); for each, the (sink, order)
    advisory lock decides which claimer may look at that order now. Rounds go on until
    ``limit`` are claimed or no candidate is left.
    """
    claimed: list[Delivery] = []
    seen: list[int] = []
    orders: set[tuple[str, int]] = set()
    while len(claimed) < limit:
        cursor = await conn.execute(
            sql.PICK_DELIVERIES, {**params, "seen": seen, "limit": limit - len(claimed)}
        )
        rows = await cursor.fetchall()
        if not rows:
            break
        for row in rows:
            seen.append(row["id"])
            order = (row["brand"], row["order_id"])
            if order in orders:
                continue  # one per order per claim
            delivery = await _claim_delivery(conn, params, row)
            if delivery is not None:
                orders.add(order)
                claimed.append(delivery)
    return claimed


async def _claim_delivery(conn: Conn, params: dict[str, Any], row: DictRow) -> Delivery | None:
    order = {
        "sink": params["sink"],
        "brand": row["brand"],
        "order_id": row["order_id"],
        "lease_now": params["lease_now"],
        "now": params["now"],
    }
    locked = await _fetchone(conn, sql.LOCK_SINK_ORDER, order)
    if locked is None or not locked["locked"]:
        return None  # another claimer is deciding about this order right now
    siblings = await (
        await conn.execute(sql.RUNNING_SIBLING, {**order, "id": row["id"]})
    ).fetchall()
    if any(not sibling["expired"] for sibling in siblings):
        return None  # a version of this order is in flight
    version = {**order, "version": row["version"]}
    if await _overtaken(conn, version):
        await conn.execute(sql.SUPERSEDE_DELIVERY, {"id": row["id"], "now": params["now"]})
        return None
    if _abandoned(row, params["max_lost_leases"]):
        await _abandon_delivery(conn, row, params["now"])
        return None
    if siblings:
        await conn.execute(
            sql.VOID_EXPIRED_SIBLING, {"ids": [s["id"] for s in siblings], "now": params["now"]}
        )
    claim = await _fetchone(conn, sql.CLAIM_DELIVERY, {**params, "id": row["id"]})
    if claim is None:
        return None
    await conn.execute(sql.SUPERSEDE_OLDER_UNSENT, version)
    return Delivery(
        id=claim["id"],
        sink=claim["sink"],
        snapshot_id=claim["snapshot_id"],
        snapshot_key=claim["snapshot_key"],
        brand=claim["brand"],
        order_id=claim["order_id"],
        version=claim["version"],
        body=bytes(claim["body"]),
        attempts=claim["attempts"] - 1,  # the claim counted this one
        lease_token=claim["lease_token"],
        created_at=claim["created_at"],
        first_received_at=claim["first_received_at"],
        traceparents=tuple(claim["traceparents"]),
    )


async def _dead_letter_delivery(
    conn: Conn, delivery: Delivery, reason: str, error: str, now: float
) -> bool:
    row = await _fetchone(
        conn,
        sql.DEAD_DELIVERY,
        {"id": delivery.id, "lease_token": delivery.lease_token, "error": error, "now": now},
    )
    if row is None:
        return False
    await _insert_dead_letter(
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


async def _overtaken(conn: Conn, place: dict[str, Any]) -> bool:
    """Has a newer version of this (sink, order) been attempted, whatever its outcome?"""
    newest = await _fetchone(conn, sql.NEWEST_ATTEMPTED_VERSION, place)
    return rules.overtaken(place["version"], newest["version"] if newest else None)


async def _abandon_delivery(conn: Conn, candidate: DictRow, now: float) -> None:
    """End a delivery whose leases keep running out in a dead letter (``lease_lost``)."""
    error = _lease_lost_error(candidate)
    dead = await _fetchone(
        conn,
        sql.DEAD_DELIVERY,
        {
            "id": candidate["id"],
            "lease_token": candidate["lease_token"],
            "error": error,
            "now": now,
        },
    )
    if dead is None:
        return  # another claimer took it meanwhile
    row = await _fetchone(conn, sql.DELIVERY_FOR_LETTER, {"id": candidate["id"]})
    assert row is not None
    await _insert_dead_letter(
        conn,
        kind="delivery",
        brand=row["brand"],
        order_id=row["order_id"],
        sink=row["sink"],
        reason=LEASE_LOST,
        error=error,
        attempts=dead["attempts"],
        now=now,
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


async def _insert_dead_letter(
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
    await conn.execute(
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


def _dead_letter(row: DictRow) -> DeadLetter:
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


async def _list_dead_letters(
    conn: Conn, filt: DeadLetterFilter, limit: int, after_id: int | None
) -> DeadLetterPage:
    params = _filter_params(filt)
    total_row = await _fetchone(conn, sql.COUNT_DEAD_LETTERS, params)
    total = int(total_row["n"]) if total_row else 0
    limit = max(limit, 0)
    rows = await (
        await conn.execute(
            sql.LIST_DEAD_LETTERS,
            {**params, "after_id": _int8(after_id or 0), "limit": limit + 1},
        )
    ).fetchall()
    items = [_dead_letter(row) for row in rows[:limit]]
    more = len(rows) > limit and bool(items)
    return DeadLetterPage(items=items, total=total, next_cursor=items[-1].id if more else None)


async def _replay(conn: Conn, letter: DictRow, mode: ReplayMode, now: float) -> None:
    """Re-queue what a (locked) dead letter describes (rules.replay_action), then remove it."""
    place = None
    if letter["delivery_id"] is not None:
        place = await _fetchone(conn, sql.DELIVERY_PLACE, {"id": letter["delivery_id"]})
    action = rules.replay_action(
        kind=letter["kind"],
        mode=mode,
        delivery_exists=place is not None,
        overtaken=place is not None and await _overtaken(conn, dict(place)),
    )
    if action == "redeliver":
        await conn.execute(sql.REPLAY_DELIVERY, {"id": letter["delivery_id"], "now": now})
        await conn.execute(sql.NOTIFY_WORK, {"kind": "delivery"})
    elif action == "supersede":  # a newer state was attempted since: never backwards
        await conn.execute(sql.SUPERSEDE_DELIVERY, {"id": letter["delivery_id"], "now": now})
    else:
        order = {"brand": letter["brand"], "order_id": letter["order_id"]}
        job = await _fetchone(conn, sql.GET_JOB_BY_ORDER, order)
        notice = Notification(
            brand=letter["brand"],
            order_id=letter["order_id"],
            received_at=now,
            venue_id=job["venue_id"] if job is not None else None,
            source="replay",
            force=True,
        )
        await _enqueue(conn, notice)
    await conn.execute(sql.DELETE_DEAD_LETTER, {"id": letter["id"]})


async def _stats(conn: Conn, now: float) -> StoreStats:
    def age(oldest: float | None) -> float | None:
        return None if oldest is None else max(0.0, now - oldest)

    pending = await _fetchone(conn, sql.PENDING_JOB_STATS, {"now": now})
    running = await _fetchone(conn, sql.RUNNING_JOB_STATS, {})
    # Aggregates always return a row.
    assert pending is not None
    assert running is not None
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
        for row in await (await conn.execute(statement, {"now": now})).fetchall():
            entry = per_sink.setdefault(row["sink"], {"pending": 0, "running": 0, "oldest": []})
            entry[status] = row["n"]
            if row["oldest"] is not None:
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
        for row in await (await conn.execute(sql.DEAD_LETTER_STATS)).fetchall()
    }
    return StoreStats(hydration=hydration, deliveries=deliveries, dead_letters=dead_letters)
