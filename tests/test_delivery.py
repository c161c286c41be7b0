"""SinkDeliverer against a real SQLite store: the breaker's half-open trial and idleness."""

from __future__ import annotations

from pathlib import Path

from app.delivery import SinkDeliverer
from app.errors import SinkRetryableError
from app.metrics import Metrics
from app.retry import RetryPolicy
from app.sinks.breaker import CircuitBreaker
from app.store.base import Delivery, NewSnapshot, Notification
from app.store.sqlite import SqliteStore


class DownSink:
    name = "down"
    kind = "http"
    concurrency = 1
    timeout_seconds = 1.0

    async def deliver(self, delivery: Delivery) -> None:
        raise SinkRetryableError("HTTP 503: unavailable", status=503)

    async def aclose(self) -> None:
        return None


async def one_delivery(store: SqliteStore, now: float) -> Delivery:
    await store.enqueue(Notification(brand="b", order_id=1, received_at=now))
    (job,) = await store.claim_hydrations(limit=1, now=now, lease_seconds=60)
    snapshot = NewSnapshot(key="snap_1", body=b"{}", order_updated_at=None, hydrated_at=now)
    await store.complete_hydration(job, snapshot, ["down"], now=now)
    (delivery,) = await store.claim_deliveries(sink="down", limit=1, now=now, lease_seconds=60)
    return delivery


async def test_half_open_breaker_waits_for_retries_in_backoff_then_closes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "d.db")
    await store.open()
    now = [1000.0]
    breaker_now = [0.0]
    deliverer = SinkDeliverer(
        DownSink(),
        store=store,
        policy=RetryPolicy(base=100, cap=100, give_up_after=10_000),
        breaker=CircuitBreaker(1, 5.0, clock=lambda: breaker_now[0]),
        observer=Metrics(),
        clock=lambda: now[0],
    )
    await deliverer.process(await one_delivery(store, now[0]))
    assert deliverer.breaker.state == "open"  # the failure opened it; a retry is in backoff
    breaker_now[0] = 10.0  # the cool-down is over
    assert deliverer.admit(1) == (0.0, 1)  # one trial may go
    assert deliverer.breaker.state == "half_open"

    deliverer.idle()  # nothing due *yet*: the retry still waits in backoff
    assert deliverer.breaker.state == "half_open"

    now[0] += 101  # the retry has come due; a claim finding nothing means it is gone
    deliverer.idle()
    assert deliverer.breaker.state == "closed"
    await store.close()
