"""LocalRateBudget policy, on a fake clock with a fake sleep (no real waiting)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.clopos.budget import BudgetState, LocalRateBudget, RateBudget, retry_after_seconds
from app.store.sqlite import SqliteStore

T = "integrator:brand"


class FakeTime:
    """A clock the fake sleep advances; records every sleep."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


def make(per_minute: int, **kwargs: object) -> tuple[LocalRateBudget, FakeTime]:
    fake = FakeTime()
    budget = LocalRateBudget(per_minute, clock=fake, sleep=fake.sleep, **kwargs)  # type: ignore[arg-type]
    return budget, fake


async def grant_times(budget: LocalRateBudget, fake: FakeTime, n: int) -> list[float]:
    times = []
    for _ in range(n):
        await budget.acquire(T)
        times.append(fake.now)
    return times


def max_in_any_window(times: list[float], window: float = 60.0) -> int:
    """The most grants that fall within any window of ``window`` seconds."""
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_is_a_rate_budget() -> None:
    budget: RateBudget = LocalRateBudget(10)
    assert budget.state() == {}


async def test_never_more_than_per_minute_in_any_sliding_window() -> None:
    budget, fake = make(10)
    times = await grant_times(budget, fake, 45)
    assert max_in_any_window(times) == 10
    # And it is not needlessly slow: 45 calls at 10/min take about 44 spacings of 6 s
    # (plus the 0.5 s window margin each time the window is full).
    assert times[-1] - times[0] == pytest.approx(44 * 6.0, abs=2.5)


async def test_hard_cap_holds_even_with_a_burst_larger_than_the_limit() -> None:
    budget, fake = make(10, burst=50)
    times = await grant_times(budget, fake, 25)
    assert times[:10] == [times[0]] * 10  # the burst goes at once...
    assert max_in_any_window(times) == 10  # ...but the window still caps it
    assert times[10] - times[0] >= 60.0


async def test_spacing_with_small_burst() -> None:
    budget, fake = make(300)  # 0.2 s spacing, burst of 10
    times = await grant_times(budget, fake, 14)
    assert times[:10] == [times[0]] * 10
    gaps = [b - a for a, b in itertools.pairwise(times[10:])]
    assert all(gap == pytest.approx(0.2) for gap in gaps)
    assert times[10] - times[0] == pytest.approx(0.2, abs=1e-9)


async def test_429_holds_the_whole_tenant_until_reset() -> None:
    budget, fake = make(300)
    await budget.acquire(T)
    t429 = fake.now
    budget.observe(T, status=429, headers={"RateLimit-Reset": "7", "Retry-After": "3"})
    assert budget.state()[T].held_until == pytest.approx(t429 + 7)
    await budget.acquire(T)
    assert fake.now >= t429 + 7
    assert budget.state()[T].held_until is None


async def test_429_hold_applies_to_waiters_already_queued() -> None:
    budget, fake = make(60, burst=1)  # one per second
    await budget.acquire(T)
    start = fake.now
    waiter = asyncio.create_task(budget.acquire(T))
    await asyncio.sleep(0)  # the waiter is now sleeping for its slot
    budget.observe(T, status=429, headers={"Retry-After": "30"})
    await waiter
    assert fake.now >= start + 30


async def test_server_remaining_slows_us_down() -> None:
    budget, fake = make(300)  # alone we would go 10 at once, then one per 0.2 s
    headers = {"RateLimit-Limit": "300", "RateLimit-Remaining": "26", "RateLimit-Reset": "20"}
    budget.observe(T, status=200, headers=headers)
    times = await grant_times(budget, fake, 4)
    # 26 left minus a reserve of 6, over 20 s: about one per second, no burst.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.95 for gap in gaps), gaps


async def test_at_or_below_reserve_waits_for_the_reset() -> None:
    budget, fake = make(300)
    start = fake.now
    budget.observe(T, status=200, headers={"ratelimit-remaining": "3", "ratelimit-reset": "12"})
    assert budget.wait_seconds(T) == pytest.approx(12)
    await budget.acquire(T)
    assert fake.now >= start + 12


async def test_server_limit_lower_than_ours_is_obeyed() -> None:
    budget, fake = make(300, burst=1)
    budget.observe(T, status=200, headers={"RateLimit-Limit": "60"})
    times = await grant_times(budget, fake, 3)
    assert times[2] - times[0] == pytest.approx(2.0)  # 60/min -> 1 s spacing
    assert budget.state()[T].limit == 60


async def test_stale_server_guidance_is_dropped_after_reset() -> None:
    budget, fake = make(300)
    budget.observe(T, status=200, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": "5"})
    fake.now += 6
    assert budget.wait_seconds(T) == 0


async def test_waiters_are_served_first_come_first_served() -> None:
    budget, fake = make(60, burst=1)  # one per second
    granted: list[tuple[int, float]] = []

    async def call(i: int) -> None:
        await budget.acquire(T)
        granted.append((i, fake.now))

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(call(i)))
        await asyncio.sleep(0)  # each task starts waiting before the next is created
    await asyncio.gather(*tasks)
    assert [i for i, _ in granted] == list(range(8))
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(granted)]
    assert all(gap == pytest.approx(1.0) for gap in gaps), gaps


