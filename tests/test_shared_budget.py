"""The Clopos budget shared by replicas on PostgreSQL (app/clopos/shared_budget.py).

Each replica is a SharedRateBudget over its own PostgresStore (its own pool), all on one
database, exactly as separate processes are. Real time: 600 calls a minute is ten a
second, so a few seconds show the spacing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from app.admin import status_json
from app.clopos.budget import RateBudget
from app.clopos.shared_budget import WINDOW_MARGIN_SECONDS, SharedRateBudget
from app.runtime import Runtime
from app.settings import load_settings
from app.store.postgres import PostgresStore

TENANT = "integrator:brand"
PER_MINUTE = 600
BURST = 10
STEP = (60 + WINDOW_MARGIN_SECONDS) / (PER_MINUTE - BURST)


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[list[PostgresStore]]:
    stores = [PostgresStore(pg_url, pool_size=2) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def grant_times(budgets: list[RateBudget], calls: int) -> list[float]:
    times: list[float] = []

    async def call(budget: RateBudget) -> None:
        await budget.acquire(TENANT)
        times.append(time.monotonic())

    await asyncio.gather(*(call(budgets[i % len(budgets)]) for i in range(calls)))
    return sorted(times)


async def test_replicas_together_stay_under_the_limit(stores: list[PostgresStore]) -> None:
    budgets: list[RateBudget] = [SharedRateBudget(s, PER_MINUTE, burst=BURST) for s in stores]
    times = await grant_times(budgets, 45)
    # GCRA: any k + 1 consecutive grants span at least (k + 1 - burst) steps, so no
    # window of a minute (plus margin) can hold more than the limit, whoever called.
    k = 30
    spans = [times[i + k] - times[i] for i in range(len(times) - k)]
    assert min(spans) >= (k + 1 - BURST) * STEP * 0.9, (min(spans), (k + 1 - BURST) * STEP)
    rows = await stores[0].rate_budgets()
    assert rows[TENANT][0] == 45, "every grant, from every replica, is on the one row"


async def test_a_429_seen_by_one_replica_holds_them_all(stores: list[PostgresStore]) -> None:
    first, second = (SharedRateBudget(s, PER_MINUTE) for s in stores[:2])
    await first.acquire(TENANT)
    first.observe(TENANT, status=429, headers={"Retry-After": "1"})
    await asyncio.sleep(0.2)  # the observation is written in the background
    started = time.monotonic()
    await second.acquire(TENANT)
    assert time.monotonic() - started >= 0.7, "the other replica waited for the hold"


async def test_rate_limit_headers_slow_every_replica(stores: list[PostgresStore]) -> None:
    first, second = (SharedRateBudget(s, PER_MINUTE) for s in stores[:2])
    await first.acquire(TENANT)
    # Clopos says only the reserve is left for the next 1.5 s: everyone waits for the reset.
    first.observe(
        TENANT, status=200, headers={"RateLimit-Remaining": "1", "RateLimit-Reset": "1.5"}
    )
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await second.acquire(TENANT)
    assert time.monotonic() - started >= 1.0


async def test_admin_status_shows_the_fleets_shared_budget_row(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    """/admin/status on one replica shows the shared row, which other replicas spent."""
    config = load_settings(
        clopos_base_url="http://127.0.0.1:9",
        clopos_client_id="client",
        clopos_client_secret="secret",
        clopos_brand="brand",
        clopos_integrator_id="integrator",
        webhook_secret="s" * 32,
        database_url=pg_url,
        poll_interval_seconds=0,
    )
    runtime = Runtime(config)
    await runtime.store.open()
    try:
        # 60 a minute, a burst of 3: three calls at once push the arrival time ~3 s ahead.
        other = SharedRateBudget(stores[0], 60, burst=3)
        for _ in range(3):
            await other.acquire(TENANT)
        other.observe(
            TENANT,
            status=429,
            headers={"Retry-After": "30", "RateLimit-Limit": "500", "RateLimit-Remaining": "0"},
        )
        await asyncio.sleep(0.3)  # the observation is written in the background
        brand = status_json(await runtime.status())["brands"]["brand"]
    finally:
        await runtime.store.close()
    assert brand["budget"] is None, "this replica made no call itself"
    shared = brand["shared_budget"]
    assert shared["grants"] == 3
    assert shared["server_limit"] == 500
    assert 25 < shared["held_for_seconds"] <= 30
    assert 2 < shared["tat_ahead_seconds"] <= 3.2
