"""Hydration from list pages and backlog mode, against real things.

The real Clopos client talks to the sandbox over loopback; the store is real SQLite; the
sandbox, the client, the budget, the list hydrator and the backlog reader share one fake
clock, so "received before the page was read" is decided by the test. Each rule of
issue 10 has a test here:

- list and detail reads of one state give the same id;
- a listed state identical to a stored one delivers nothing;
- a page satisfies only notices received before it was read;
- an order missing from the pages is fetched one by one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.backlog import BacklogReader, backlog_threshold, worth_listing
from app.clopos.budget import LocalRateBudget
from app.clopos.client import CloposClient
from app.errors import StoreError
from app.http_client import make_http_client
from app.hydration import Hydrator, make_snapshot
from app.list_hydration import APPLY_CHUNK, ListHydrator, listed_state
from app.metrics import Metrics
from app.pauses import BrandPauses
from app.poller import Poller, parse_listed
from app.retry import RetryPolicy
from app.sandbox import (
    DEFAULT_BRAND,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_INTEGRATOR_ID,
    SandboxState,
    create_sandbox_app,
)
from app.settings import BrandConfig
from app.snapshot import snapshot_key
from app.store.base import Delivery, HydrationJob, Notification, VenueBacklog
from app.store.listed import judge_listed
from app.store.sqlite import SqliteStore
from tests.clock import FakeClock
from tests.servers import ServerThread

T = 1_770_000_000.0
BRAND = DEFAULT_BRAND
SINK = "http"
LIST_PATH = "/open-api/v2/orders"
DETAIL_PREFIX = "/open-api/v2/orders/"


@dataclass
class Rig:
    clock: FakeClock
    state: SandboxState
    store: SqliteStore
    client: CloposClient
    metrics: Metrics
    from_list: ListHydrator
    pauses: BrandPauses = field(default_factory=lambda: BrandPauses(300))

    def touch(self, order_id: int, at: float, **fields: Any) -> None:
        """Change an order in the sandbox at ``at`` (no notification)."""
        self.clock.now = at
        self.state.update_order(order_id, status="DELIVERED", note=f"at {at}", **fields)

    async def notify(self, order_id: int, at: float, venue_id: str | None = None) -> None:
        await self.store.enqueue(
            Notification(brand=BRAND, order_id=order_id, received_at=at, venue_id=venue_id)
        )

    async def claim(self) -> list[HydrationJob]:
        return await self.store.claim_hydrations(limit=1000, now=self.clock.now, lease_seconds=60)

    async def due(self) -> dict[int, int]:
        """Order id -> notices waiting in its due job (claims and releases them)."""
        jobs = await self.claim()
        for job in jobs:
            await self.store.release_hydration(job)
        return {job.order_id: len(job.notification_ids) for job in jobs}

    async def fetch_one_by_one(self) -> None:
        """What the hydration workers do with due jobs: a detail call each."""
        hydrator = Hydrator(
            store=self.store,
            fetchers={BRAND: self.client},
            sinks=[SINK],
            policy=RetryPolicy(),
            paused_retry_seconds=5,
            on_credentials_rejected=lambda brand, exc: None,
            observer=self.metrics,
            clock=self.clock,
        )
        for job in await self.claim():
            await hydrator.process(job)

    async def deliveries(self) -> list[Delivery]:
        return await self.store.claim_deliveries(
            sink=SINK, limit=1000, now=self.clock.now + 10**6, lease_seconds=60
        )

    def list_calls(self) -> list[dict[str, str]]:
        return [c.query for c in self.state.calls if c.path == LIST_PATH]

    def detail_calls(self) -> list[int]:
        return [
            int(c.path[len(DETAIL_PREFIX) :])
            for c in self.state.calls
            if c.path.startswith(DETAIL_PREFIX)
        ]

    def poller(self) -> Poller:
        return Poller(
            store=self.store,
            listers={BRAND: self.client},
            interval=30,
            page_size=100,
            max_pages=10,
            lookback=0,
            slack=5,
            is_paused=lambda brand: False,
            on_credentials_rejected=lambda brand, exc: None,
            on_enqueued=lambda: None,
            observer=self.metrics,
            from_list=self.from_list,
            clock=self.clock,
        )

    def backlog(self, *, per_minute: int = 60, page_size: int = 10, **extra: Any) -> BacklogReader:
        options: dict[str, Any] = {
            "horizon": 10.0,  # 60/min: a backlog is more than 10 due jobs
            "max_pages": 10,
            "slack": 5.0,
        }
        options.update(extra)
        return BacklogReader(
            store=self.store,
            listers={BRAND: self.client},
            from_list=self.from_list,
            per_minute=per_minute,
            page_size=page_size,
            is_paused=lambda brand: False,
            on_credentials_rejected=lambda brand, exc: None,
            on_cycle_end=lambda: None,
            clock=self.clock,
            **options,
        )


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
    metrics = Metrics()
    async with make_http_client(timeout=5.0, max_connections=8) as http:
        budget = LocalRateBudget(10_000, clock=clock, sleep=clock.sleep)
        client = CloposClient(brand, base_url=url, http=http, budget=budget, clock=clock)
        from_list = ListHydrator(store=store, sinks=[SINK], observer=metrics, clock=clock)
        yield Rig(clock, state, store, client, metrics, from_list)
    await store.close()


def body(delivery: Delivery) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(delivery.body)
    return parsed


# --- the pure rule ----------------------------------------------------------------------------


def test_judging_a_listed_state_by_content_then_clock() -> None:
    base = {"key": "b", "updated_at": T, "read_at": T + 5}
    stored = {"last_key": "a", "last_updated_at": T, "last_read_at": T + 1}
    assert judge_listed(**base, last_key=None, last_updated_at=None, last_read_at=None) == (
        "stored"
    )
    assert judge_listed(**{**base, "key": "a"}, **{k: v for k, v in stored.items()}) == (
        "unchanged"
    )
    assert judge_listed(**{**base, "updated_at": T - 1}, **stored) == "stale"
    assert judge_listed(**{**base, "updated_at": T + 1, "read_at": T}, **stored) == "stored"
    # Same second, other content: read after the stored state was read, it is newer...
    assert judge_listed(**base, **stored) == "stored"
    # ...read before (or while) it was, nobody can tell: a fetch will.
    assert judge_listed(**{**base, "read_at": T + 1}, **stored) == "ambiguous"
    # The content of a state the order already had: the list lags.
    assert judge_listed(**base, **stored, seen_before=True) == "stale"
    # A stored stamp an hour ahead of the clock when it was read is a lie: it must not
    # make every later change look old (the order would freeze).
    future = {"last_key": "a", "last_updated_at": T + 3600, "last_read_at": T + 1}
    assert judge_listed(**base, **future) == "stored"
    assert judge_listed(**{**base, "read_at": T}, **future) == "ambiguous"


def test_backlog_threshold_is_the_horizon_of_budget() -> None:
    assert backlog_threshold(120, 10) == 20
    assert backlog_threshold(300, 10) == 50
    many = [VenueBacklog(None, 30, T)]
    assert worth_listing(many, 20)
    assert not worth_listing(many, 30)
    # Thirty venues with one due job each: no page can carry more than a detail call.
    assert not worth_listing([VenueBacklog(str(v), 1, T) for v in range(30)], 20)


# --- the rules against the sandbox ------------------------------------------------------------


async def test_list_and_detail_reads_of_one_state_give_the_same_id(rig: Rig) -> None:
    rig.touch(1005, at=T + 1, receipt={"id": 7, "service_notification_id": 8, "status": 2})
    detail = await rig.client.get_order(1005)
    page = await rig.client.list_orders(limit=100, with_receipt=True)
    listed = next(o for o in page.orders if o["id"] == 1005)
    assert listed == detail
    assert snapshot_key(BRAND, 1005, listed) == snapshot_key(BRAND, 1005, detail)

    # Through the pipeline: the poller stores it from the page; a webhook's fetch of the
    # same state then finds it unchanged, so the sink gets it once, under one id.
    cycle = await rig.poller().cycle(BRAND)
    assert cycle.hydrated == 1
    await rig.notify(1005, at=rig.clock.now + 1)
    rig.clock.now += 2
    await rig.fetch_one_by_one()
    assert rig.detail_calls() == [1005, 1005]  # ours above, then the worker's
    sent = await rig.deliveries()
    assert [body(d)["hydrated_from"] for d in sent] == ["order_list"]
    assert body(sent[0])["id"] == snapshot_key(BRAND, 1005, detail)
    assert body(sent[0])["order"] == detail


async def test_a_listed_state_identical_to_a_stored_one_delivers_nothing(rig: Rig) -> None:
    rig.touch(1010, at=T + 1)
    await rig.notify(1010, at=T + 1)
    rig.clock.now = T + 2
    await rig.fetch_one_by_one()  # stored from a detail read
    assert len(await rig.deliveries()) == 1

    rig.clock.now = T + 5
    poller = rig.poller()
    cycle = await poller.cycle(BRAND)
    assert (cycle.hydrated, cycle.enqueued) == (0, 0)
    assert await rig.deliveries() == []  # nothing new to send
    assert await rig.due() == {}


async def test_a_page_satisfies_only_notices_received_before_it_was_read(rig: Rig) -> None:
    rig.touch(1020, at=T + 1)
    await rig.notify(1020, at=T + 1)  # before the page is read
    rig.clock.now = T + 3
    page = await rig.client.list_orders(limit=100, with_receipt=True)
    assert page.requested_at == T + 3
    # Received after the page was read: the page may predate the change they announce.
    await rig.notify(1020, at=T + 4)
    await rig.notify(1030, at=T + 4)
    listed = [o for o in map(parse_listed, page.orders) if o is not None]
    result = await rig.from_list.apply(BRAND, page, listed, notified_only=True)

    outcomes = {r.order_id: (r.outcome, r.satisfied) for r in result.results}
    assert outcomes[1020] == ("stored", 1)
    assert outcomes[1030] == ("stored", 0)  # its state is delivered, its notice still waits
    assert outcomes[1001] == ("skipped", 0)  # nothing waits for it: not asked for
    rig.clock.now = T + 5
    assert await rig.due() == {1020: 1, 1030: 1}
    sent = {body(d)["order_id"]: body(d) for d in await rig.deliveries()}
    assert set(sent) == {1020, 1030}
    assert len(sent[1020]["notification_ids"]) == 1
    assert sent[1020]["received_at"] == "2026-02-02T02:40:01.000Z"  # the notice before
    assert sent[1030]["notification_ids"] == []
    assert rig.detail_calls() == []

    # The notices received after the page are fetched one by one: same states, so
    # nothing is delivered twice.
    await rig.fetch_one_by_one()
    assert sorted(rig.detail_calls()) == [1020, 1030]
    assert await rig.deliveries() == []
    assert await rig.due() == {}


async def test_an_order_missing_from_the_pages_is_fetched_one_by_one(rig: Rig) -> None:
    recent = list(range(1011, 1036))  # 25 orders changed a second apart, each notified
    for index, order_id in enumerate(recent):
        rig.touch(order_id, at=T + 10 + index)
        await rig.notify(order_id, at=T + 10.5 + index)
    # Notified too, but its last change is hours old: not on the pages backlog mode reads.
    await rig.notify(1001, at=T + 35)
    rig.clock.now = T + 36

    reader = rig.backlog(per_minute=60, page_size=10, max_pages=3)
    cycle = await reader.cycle(BRAND)
    # 26 due > 10 s of a 60/min budget: three pages (the cap) list the 25 recent changes.
    assert (cycle.outcome, cycle.pages, cycle.satisfied, cycle.stored) == ("listed", 3, 25, 25)
    # 1001 was notified before the first page and is still due: the workers may take it.
    assert BRAND not in reader.holding
    queries = rig.list_calls()
    assert [q["page"] for q in queries] == ["1", "2", "3"]
    assert all(q["sort[0]"] == "updated_at" and q["sort[1]"] == "-1" for q in queries)
    assert all(q["with[0]"] == "receipt:id,service_notification_id,status" for q in queries)
    assert await rig.due() == {1001: 1}
    assert rig.detail_calls() == []

    await rig.fetch_one_by_one()
    assert rig.detail_calls() == [1001]
    sent = [body(d) for d in await rig.deliveries()]
    assert sorted(b["order_id"] for b in sent) == sorted([*recent, 1001])
    assert {b["hydrated_from"] for b in sent if b["order_id"] != 1001} == {"order_list"}
    assert next(b for b in sent if b["order_id"] == 1001)["hydrated_from"] == "order"


async def test_a_page_is_applied_a_chunk_at_a_time_so_webhooks_do_not_wait_for_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders = list(range(1001, 1041))  # the sandbox's 40, each notified
    for order_id in orders:
        rig.touch(order_id, at=T + 1)
        await rig.notify(order_id, at=T + 2)
    rig.clock.now = T + 3
    page = await rig.client.list_orders(limit=100, with_receipt=True)
    listed = [o for o in map(parse_listed, page.orders) if o is not None]
    assert len(listed) == 40

    events: list[str] = []
    webhooks: list[asyncio.Task[None]] = []
    apply_listed = rig.store.apply_listed

    async def recording(brand: str, states: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(f"chunk of {len(states)}")
        if not webhooks:  # a webhook arrives while the page is being applied

            async def webhook() -> None:
                await rig.notify(1001, at=T + 4)
                events.append("webhook committed")

            webhooks.append(asyncio.create_task(webhook()))
        return await apply_listed(brand, states, *args, **kwargs)

    monkeypatch.setattr(rig.store, "apply_listed", recording)
    commits = rig.store.commits
    result = await rig.from_list.apply(BRAND, page, listed, notified_only=True)
    await webhooks[0]

    chunks = [e for e in events if e.startswith("chunk")]
    assert chunks == [f"chunk of {APPLY_CHUNK}"] * (40 // APPLY_CHUNK)
    # Its commit waited for one chunk at most, not for the rest of the page.
    last_chunk = max(i for i, event in enumerate(events) if event.startswith("chunk"))
    assert events.index("webhook committed") < last_chunk
    assert rig.store.commits - commits >= len(chunks)
    # The page's outcome is the same as in one transaction: every order stored, each
    # notice received before the read satisfied; the webhook's notice still waits.
    assert (result.stored, result.satisfied, result.fallback) == (40, 40, [])
    rig.clock.now = T + 5
    assert await rig.due() == {1001: 1}


async def test_a_chunk_that_fails_leaves_the_chunks_before_it_applied_and_woken(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    for order_id in range(1001, 1041):
        rig.touch(order_id, at=T + 1)
        await rig.notify(order_id, at=T + 2)
    rig.clock.now = T + 3
    page = await rig.client.list_orders(limit=100, with_receipt=True)
    listed = [o for o in map(parse_listed, page.orders) if o is not None]
    woken: list[bool] = []
    hydrator = ListHydrator(
        store=rig.store,
        sinks=[SINK],
        observer=rig.metrics,
        on_stored=lambda: woken.append(True),
        clock=rig.clock,
    )
    apply_listed = rig.store.apply_listed
    calls: list[int] = []

    async def second_fails(brand: str, states: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(states))
        if len(calls) == 2:
            raise StoreError("apply_listed: disk I/O error")
        return await apply_listed(brand, states, *args, **kwargs)

    monkeypatch.setattr(rig.store, "apply_listed", second_fails)
    with pytest.raises(StoreError):
        await hydrator.apply(BRAND, page, listed, notified_only=True)

    assert calls == [APPLY_CHUNK, APPLY_CHUNK]  # nothing after the failed chunk
    assert woken == [True]  # the first chunk's deliveries are woken
    assert len(await rig.deliveries()) == APPLY_CHUNK
    rig.clock.now = T + 5
    assert len(await rig.due()) == 40 - APPLY_CHUNK  # the rest still waits for a read


async def test_no_backlog_no_list_call(rig: Rig) -> None:
    for order_id in (1011, 1012, 1013):
        rig.touch(order_id, at=T + 1)
        await rig.notify(order_id, at=T + 1)
    cycle = await rig.backlog(per_minute=60).cycle(BRAND)
    assert cycle.outcome == "idle"  # 3 due <= 10 s of 60/min: one by one is as quick
    assert rig.list_calls() == []


async def test_backlog_mode_lists_each_venue_with_its_x_venue(rig: Rig) -> None:
    for index in range(12):
        order_id = 2001 + index
        rig.state.put_order({"id": order_id, "venue_id": 2})
        rig.touch(order_id, at=T + 1 + index)
        await rig.notify(order_id, at=T + 1.5 + index, venue_id="2")
    for index, order_id in enumerate(range(1011, 1023)):
        rig.touch(order_id, at=T + 1 + index)
        await rig.notify(order_id, at=T + 1.5 + index)
    rig.clock.now = T + 20

    cycle = await rig.backlog(per_minute=60, page_size=100).cycle(BRAND)
    # Each venue's first page satisfied notices, so a second page is read (empty: the end).
    assert (cycle.venues, cycle.pages, cycle.satisfied) == (2, 4, 24)
    venues = sorted(
        c.headers.get("x-venue", "default") for c in rig.state.calls if c.path == LIST_PATH
    )
    assert venues == ["2", "2", "default", "default"]
    assert await rig.due() == {}
    assert rig.detail_calls() == []


async def test_a_page_never_touches_an_order_whose_fetch_is_in_flight(rig: Rig) -> None:
    rig.touch(1020, at=T + 1)
    await rig.notify(1020, at=T + 1)
    rig.clock.now = T + 2
    [job] = await rig.claim()  # a worker's fetch is in flight
    rig.touch(1020, at=T + 3)
    cycle = await rig.poller().cycle(BRAND)
    # Deferred to the fetch in flight: a notice makes sure one more fetch follows it.
    assert (cycle.hydrated, cycle.enqueued) == (0, 1)
    assert await rig.deliveries() == []
    order = await rig.client.get_order(1020)
    await rig.store.complete_hydration(
        job, make_snapshot(job, order, now=rig.clock.now), [SINK], now=rig.clock.now
    )
    assert await rig.due() == {1020: 1}


async def test_a_listed_entry_that_cannot_stand_for_a_fetch_is_left_to_a_fetch(rig: Rig) -> None:
    page = await rig.client.list_orders(limit=100, with_receipt=False)  # no receipt key
    order = parse_listed(page.orders[0])
    assert order is not None
    assert listed_state(BRAND, order, hydrated_at=T) is None
    result = await rig.from_list.apply(BRAND, page, [order])
    assert result.fallback == [order]
    assert result.results == []


async def test_backlog_mode_reads_past_the_floor_while_pages_satisfy_notices(rig: Rig) -> None:
    changed = list(range(1011, 1036))  # 25 changes, each notified over a minute late
    for index, order_id in enumerate(changed):
        rig.touch(order_id, at=T + 10 + index)
    for order_id in changed:
        await rig.notify(order_id, at=T + 100)
    rig.clock.now = T + 101
    cycle = await rig.backlog(per_minute=60, page_size=10, slack=5.0).cycle(BRAND)
    # Page 1 is already below the floor (T + 95) but satisfies notices, and so do pages 2
    # and 3; page 4 (seeded orders only) satisfies none: the scan ends there.
    assert (cycle.pages, cycle.satisfied) == (4, 25)
    assert await rig.due() == {}
    assert rig.detail_calls() == []


async def test_a_venue_that_cannot_be_listed_falls_back_to_detail_calls(rig: Rig) -> None:
    for index in range(14):  # venue 2: the larger group, listed first
        order_id = 2001 + index
        rig.state.put_order({"id": order_id, "venue_id": 2})
        rig.touch(order_id, at=T + 1 + index)
        await rig.notify(order_id, at=T + 1.5 + index, venue_id="2")
    for index, order_id in enumerate(range(1011, 1023)):
        rig.touch(order_id, at=T + 1 + index)
        await rig.notify(order_id, at=T + 1.5 + index)
    rig.clock.now = T + 20
    rig.state.inject("404")  # Clopos refuses the list of venue 2
    reader = rig.backlog(per_minute=60, page_size=100)

    cycle = await reader.cycle(BRAND)
    assert (cycle.outcome, cycle.venues, cycle.satisfied) == ("listed", 2, 12)
    assert await rig.due() == {order_id: 1 for order_id in range(2001, 2015)}
    await rig.fetch_one_by_one()  # venue 2's orders, one by one, with their x-venue
    assert sorted(rig.detail_calls()) == list(range(2001, 2015))
    assert await rig.due() == {}

    # Not listed again for a while: its next backlog goes to detail calls at once.
    for index in range(14):
        await rig.notify(2001 + index, at=T + 30, venue_id="2")
    rig.clock.now = T + 40
    lists = len(rig.list_calls())
    assert (await reader.cycle(BRAND)).venues == 0
    assert len(rig.list_calls()) == lists