async def test_tenants_do_not_share_a_budget() -> None:
    budget, fake = make(2, burst=1)
    await budget.acquire("a")
    await budget.acquire("a")
    assert budget.wait_seconds("a") > 0
    start = fake.now
    await budget.acquire("b")
    assert fake.now == start


async def test_state_reports_calls_and_remaining() -> None:
    budget, fake = make(300)
    for _ in range(5):
        await budget.acquire(T)
    state = budget.state()[T]
    assert state == BudgetState(limit=300, remaining=295, held_until=None, calls_last_minute=5)
    budget.observe(T, status=200, headers={"RateLimit-Remaining": "40", "RateLimit-Reset": "30"})
    await budget.acquire(T)
    assert budget.state()[T].remaining == 39  # the server's view, minus ours since
    fake.now += 61
    assert budget.state()[T].calls_last_minute == 0


def test_retry_after_is_the_largest_hint_and_at_least_one_second() -> None:
    assert retry_after_seconds({"RateLimit-Reset": "7", "Retry-After": "3"}) == 7
    assert retry_after_seconds({"retry-after": "12"}) == 12
    assert retry_after_seconds({}) == 1
    assert retry_after_seconds({"RateLimit-Reset": "0"}) == 1
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 1
    assert retry_after_seconds({"RateLimit-Reset": "-5", "Retry-After": "nan"}) == 1


def test_rejects_a_nonsense_limit() -> None:
    with pytest.raises(ValueError, match="per_minute"):
        LocalRateBudget(0)


# --- across a restart: the spend kept in the store (a real SQLite file) ---------------------

EPOCH = 1_700_000_000.0


class Process:
    """One process's budget on a shared ledger: its own monotonic clock (starting anywhere)
    and a wall clock that carries on across processes, as the real ones do."""

    def __init__(self, store: SqliteStore, per_minute: int, *, wall_at_start: float) -> None:
        self.time = FakeTime(start=500.0)  # a monotonic clock: its origin means nothing
        origin = self.time.now
        self.wall = lambda: wall_at_start + (self.time.now - origin)
        self.budget = LocalRateBudget(
            per_minute, clock=self.time, sleep=self.time.sleep, ledger=store, wall_clock=self.wall
        )

    async def grants(self, n: int) -> list[float]:
        """Acquire ``n`` times; the wall-clock time of each grant."""
        times = []
        for _ in range(n):
            await self.budget.acquire(T)
            times.append(self.wall())
        return times


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("restore", [True, False])
async def test_a_restarted_process_carries_on_where_the_dead_one_stopped(
    ledger: SqliteStore, restore: bool
) -> None:
    """Without restore (the control), the new process spends a full minute's budget on
    top of the old one's: more than the limit in one window, which Clopos answers 429."""
    old = Process(ledger, 10, wall_at_start=EPOCH)
    old_times = await old.grants(12)  # the window is full when it dies
    new = Process(ledger, 10, wall_at_start=old.wall() + 1.0)  # restarted a second later
    if restore:
        await new.budget.restore()
    new_times = await new.grants(10)
    worst = max_in_any_window(old_times + new_times)
    if restore:
        assert worst == 10
        assert new_times[0] > old_times[-1] + 1.0, "the first call waited for room"
        assert new.budget.state()[T].calls_last_minute == 10
    else:
        assert worst > 10


async def test_a_lower_limit_clopos_announced_survives_a_restart(ledger: SqliteStore) -> None:
    old = Process(ledger, 300, wall_at_start=EPOCH)
    await old.grants(1)
    old.budget.observe(
        T,
        status=200,
        headers={"RateLimit-Limit": "60", "RateLimit-Remaining": "59", "RateLimit-Reset": "60"},
    )
    await old.grants(1)
    new = Process(ledger, 300, wall_at_start=old.wall() + 1.0)
    await new.budget.restore()
    assert new.budget.state()[T].limit == 60
    assert new.budget.state()[T].calls_last_minute == 2


async def test_every_grant_is_in_the_ledger_when_acquire_returns(ledger: SqliteStore) -> None:
    process = Process(ledger, 300, wall_at_start=EPOCH)
    for count in range(1, 4):
        await process.budget.acquire(T)
        (spend,) = (await ledger.budget_spend_since(0)).values()
        assert len(spend.times) == count
    assert spend.limit == 300


async def test_spend_older_than_the_window_is_not_restored(ledger: SqliteStore) -> None:
    old = Process(ledger, 300, wall_at_start=EPOCH)
    await old.grants(5)
    new = Process(ledger, 300, wall_at_start=old.wall() + 61.0)
    await new.budget.restore()
    assert new.budget.state() == {}
