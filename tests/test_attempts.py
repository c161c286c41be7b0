"""Every store write that loses its lease is reported as ``lost_lease`` (issue 8, item 5).

Hydration and delivery share one attempt type and one observe helper (app/attempts.py).
Here each write an attempt ends with (complete, retry, dead letter) is made after
another worker took the item over (its lease ran out and it was claimed again): the
attempt must be logged and counted as ``lost_lease``, never as the retry or dead letter
it would have been, and no dead letter may be counted that the store did not write.

Real parts only: a real SQLite store, the sandbox Clopos over loopback HTTP with the
real client, a real receiver behind the real http sink. A control run of each case
without the takeover shows the write path is the intended one.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from app.clopos.budget import LocalRateBudget
from app.clopos.client import CloposClient
from app.delivery import SinkDeliverer
from app.http_client import make_http_client
from app.hydration import Hydrator
from app.logs import configure_logging
from app.metrics import PREFIX, Metrics
from app.retry import RetryPolicy
from app.sandbox import SandboxState, create_sandbox_app
from app.sandbox.state import (
    DEFAULT_BRAND,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_INTEGRATOR_ID,
)
from app.settings import BrandConfig, HttpSinkConfig
from app.sinks.breaker import CircuitBreaker
from app.sinks.http import HttpSink
from app.store.base import DeadLetterFilter, NewSnapshot, Notification
from app.store.sqlite import SqliteStore
from tests.e2e.receiver import Receiver
from tests.servers import ServerThread

LEASE = 60.0
SECRET = "whsec_" + base64.b64encode(b"a secret for the lost lease test").decode()
BRAND = BrandConfig(
    brand=DEFAULT_BRAND,
    client_id=DEFAULT_CLIENT_ID,
    client_secret=DEFAULT_CLIENT_SECRET,
    integrator_id=DEFAULT_INTEGRATOR_ID,
)


@dataclass
class World:
    store: SqliteStore
    metrics: Metrics
    logs: io.StringIO

    def finished(self, event: str) -> list[str]:
        lines = [json.loads(line) for line in self.logs.getvalue().splitlines()]
        return [line["outcome"] for line in lines if line.get("event") == event]

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"{PREFIX}_{name}_total", labels)
        return value or 0.0

    async def letters(self) -> int:
        return (await self.store.list_dead_letters(DeadLetterFilter())).total


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    logs = io.StringIO()
    configure_logging(fmt="json", level="info", secrets=[], stream=logs)
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    yield World(store, Metrics(), logs)
    await store.close()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def sandbox() -> Iterator[tuple[SandboxState, str]]:
    state = SandboxState()
    with ServerThread(create_sandbox_app(state)) as server:
        yield state, f"{server.url}/open-api"


@pytest.fixture
async def hydrator(world: World, sandbox: tuple[SandboxState, str]) -> AsyncIterator[Hydrator]:
    async with make_http_client(timeout=5.0, max_connections=4) as http:
        client = CloposClient(BRAND, base_url=sandbox[1], http=http, budget=LocalRateBudget(10_000))
        yield Hydrator(
            store=world.store,
            fetchers={DEFAULT_BRAND: client},
            sinks=["log"],
            policy=RetryPolicy(base=1, cap=1),
            paused_retry_seconds=300,
            on_credentials_rejected=lambda brand, exc: None,
            observer=world.metrics,
        )


# (case, brand, order id, sandbox fault, what the attempt is when its lease holds)
HYDRATION_CASES = [
    ("complete", DEFAULT_BRAND, 1001, None, "stored"),
    ("retry", DEFAULT_BRAND, 1002, "500", "retry"),
    ("retry_429", DEFAULT_BRAND, 1003, "429", "rate_limited"),
    ("retry_not_found", DEFAULT_BRAND, 999_999, None, "not_found"),
    ("dead_letter", "gone", 1004, None, "dead_letter"),  # a brand no longer configured
]


@pytest.mark.parametrize(("case", "brand", "order_id", "fault", "outcome"), HYDRATION_CASES)
async def test_a_hydration_write_after_a_lost_lease_is_lost_lease(
    world: World,
    hydrator: Hydrator,
    sandbox: tuple[SandboxState, str],
    case: str,
    brand: str,
    order_id: int,
    fault: str | None,
    outcome: str,
) -> None:
    store, state = world.store, sandbox[0]
    now = time.time()

    async def attempt(at: float, *, stolen: bool) -> None:
        await store.enqueue(Notification(brand=brand, order_id=order_id, received_at=at))
        (job,) = await store.claim_hydrations(limit=1, now=at, lease_seconds=LEASE)
        if stolen:  # its lease ran out during the fetch and another worker claimed it
            (thief,) = await store.claim_hydrations(
                limit=1, now=at + LEASE + 1, lease_seconds=LEASE
            )
            assert thief.id == job.id
        if fault is not None:
            state.inject(fault)
        await hydrator.process(job)

    await attempt(now, stolen=False)  # control: the lease holds
    assert world.finished("hydration.finished") == [outcome], case
    letters_written = await world.letters()
    assert letters_written == (1 if outcome == "dead_letter" else 0)

    await store.purge_dead_letters(DeadLetterFilter())
    stats = await store.stats(now=now)
    assert stats.hydration.running == 0
    # Once more (after any backoff), but another worker took the job over meanwhile.
    later = now + 1000
    await attempt(later, stolen=True)
    assert world.finished("hydration.finished") == [outcome, "lost_lease"], case
    assert world.count("hydrations", brand=brand, outcome="lost_lease") == 1
    assert world.count("hydrations", brand=brand, outcome=outcome) == 1, "not counted twice"
    assert world.count("dead_lettered", kind="hydration", reason="unknown_brand") == (
        1 if outcome == "dead_letter" else 0
    ), "only the dead letter that was written is counted"
    assert await world.letters() == 0
    assert (await store.stats(now=later)).hydration.running == 1, "the thief's, untouched"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    with Receiver({"/s": SECRET}) as rec:
        yield rec


# (case, what the receiver answers, what the attempt is when its lease holds)
DELIVERY_CASES = [
    ("complete", 200, "delivered"),
    ("retry", 503, "retry"),
    ("dead_letter", 400, "dead_letter"),
]


@pytest.mark.parametrize(("case", "status", "outcome"), DELIVERY_CASES)
async def test_a_delivery_write_after_a_lost_lease_is_lost_lease(
    world: World, receiver: Receiver, case: str, status: int, outcome: str
) -> None:
    store = world.store
    config = HttpSinkConfig(
        type="http", name="s", url=receiver.url("/s"), secret=SECRET, timeout_seconds=5
    )
    sink = HttpSink("s", config)
    deliverer = SinkDeliverer(
        sink,
        store=store,
        policy=RetryPolicy(base=1, cap=1),
        breaker=CircuitBreaker(100, 30.0),
        observer=world.metrics,
    )
    receiver.answer("/s", status)
    now = time.time()

    async def attempt(order_id: int, *, stolen: bool) -> None:
        await store.enqueue(Notification(brand="b", order_id=order_id, received_at=now))
        (job,) = await store.claim_hydrations(limit=1, now=now, lease_seconds=LEASE)
        snapshot = NewSnapshot(
            key=f"snap_{order_id}", body=b"{}", order_updated_at=None, hydrated_at=now
        )
        await store.complete_hydration(job, snapshot, ["s"], now=now)
        (delivery,) = await store.claim_deliveries(sink="s", limit=1, now=now, lease_seconds=LEASE)
        if stolen:
            (thief,) = await store.claim_deliveries(
                sink="s", limit=1, now=now + LEASE + 1, lease_seconds=LEASE
            )
            assert thief.id == delivery.id
        await deliverer.process(delivery)

    try:
        await attempt(1, stolen=False)
        assert world.finished("delivery.finished") == [outcome], case
        await store.purge_dead_letters(DeadLetterFilter())
        await attempt(2, stolen=True)
    finally:
        await sink.aclose()
    assert world.finished("delivery.finished") == [outcome, "lost_lease"], case
    assert world.count("deliveries", sink="s", outcome="lost_lease") == 1
    assert world.count("deliveries", sink="s", outcome=outcome) == 1
    assert world.count("dead_lettered", kind="delivery", reason="http_400") == (
        1 if outcome == "dead_letter" else 0
    ), "only the dead letter that was written is counted"
    assert await world.letters() == 0
    assert len(receiver.received("/s")) == 2, "both were sent; only the record was lost"
