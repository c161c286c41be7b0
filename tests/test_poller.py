"""The reconciliation poller: its pure decisions, then whole cycles against real things.

The cycle tests run the real Clopos client against the sandbox over loopback and a real
SQLite store; the sandbox, the client, the budget and the poller share one fake clock, so
``updated_at`` stamps, the lookback and readiness ages are driven by the test.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.clopos.budget import LocalRateBudget
from app.clopos.client import CloposClient, OrdersPage
from app.errors import (
    CloposCredentialsRejected,
    CloposError,
    CloposNotFound,
    CloposPermanentError,
    CloposRateLimited,
    CloposTransientError,
    CloposUnauthorized,
    ConfigError,
)
from app.http_client import make_http_client
from app.hydration import make_snapshot
from app.metrics import Metrics
from app.pauses import BrandPauses
from app.poller import (
    ListedOrder,
    Poller,
    changed_orders,
    dedup_key,
    next_watermark,
    outcome_of,
    parse_listed,
    scan_complete,
    scan_page,
    stale_after,
)
from app.sandbox import (
    DEFAULT_BRAND,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_INTEGRATOR_ID,
    SandboxState,
    create_sandbox_app,
)
from app.sandbox.orders import iso
from app.settings import BrandConfig, load_settings
from app.store.base import KnownState, NewSnapshot
from app.store.sqlite import SqliteStore
from tests.clock import FakeClock
from tests.servers import ServerThread

T = 1_770_000_000.0
# The rig's slack (the setting's default is larger; these scenarios are about seconds).
TEST_SLACK = 5.0
BRAND = DEFAULT_BRAND
LIST_PATH = "/open-api/v2/orders"


def order(order_id: Any, updated: Any, venue: Any = 1) -> dict[str, Any]:
    return {"id": order_id, "venue_id": venue, "updated_at": updated, "x": {"kept": True}}


def listed(order_id: int, updated: float, venue: str | None = "1") -> ListedOrder:
    return ListedOrder(order_id, venue, updated)


def parsed(raw: dict[str, Any]) -> ListedOrder:
    found = parse_listed(raw)
    assert found is not None, raw
    return found


def page_of(count: int, *, page: int = 1, limit: int = 5, total: int | None = None) -> OrdersPage:
    return OrdersPage(orders=[{}] * count, total=total, page=page, limit=limit)


# --- settings -------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for key in list(os.environ):
        if key.startswith("POLL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WEBHOOK_SECRET", "a-long-enough-secret")
    return monkeypatch


def test_poll_settings_defaults(env: pytest.MonkeyPatch) -> None:
    s = load_settings().settings
    assert (s.poll_interval_seconds, s.poll_page_size, s.poll_max_pages) == (30, 100, 10)
    assert s.poll_lookback_seconds == 900
    env.setenv("POLL_INTERVAL_SECONDS", "0")  # off
    assert load_settings().settings.poll_interval_seconds == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POLL_INTERVAL_SECONDS", "0.5"),  # would spend the budget on lists
        ("POLL_INTERVAL_SECONDS", "-1"),
        ("POLL_PAGE_SIZE", "101"),
        ("POLL_PAGE_SIZE", "0"),
        ("POLL_MAX_PAGES", "0"),
        ("POLL_LOOKBACK_SECONDS", "-5"),
    ],
)
def test_poll_settings_refuse_unsafe_values(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.variable == name


# --- pure parts: reading a listed order ---------------------------------------------------


def test_parse_listed_reads_both_timestamp_formats_and_string_ids() -> None:
    assert parse_listed(order(7, iso(T))) == ListedOrder(7, "1", T)
    moment = datetime(2026, 2, 2, 17, 46, 2, tzinfo=UTC).timestamp()
    expected = ListedOrder(8, "3", moment)
    assert parse_listed(order("8", "2026-02-02 17:46:02", venue="3")) == expected
    assert parse_listed(order(8, "2026-02-02T17:46:02.000000Z", venue=3)) == expected
    assert parse_listed(order(9, iso(T), venue=None)) == ListedOrder(9, None, T)


@pytest.mark.parametrize(
    "raw",
    [
        order(True, iso(T)),
        order(0, iso(T)),
        order(-3, iso(T)),
        order(10**18, iso(T)),
        order("12a", iso(T)),
        order(None, iso(T)),
        order(5, None),
        order(5, "yesterday"),
        order(5, 1_770_000_000),  # a number is not a Clopos timestamp
        "not an object",
    ],
)
def test_parse_listed_skips_what_it_cannot_use(raw: Any) -> None:
    assert parse_listed(raw) is None


# --- pure parts: a page against the floor --------------------------------------------------


def test_scan_page_keeps_orders_at_or_above_the_floor() -> None:
    floor = T - 10
    scan = scan_page(
        [order(1, iso(T)), order(2, iso(T - 10)), order(3, iso(T - 11)), order(4, iso(T - 99))],
        floor,
    )
    # An order exactly at the floor may be new (same second): it is a candidate.
    assert [o.order_id for o in scan.candidates] == [1, 2]
    assert scan.reached_floor
    assert scan.newest == T
    assert scan.unusable == 0


def test_scan_page_that_stays_above_the_floor_has_not_reached_it() -> None:
    scan = scan_page([order(1, iso(T)), order(2, iso(T - 1))], T - 5)
    assert not scan.reached_floor
    assert len(scan.candidates) == 2


def test_scan_page_keeps_the_newest_listing_of_an_order_and_counts_the_unusable() -> None:
    scan = scan_page([order(1, iso(T - 3)), order(1, iso(T)), order("x", iso(T)), 5], T - 5)
    assert scan.candidates == [listed(1, T)]
    assert scan.unusable == 2


def test_scan_of_an_empty_page() -> None:
    scan = scan_page([], T)
    assert (scan.candidates, scan.newest, scan.reached_floor) == ([], None, False)


def test_changed_orders_are_those_whose_content_is_not_the_stored_state() -> None:
    a, b = order(1, iso(T)), order(1, iso(T))
    b["note"] = "a second change in the same second"
    first, second = parsed(a), parsed(b)
    stored = KnownState(first.state_key(BRAND), T)
    now = T + 5
    assert changed_orders(BRAND, [first], {1: stored}, now=now) == []  # the same state
    assert changed_orders(BRAND, [second], {1: stored}, now=now) == [second]  # same stamp
    assert changed_orders(BRAND, [second], {1: KnownState("other", T + 1)}, now=now) == []
    assert changed_orders(BRAND, [second], {1: KnownState()}, now=now) == [second]  # unknown
    assert changed_orders(BRAND, [second], {}, now=now) == [second]  # not asked: unknown
    assert changed_orders(BRAND, [second], {1: KnownState("other", None)}, now=now) == [second]


def test_a_stored_stamp_in_the_future_does_not_hide_a_change() -> None:
    """Issue 8 item 3: a stored state stamped a day ahead proves nothing about order; a
    listed state of other content with an honest (earlier) stamp is a change."""
    listed_state = parsed(order(1, iso(T)))
    ahead = KnownState("other", T + 86_400)
    assert changed_orders(BRAND, [listed_state], {1: ahead}, now=T) == [listed_state]
    # Within the tolerance the stamp still orders states (the list lagging a fetch).
    near = KnownState("other", T + 60)
    assert changed_orders(BRAND, [listed_state], {1: near}, now=T) == []
    # The same content is never new, however far ahead its stamp.
    same = KnownState(listed_state.state_key(BRAND), T + 86_400)
    assert changed_orders(BRAND, [listed_state], {1: same}, now=T) == []


# --- pure parts: when to stop, where the watermark goes ------------------------------------


def test_scan_completes_below_the_floor_or_at_the_end_of_the_list() -> None:
    below = scan_page([order(1, iso(T)), order(2, iso(T - 100))], T - 5)
    above = scan_page([order(1, iso(T))] * 5, T - 5)
    assert scan_complete(below, returned=5)
    assert scan_complete(above, returned=0)  # an empty page: the end
    assert not scan_complete(above, returned=5)  # a full page: read on
    # A server paging by 50 while we asked for 100 has not ended its list: neither its
    # short page nor a total computed with our page size is trusted.
    assert not scan_complete(above, returned=50)


def test_next_watermark_is_the_newest_read_never_backwards_never_ahead_of_now() -> None:
    assert next_watermark(None, T, floor=T - 900, now=T + 5) == T
    assert next_watermark(T, T - 30, floor=T - TEST_SLACK, now=T + 5) == T  # backwards: no
    assert next_watermark(T, T + 3, floor=T - TEST_SLACK, now=T + 5) == T + 3
    # An order stamped in the future must not make later changes look old.
    assert next_watermark(T, T + 3600, floor=T - TEST_SLACK, now=T + 5) == T + 5


def test_a_first_poll_remembers_its_lookback_even_when_it_found_nothing_new() -> None:
    assert next_watermark(None, None, floor=T - 900, now=T) == T - 900
    # Only older orders listed: the next scan must not reach below the lookback.
    assert next_watermark(None, T - 5000, floor=T - 900, now=T) == T - 900
    assert next_watermark(T, None, floor=T - TEST_SLACK, now=T + 30) == T


def test_dedup_key_names_one_state_of_one_order_by_content() -> None:
    a, b = parsed(order(1001, iso(T))), parsed({**order(1001, iso(T)), "n": 2})
    assert dedup_key(BRAND, a) == f"poll:1001:{a.state_key(BRAND)}"
    assert dedup_key(BRAND, a) == dedup_key(BRAND, parsed(order(1001, iso(T))))
    assert dedup_key(BRAND, a) != dedup_key(BRAND, b)  # same second, another state
    assert dedup_key(BRAND, a) != dedup_key("other", a)


def test_readiness_tolerates_five_intervals_and_at_least_five_minutes() -> None:
    assert stale_after(30) == 300
    assert stale_after(1) == 300
    assert stale_after(120) == 600


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (CloposRateLimited("slow down", retry_after=3), "rate_limited"),
        (CloposCredentialsRejected("no", status=401), "credentials_rejected"),
        (CloposUnauthorized("token refused", status=401), "unauthorized"),
        (CloposTransientError("504", status=504), "transient"),
        (CloposPermanentError("400", status=400), "rejected"),
        (CloposNotFound("404", status=404), "error"),
    ],
)
def test_failures_have_stable_outcomes(error: CloposError, outcome: str) -> None:
    assert outcome_of(error) == outcome


# --- whole cycles, against the sandbox and a real store ------------------------------------


@dataclass
class Rig:
    clock: FakeClock
    state: SandboxState
    store: SqliteStore
    client: CloposClient
    metrics: Metrics
    pauses: BrandPauses
    woken: list[int]

    def poller(self, **overrides: Any) -> Poller:
        options: dict[str, Any] = {
            "interval": 30.0,
            "page_size": 100,
            "max_pages": 10,
            "lookback": 900.0,
        }
        options.update(overrides)
        options.setdefault("slack", TEST_SLACK)
        options.setdefault("listers", {BRAND: self.client})
        return Poller(
            store=self.store,
            is_paused=lambda brand: brand in self.pauses,
            on_credentials_rejected=self.pauses.pause,
            on_enqueued=lambda: self.woken.append(1),
            observer=self.metrics,
            clock=self.clock,
            **options,
        )

    def list_calls(self) -> list[dict[str, str]]:
        return [c.query for c in self.state.calls if c.path == LIST_PATH]

    def touch(self, order_id: int, at: float | None = None) -> float:
        """Change an order in the sandbox (no notification); return its whole-second stamp."""
        if at is not None:
            self.clock.now = at
        self.state.update_order(order_id, status="DELIVERED", note=f"at {self.clock.now}")
        return float(int(self.clock.now))

    async def pending(self) -> dict[int, int]:
        """Order id -> notices waiting in its job (claims them, with a far-future clock)."""
        jobs = await self.store.claim_hydrations(limit=1000, now=T + 10**6, lease_seconds=60)
        for job in jobs:
            await self.store.release_hydration(job)
        return {job.order_id: len(job.notification_ids) for job in jobs}

    async def hydrate_all(self) -> None:
        """Store the current sandbox state of every waiting order, as hydration would."""
        jobs = await self.store.claim_hydrations(limit=1000, now=T + 10**6, lease_seconds=60)
        for job in jobs:
            current = self.state.get_order(job.order_id)
            assert current is not None
            snapshot = NewSnapshot(
                key=f"{job.order_id}:{current['updated_at']}",
                body=b"{}",
                order_updated_at=parse_listed(current).updated_at,  # type: ignore[union-attr]
                hydrated_at=self.clock.now,
            )
            await self.store.complete_hydration(job, snapshot, [], now=self.clock.now)

    async def fetch_all(self) -> None:
        """Hydrate every waiting order for real: a detail call, a content-derived id."""
        jobs = await self.store.claim_hydrations(limit=1000, now=self.clock.now, lease_seconds=60)
        for job in jobs:
            order = await self.client.get_order(job.order_id, job.venue_id)
            snapshot = make_snapshot(job, order, now=self.clock.now)
            await self.store.complete_hydration(job, snapshot, [], now=self.clock.now)

    def cycles(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "clopos_hydrator_poll_cycles_total", {"brand": BRAND, "outcome": outcome}
        )
        return value or 0.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T)


@pytest.fixture
def sandbox_url(clock: FakeClock) -> Iterator[tuple[SandboxState, str]]:
    # 40 orders, ten minutes apart, the newest changed 540 s before T.
    state = SandboxState(clock=clock, seed_orders=40)
    with ServerThread(create_sandbox_app(state)) as server:
        yield state, f"{server.url}/open-api"


@pytest.fixture
async def rig(
    clock: FakeClock, sandbox_url: tuple[SandboxState, str], tmp_path: Path
) -> AsyncIterator[Rig]:
    state, url = sandbox_url
    brand = BrandConfig(
        brand=DEFAULT_BRAND,
        client_id=DEFAULT_CLIENT_ID,
        client_secret=DEFAULT_CLIENT_SECRET,
        integrator_id=DEFAULT_INTEGRATOR_ID,
    )
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    async with make_http_client(timeout=5.0, max_connections=8) as http:
        budget = LocalRateBudget(10_000, clock=clock, sleep=clock.sleep)
        client = CloposClient(
            brand, base_url=url, http=http, budget=budget, clock=clock, rejected_cooldown_seconds=0
        )
        yield Rig(clock, state, store, client, Metrics(), BrandPauses(300, clock=clock), [])
    await store.close()


async def test_first_poll_looks_back_as_far_as_the_lookback(rig: Rig) -> None:
    poller = rig.poller(lookback=900)
    cycle = await poller.cycle(BRAND)

    # Seeded orders changed 540 s, 1140 s, ... ago: only the newest is within 900 s.
    assert (cycle.outcome, cycle.enqueued, cycle.pages) == ("ok", 1, 1)
    assert await rig.pending() == {1040: 1}
    assert rig.woken == [1]
    newest = float(int(T - 540))
    assert await rig.store.get_poll_watermark(BRAND) == newest
    assert poller.status(BRAND).watermark == newest
    query = rig.list_calls()[0]
    assert (query["sort[0]"], query["sort[1]"], query["limit"]) == ("updated_at", "-1", "100")
    # With the receipt, as a fetch has it: the listed content is the state's content.
    assert query["with[0]"] == "receipt:id,service_notification_id,status"


async def test_steady_state_is_one_list_call_and_a_known_state_is_not_enqueued(
    rig: Rig,
) -> None:
    poller = rig.poller()
    await poller.cycle(BRAND)
    await rig.hydrate_all()

    for _ in range(3):
        rig.clock.now += 30
        cycle = await poller.cycle(BRAND)
        assert (cycle.outcome, cycle.enqueued, cycle.pages) == ("ok", 0, 1)
    assert len(rig.list_calls()) == 4
    assert await rig.pending() == {}
    assert rig.cycles("ok") == 4


async def test_changes_are_enqueued_once_per_state(rig: Rig) -> None:
    poller = rig.poller(lookback=0)
    await poller.cycle(BRAND)
    rig.touch(1010, at=T + 10)
    rig.touch(1020, at=T + 12)

    assert (await poller.cycle(BRAND)).enqueued == 2
    # Polled again before hydration: the same states are duplicates, not new notices.
    rig.clock.now += 30
    assert (await poller.cycle(BRAND)).enqueued == 0
    assert await rig.pending() == {1010: 1, 1020: 1}

    # A newer state of a waiting order is a new notice, coalesced into the same fetch.
    rig.touch(1010, at=T + 50)
    assert (await poller.cycle(BRAND)).enqueued == 1
    assert await rig.pending() == {1010: 2, 1020: 1}
    assert await rig.store.get_poll_watermark(BRAND) == T + 50
    enqueued = rig.metrics.registry.get_sample_value(
        "clopos_hydrator_poll_enqueued_total", {"brand": BRAND}
    )
    assert enqueued == 3


async def test_a_change_in_the_same_second_as_the_watermark_is_not_missed(rig: Rig) -> None:
    poller = rig.poller(lookback=0)
    stamp = rig.touch(1010, at=T + 100.2)
    assert (await poller.cycle(BRAND)).enqueued == 1
    assert poller.status(BRAND).watermark == stamp

    # Changed later, but within the same whole second: its updated_at equals the watermark.
    assert rig.touch(1011, at=T + 100.9) == stamp
    rig.clock.now = T + 101
    cycle = await poller.cycle(BRAND)
    assert cycle.enqueued == 1
    assert set(await rig.pending()) == {1010, 1011}


async def test_a_second_change_in_the_same_whole_second_is_found(rig: Rig) -> None:
    """Issue 8 item 2: state A is fetched; state B gets the same updated_at second and
    its webhook is lost. Equal stamps must not hide it: states compare by content."""
    poller = rig.poller(lookback=0)
    stamp = rig.touch(1010, at=T + 100.2)  # state A
    assert (await poller.cycle(BRAND)).enqueued == 1
    await rig.fetch_all()
    assert await rig.pending() == {}

    assert rig.touch(1010, at=T + 100.7) == stamp  # state B, same second, no webhook
    rig.clock.now = T + 101.5
    assert (await poller.cycle(BRAND)).enqueued == 1
    assert await rig.pending() == {1010: 1}
    # Listed again, B is the same listed state: no second notice for it.
    rig.clock.now += 2
    assert (await poller.cycle(BRAND)).enqueued == 0
    await rig.fetch_all()
    rig.clock.now += 2
    assert (await poller.cycle(BRAND)).enqueued == 0
    assert await rig.pending() == {}


async def test_a_backlog_is_read_over_several_cycles_without_skipping(rig: Rig) -> None:
    poller = rig.poller(lookback=0, page_size=5, max_pages=2)
    await poller.cycle(BRAND)  # nothing within the lookback: it is remembered as read
    assert await rig.store.get_poll_watermark(BRAND) == T - TEST_SLACK
    backlog = list(range(1001, 1024))  # 23 changes, one a second, more than 2 pages of 5
    for index, order_id in enumerate(backlog):
        rig.touch(order_id, at=T + 10 + index)
    newest = T + 10 + len(backlog) - 1

    first = await poller.cycle(BRAND)
    assert (first.outcome, first.enqueued, first.pages) == ("partial", 10, 2)
    # Not moved past the pages not read yet.
    assert await rig.store.get_poll_watermark(BRAND) == T - TEST_SLACK
    assert poller.status(BRAND).backlog_page == 3

    # Meanwhile an order already read and one not yet read change again (both jump to
    # the top), and a new one changes: the unread pages shift down, never up.
    rig.touch(1023, at=newest + 5)
    rig.touch(1001, at=newest + 6)
    rig.touch(1030, at=newest + 7)

    second = await poller.cycle(BRAND)
    assert second.outcome == "partial"
    third = await poller.cycle(BRAND)
    assert third.outcome == "ok"
    # The scan's newest state is the watermark: what changed during the scan comes next.
    assert await rig.store.get_poll_watermark(BRAND) == newest
    # Pages 3 and 4 re-read two orders (shifted down by the changes); page 5 ends it.
    assert [q["page"] for q in rig.list_calls()[1:]] == ["1", "2", "3", "4", "5"]
    # 1001 changed again during the scan and jumped above it: the next cycle reads it.
    assert set(await rig.pending()) == set(backlog) - {1001}

    fourth = await poller.cycle(BRAND)
    assert fourth.outcome == "ok"
    assert await rig.store.get_poll_watermark(BRAND) == newest + 7
    waiting = await rig.pending()
    assert set(waiting) == {*backlog, 1030}
    # Re-read states are duplicates: one notice per state listed. 1023 was listed in two
    # states; 1001 only in its newest (it had changed again before its page was read).
    assert waiting == {**dict.fromkeys(backlog, 1), 1023: 2, 1030: 1}


async def test_failures_are_counted_and_polling_goes_on(rig: Rig) -> None:
    poller = rig.poller(lookback=0)
    rig.state.inject("500")
    assert (await poller.cycle(BRAND)).outcome == "transient"
    assert poller.status(BRAND).last_error is not None

    rig.state.inject("429")
    limited = await poller.cycle(BRAND)
    assert limited.outcome == "rate_limited"
    assert limited.retry_after >= 1  # the loop waits at least that long

    rig.touch(1005, at=T + 20)
    ok = await poller.cycle(BRAND)
    assert (ok.outcome, ok.enqueued) == ("ok", 1)
    assert poller.status(BRAND).last_error is None
    assert (rig.cycles("transient"), rig.cycles("rate_limited"), rig.cycles("ok")) == (1, 1, 1)


async def test_rejected_credentials_pause_the_brand_and_polling_skips_it(rig: Rig) -> None:
    poller = rig.poller(interval=1)
    rig.state.reject_credentials(DEFAULT_CLIENT_ID)
    cycle = await poller.cycle(BRAND)
    assert cycle.outcome == "credentials_rejected"
    assert BRAND in rig.pauses
    ok, detail = poller.readiness(BRAND)
    assert ok
    assert "paused" in detail

    # A paused brand is not polled at all (its probe decides when to resume).
    calls = len(rig.state.calls)
    runner = asyncio.create_task(poller.run())
    await asyncio.sleep(0.2)
    poller.stop()
    await asyncio.wait_for(runner, timeout=2)
    assert len(rig.state.calls) == calls
    assert poller.status(BRAND).last_paused_at == rig.clock.now


async def test_an_error_mid_backlog_resumes_at_the_failed_page(rig: Rig) -> None:
    poller = rig.poller(lookback=0, page_size=5, max_pages=1)
    await poller.cycle(BRAND)
    backlog = list(range(1001, 1016))  # three full pages above the watermark
    for index, order_id in enumerate(backlog):
        rig.touch(order_id, at=T + 10 + index)

    assert (await poller.cycle(BRAND)).outcome == "partial"  # page 1
    rig.state.inject("504")
    failed = await poller.cycle(BRAND)  # page 2 fails
    assert (failed.outcome, failed.pages) == ("transient", 0)
    assert poller.status(BRAND).backlog_page == 2

    outcomes = [(await poller.cycle(BRAND)).outcome for _ in range(3)]
    assert outcomes == ["partial", "partial", "ok"]  # pages 2, 3, then 4 reaches the floor
    assert [q["page"] for q in rig.list_calls()] == ["1", "1", "2", "2", "3", "4"]
    assert set(await rig.pending()) == set(backlog)
    assert await rig.store.get_poll_watermark(BRAND) == T + 10 + len(backlog) - 1


async def test_a_store_failure_is_a_failed_cycle_not_a_crash(rig: Rig) -> None:
    poller = rig.poller()
    await rig.store.close()
    cycle = await poller.cycle(BRAND)
    assert cycle.outcome == "store_error"
    assert rig.cycles("store_error") == 1
    await rig.store.open()
    assert (await poller.cycle(BRAND)).outcome == "ok"


async def test_readiness_turns_red_when_polls_keep_failing(rig: Rig) -> None:
    poller = rig.poller(interval=30)
    assert poller.readiness(BRAND) == (True, "no poll finished yet")
    await poller.cycle(BRAND)
    rig.clock.now += 200
    ok, detail = poller.readiness(BRAND)
    assert ok
    assert detail == "last poll 200s ago"

    rig.state.inject("500", count=5)
    await poller.cycle(BRAND)
    rig.clock.now += 101
    ok, detail = poller.readiness(BRAND)
    assert not ok
    assert detail.startswith("no successful poll for 301s (> 300s): transient")


async def test_stop_ends_the_loop_promptly(rig: Rig) -> None:
    poller = rig.poller(interval=30)
    runner = asyncio.create_task(poller.run())
    deadline = time.monotonic() + 5
    while not rig.list_calls() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert poller.alive
    assert len(rig.list_calls()) == 1  # the first poll happens at start
    poller.stop()
    await asyncio.wait_for(runner, timeout=2)
    assert not poller.alive


def test_unicode_digits_are_not_order_or_venue_ids() -> None:
    """str.isdigit() accepts '²'; int() refuses it and no HTTP header can carry it."""
    assert parse_listed({"id": "²", "updated_at": iso(T)}) is None
    listed = parse_listed({"id": "7", "venue_id": "²", "updated_at": iso(T)})
    assert listed is not None
    assert (listed.order_id, listed.venue_id) == (7, None)


class JunkLister:
    """A list endpoint whose rows the poller cannot read (an unforeseen answer shape)."""

    def __init__(self) -> None:
        self.calls = 0

    async def list_orders(self, **_: Any) -> OrdersPage:
        self.calls += 1
        rows = [{"id": n, "updated_at": 1_700_000_000 + n} for n in range(1, 6)]  # numbers
        return OrdersPage(orders=rows, total=None, page=1, limit=5)


async def test_a_page_of_unreadable_orders_fails_the_cycle_visibly(rig: Rig) -> None:
    lister = JunkLister()
    poller = rig.poller(page_size=5, max_pages=10, listers={BRAND: lister})
    cycle = await poller.cycle(BRAND)
    assert cycle.outcome == "rejected"  # not "partial" or "ok": readiness will say so
    assert lister.calls == 1  # it did not walk page after page
    assert poller.status(BRAND).last_error is not None
    assert await rig.store.get_poll_watermark(BRAND) is None  # nothing claimed as read
