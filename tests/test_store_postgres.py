"""What the PostgreSQL store adds to the contract: replicas on one database.

Several ``PostgresStore`` instances on one database stand for several replicas (each
has its own connection pool, exactly as separate processes would). The contract itself
(tests/test_store_contract.py) runs on this backend too, through ``conftest.store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from app.errors import ConfigError, StoreError
from app.store import open_store
from app.store.base import Delivery, NewSnapshot, Notification, PollerLead
from app.store.pg_migrate import migration_scripts
from app.store.postgres import PostgresStore
from tests.pg import PgServer

T0 = 1_700_000_000.0
LEASE = 60.0


def notice(order_id: int, at: float = T0, **extra: object) -> Notification:
    return Notification(brand="acme", order_id=order_id, received_at=at, **extra)  # type: ignore[arg-type]


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[list[PostgresStore]]:
    """Three stores on one database, leases measured by the caller's ``now``."""
    stores = [PostgresStore(pg_url, pool_size=4, lease_clock="caller") for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def test_replicas_starting_together_migrate_once(pg_server: PgServer) -> None:
    name = pg_server.create_database(template=None)  # empty: no schema yet
    try:
        stores = [PostgresStore(pg_server.url(name), pool_size=1) for _ in range(6)]
        await asyncio.gather(*(store.open() for store in stores))
        await stores[0].enqueue(notice(1))  # the schema is there and usable
        for store in stores:
            await store.close()
        with psycopg.connect(pg_server.url(name)) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
        assert sorted(versions) == [script for script, _ in migration_scripts()]
    finally:
        pg_server.drop_database(name)


async def test_racing_replicas_claim_each_job_once(replicas: list[PostgresStore]) -> None:
    orders = range(1, 61)
    await asyncio.gather(*(replicas[i % 3].enqueue(notice(i)) for i in orders))

    async def claimer(store: PostgresStore) -> list[int]:
        got: list[int] = []
        while batch := await store.claim_hydrations(limit=4, now=T0, lease_seconds=LEASE):
            got += [job.order_id for job in batch]
        return got

    results = await asyncio.gather(*(claimer(store) for store in replicas for _ in range(3)))
    claimed = Counter(order for result in results for order in result)
    assert sorted(claimed) == list(orders), "every due job is handed out"
    assert set(claimed.values()) == {1}, "and none twice"


async def test_racing_replicas_keep_one_delivery_in_flight_per_order(
    replicas: list[PostgresStore],
) -> None:
    first = replicas[0]
    for version in range(3):  # three versions of each order, each due, none delivered
        for order_id in range(1, 11):
            await first.enqueue(notice(order_id, T0 + version))
            (job,) = await first.claim_hydrations(limit=1, now=T0 + version, lease_seconds=LEASE)
            body = f'{{"v":{version}}}'.encode()
            snapshot = NewSnapshot(
                key=f"{order_id}-{version}", body=body, order_updated_at=None, hydrated_at=T0
            )
            await first.complete_hydration(job, snapshot, ["http"], now=T0 + version)
            # Leased for half a second: an expired running version beside a pending newer
            # one, so by the race several versions of an order are candidates.
            await first.claim_deliveries(sink="http", limit=1, now=T0 + version, lease_seconds=0.5)

    async def claimer(store: PostgresStore) -> list[Delivery]:
        return await store.claim_deliveries(sink="http", limit=50, now=T0 + 10, lease_seconds=LEASE)

    results = await asyncio.gather(*(claimer(store) for store in replicas for _ in range(3)))
    claimed = [delivery for result in results for delivery in result]
    per_order = Counter(delivery.order_id for delivery in claimed)
    assert sorted(per_order) == list(range(1, 11)), "every order has one delivery out"
    assert set(per_order.values()) == {1}, "never two versions of an order at once"
    with psycopg.connect(first.conninfo) as conn:
        running = conn.execute(
            "SELECT order_id, COUNT(*) FROM deliveries WHERE status = 'running' GROUP BY order_id"
        ).fetchall()
    assert {count for _, count in running} == {1}


async def test_the_same_message_from_two_replicas_is_one_notice(
    replicas: list[PostgresStore],
) -> None:
    results = await asyncio.gather(
        *(store.enqueue(notice(7, dedup_key="msg-1", signed_at=5)) for store in replicas * 4)
    )
    assert sum(not result.duplicate for result in results) == 1
    assert len({result.job_id for result in results}) == 1
    (job,) = await replicas[0].claim_hydrations(limit=5, now=T0, lease_seconds=LEASE)
    assert len(job.notification_ids) == 1


async def test_a_notice_racing_a_claim_is_never_lost(replicas: list[PostgresStore]) -> None:
    """Every notice is either covered by the claim or makes the job due again after it."""
    writer, claimer = replicas[0], replicas[1]
    for round_ in range(20):
        at = T0 + round_
        await writer.enqueue(notice(7, at))
        enqueued, claimed = await asyncio.gather(
            writer.enqueue(notice(7, at)),
            claimer.claim_hydrations(limit=1, now=at, lease_seconds=LEASE),
        )
        if not claimed:  # the enqueue held the job's row: SKIP LOCKED passed it by
            claimed = await claimer.claim_hydrations(limit=1, now=at, lease_seconds=LEASE)
        (job,) = claimed
        snapshot = NewSnapshot(key=f"k{round_}", body=b"{}", order_updated_at=None, hydrated_at=at)
        done = await claimer.complete_hydration(job, snapshot, [], now=at)
        covered = enqueued.notification_id in job.notification_ids
        assert covered != done.requeued, (round_, covered, done.requeued)
        if done.requeued:
            (again,) = await claimer.claim_hydrations(limit=1, now=at, lease_seconds=LEASE)
            assert enqueued.notification_id in again.notification_ids
            await claimer.complete_hydration(again, snapshot, [], now=at)


async def test_leases_are_measured_by_the_database_clock(pg_url: str) -> None:
    """A replica whose clock runs an hour ahead cannot take work another one holds."""
    steady = PostgresStore(pg_url, pool_size=2)
    ahead = PostgresStore(pg_url, pool_size=2)
    await steady.open()
    await ahead.open()
    try:
        now = time.time()
        await steady.enqueue(notice(7, now))
        (held,) = await steady.claim_hydrations(limit=1, now=now, lease_seconds=1.0)
        assert await ahead.claim_hydrations(limit=1, now=now + 3600, lease_seconds=1.0) == []
        deadline = time.monotonic() + 10
        while not (taken := await ahead.claim_hydrations(limit=1, now=now, lease_seconds=30)):
            assert time.monotonic() < deadline, "the lease never expired"
            await asyncio.sleep(0.1)
        assert [job.order_id for job in taken] == [7]
        assert time.time() - now >= 0.9, "not before the database says the lease ran out"
        lost = await steady.complete_hydration(
            held,
            NewSnapshot(key="a", body=b"{}", order_updated_at=None, hydrated_at=now),
            [],
            now=now,
        )
        assert lost.outcome == "lost_lease"
    finally:
        await steady.close()
        await ahead.close()


async def test_opening_a_store_leaves_other_replicas_leases_alone(pg_url: str) -> None:
    first = PostgresStore(pg_url, lease_clock="caller")
    await first.open()
    await first.enqueue(notice(7))
    (held,) = await first.claim_hydrations(limit=1, now=T0, lease_seconds=LEASE)
    late = PostgresStore(pg_url, lease_clock="caller")
    await late.open()  # a replica (re)starting
    try:
        assert await late.claim_hydrations(limit=1, now=T0 + 1, lease_seconds=LEASE) == []
        snapshot = NewSnapshot(key="a", body=b"{}", order_updated_at=None, hydrated_at=T0)
        assert (await first.complete_hydration(held, snapshot, [], now=T0 + 2)).outcome == "stored"
    finally:
        await first.close()
        await late.close()


async def test_database_url_takes_the_libpq_forms(pg_server: PgServer, pg_url: str) -> None:
    socket_dir = psycopg.conninfo.conninfo_to_dict(pg_url).get("host")
    dbname = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    forms = [pg_url]
    if socket_dir and str(socket_dir).startswith("/"):  # the embedded server: a socket
        forms.append(f"postgresql://postgres@/{dbname}?host={socket_dir}")
        forms.append(f"postgres:///{dbname}?host={socket_dir}&user=postgres")
    for url in forms:
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        await store.open()
        try:
            await store.ping()
        finally:
            await store.close()


def test_a_malformed_postgresql_url_is_a_config_error() -> None:
    for url in ("postgresql://u@h:notaport/db", "postgresql://h/db?nosuchoption=1"):
        with pytest.raises(ConfigError) as info:
            open_store(url)
        assert info.value.variable == "DATABASE_URL"


async def test_work_one_replica_adds_wakes_the_workers_of_the_others(
    replicas: list[PostgresStore],
) -> None:
    writer, listener = replicas[0], replicas[1]
    woken: list[str] = []
    watch = asyncio.create_task(listener.watch_work(woken.append))
    try:
        await wait_for(lambda: {"hydration", "delivery"} <= set(woken))  # listening now
        woken.clear()
        await writer.enqueue(notice(7))
        await wait_for(lambda: woken == ["hydration"])
        (job,) = await writer.claim_hydrations(limit=1, now=T0, lease_seconds=LEASE)
        snapshot = NewSnapshot(key="a", body=b"{}", order_updated_at=None, hydrated_at=T0)
        await writer.complete_hydration(job, snapshot, ["http"], now=T0)
        await wait_for(lambda: woken == ["hydration", "delivery"])
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not woken in time"
        await asyncio.sleep(0.02)


async def test_one_replica_polls_a_brand_and_another_takes_over_when_it_dies(
    pg_url: str,
) -> None:
    first = PostgresStore(pg_url, pool_size=1, process_name="replica-1")
    second = PostgresStore(pg_url, pool_size=1, process_name="replica-2")
    await first.open()
    await second.open()
    try:
        assert await first.lead_poller("acme") == PollerLead(leading=True, holder="replica-1")
        assert await first.lead_poller("acme") == PollerLead(leading=True, holder="replica-1")
        assert await second.lead_poller("acme") == PollerLead(leading=False, holder="replica-1")
        assert await second.lead_poller("other") == PollerLead(leading=True, holder="replica-2")
        # replica-1's session ends as a killed process's would: the server drops it (and
        # with it the lock; the timeout makes the call wait until the backend is gone).
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                " WHERE application_name = 'replica-1'"
            )
        assert await second.lead_poller("acme") == PollerLead(leading=True, holder="replica-2")
        lost = await first.lead_poller("acme")
        assert lost == PollerLead(leading=False, holder=None), "it knows it lost the lead"
        assert await first.lead_poller("acme") == PollerLead(leading=False, holder="replica-2")
    finally:
        await first.close()
        await second.close()


async def test_an_enqueue_that_waits_past_the_deadline_is_a_store_error(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook's 503 for a stalled store: another session holds the order's job row,
    so the enqueue waits; at ENQUEUE_TIMEOUT_SECONDS the caller gets a StoreError (not a
    bare TimeoutError), and the store serves the next enqueue once the row is free."""
    monkeypatch.setattr("app.store.postgres.ENQUEUE_TIMEOUT_SECONDS", 0.3)
    store = PostgresStore(pg_url, pool_size=2)
    await store.open()
    try:
        await store.enqueue(notice(4242))
        connect = psycopg.AsyncConnection.connect
        async with await connect(pg_url) as holder, holder.transaction():
            await holder.execute("SELECT id FROM hydration_jobs WHERE order_id = 4242 FOR UPDATE")
            with pytest.raises(StoreError, match=r"enqueue: no answer within 0\.3 s"):
                await store.enqueue(notice(4242, T0 + 1))
        later = await store.enqueue(notice(4242, T0 + 2))
        assert later.notification_id is not None
    finally:
        await store.close()
