"""Prometheus metrics: one registry per service instance (no import-time globals).

Event counters and latency histograms are updated where things happen. Gauges that
describe state (queue depth, oldest age, dead letters, budget, breaker and pause
states, readiness) are rendered at scrape time from the :class:`ServiceStatus` that
``Runtime.status()`` read for that scrape, so they can never drift from the store, and
a store that cannot be read shows as ``store_up 0`` with no queue figures at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.status import BrandStatus, ServiceStatus, budget_used_share
from app.store.base import StoreStats

PREFIX = "clopos_hydrator"
# Hydration and delivery both span seconds (normal) to hours (retried through outages).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class _StatusCollector(Collector):
    """The state gauges of one :class:`ServiceStatus` (a new one each scrape)."""

    def __init__(self, status: ServiceStatus) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status
        yield from self._health(status)
        yield from self._queues(status.store)
        yield from self._upstream(status.brands)
        breaker = GaugeMetricFamily(
            f"{PREFIX}_sink_circuit_open",
            "1 when the sink's circuit breaker is open or half-open (deliveries paused).",
            labels=["sink"],
        )
        for name, sink in status.sinks.items():
            breaker.add_metric([name], 0.0 if sink.circuit == "closed" else 1.0)
        yield breaker
        yield from self._polls(status.brands)

    def _health(self, status: ServiceStatus) -> Iterator[Metric]:
        store_up = GaugeMetricFamily(
            f"{PREFIX}_store_up",
            "1 when the store answered this scrape's ping and queue read, else 0.",
        )
        store_up.add_metric([], 1.0 if status.store_error is None else 0.0)
        ready = GaugeMetricFamily(
            f"{PREFIX}_ready", "1 when every readiness check passes (what /readyz answers)."
        )
        ready.add_metric([], 1.0 if status.ready else 0.0)
        checks = GaugeMetricFamily(
            f"{PREFIX}_readiness_check_ok",
            "Each readiness check of /readyz: 1 when it passes.",
            labels=["check"],
        )
        for name, check in status.checks.items():
            checks.add_metric([name], 1.0 if check.ok else 0.0)
        yield from (store_up, ready, checks)

    def _polls(self, brands: Mapping[str, BrandStatus]) -> Iterator[Metric]:
        watermark = GaugeMetricFamily(
            f"{PREFIX}_poll_watermark_timestamp_seconds",
            "The newest Clopos updated_at the poller has read, per brand (epoch seconds).",
            labels=["brand"],
        )
        success = GaugeMetricFamily(
            f"{PREFIX}_poll_last_success_timestamp_seconds",
            "When the brand's last poll cycle succeeded (epoch seconds).",
            labels=["brand"],
        )
        for name, brand in brands.items():
            if brand.poll is None:
                continue
            if brand.poll.watermark is not None:
                watermark.add_metric([name], brand.poll.watermark)
            if brand.poll.last_success_at is not None:
                success.add_metric([name], brand.poll.last_success_at)
        yield from (watermark, success)

    def _queues(self, stats: StoreStats | None) -> Iterator[Metric]:
        """Absent (not zero, not the last reading) when the store could not be read."""
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth",
            "Work items waiting or in flight, by stage, sink and state.",
            labels=["stage", "sink", "state"],
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_age_seconds",
            "Age of the oldest waiting item's notification, by stage and sink.",
            labels=["stage", "sink"],
        )
        dead = GaugeMetricFamily(
            f"{PREFIX}_dead_letters",
            "Dead letters waiting for an operator, by kind, reason and sink.",
            labels=["kind", "reason", "sink"],
        )
        if stats is not None:
            queues = [("hydration", "", stats.hydration)]
            queues += [("delivery", name, q) for name, q in sorted(stats.deliveries.items())]
            for stage, sink, queue in queues:
                depth.add_metric([stage, sink, "pending"], queue.pending)
                depth.add_metric([stage, sink, "running"], queue.running)
                oldest.add_metric([stage, sink], queue.oldest_pending_age or 0.0)
            for (kind, reason, sink), count in sorted(stats.dead_letters.items()):
                dead.add_metric([kind, reason, sink], count)
        yield from (depth, oldest, dead)

    def _upstream(self, brands: Mapping[str, BrandStatus]) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            f"{PREFIX}_upstream_requests",
            "Requests made to the Clopos API, by brand and status (or error kind).",
            labels=["brand", "status"],
        )
        auth = CounterMetricFamily(
            f"{PREFIX}_upstream_auth_requests",
            "Calls to Clopos /v2/auth, by brand.",
            labels=["brand"],
        )
        remaining = GaugeMetricFamily(
            f"{PREFIX}_budget_remaining",
            "Requests left in the tenant's current rate-limit window (server's view if known).",
            labels=["tenant"],
        )
        limit = GaugeMetricFamily(
            f"{PREFIX}_budget_limit",
            "The tenant's requests-per-minute budget.",
            labels=["tenant"],
        )
        reads = CounterMetricFamily(
            f"{PREFIX}_upstream_reads",
            "Clopos API requests by brand and read: order (GET /v2/orders/{id}) or "
            "order_list (a page of GET /v2/orders). Orders hydrated per call is "
            "orders_hydrated_total / upstream_reads_total.",
            labels=["brand", "read"],
        )
        used = GaugeMetricFamily(
            f"{PREFIX}_budget_used_ratio",
            "Share of the tenant's per-minute budget spent in the last 60 s (0..1).",
            labels=["tenant"],
        )
        paused = GaugeMetricFamily(
            f"{PREFIX}_brand_paused",
            "1 when Clopos rejected the brand's credentials and its work is paused.",
            labels=["brand"],
        )
        tenants_seen: set[str] = set()
        for name, brand in brands.items():
            for status, count in sorted(brand.calls_by_status.items()):
                calls.add_metric([name, status], count)
            auth.add_metric([name], brand.auth_calls)
            budget = brand.budget
            if budget is not None and brand.tenant not in tenants_seen:
                tenants_seen.add(brand.tenant)  # brands may share a tenant (and its budget)
                if budget.remaining is not None:
                    remaining.add_metric([brand.tenant], float(budget.remaining))
                limit.add_metric([brand.tenant], float(budget.limit))
                share = budget_used_share(budget)
                if share is not None:
                    used.add_metric([brand.tenant], share)
            paused.add_metric([name], 1.0 if brand.paused else 0.0)
            if brand.reads is not None:
                for read, count in sorted(brand.reads.calls.items()):
                    reads.add_metric([name, read], count)
        yield from (calls, auth, remaining, limit, paused, reads, used)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The ingest counters' children, by counter and label values: ``labels()`` takes
        # a lock and checks its arguments on every call, a measurable share of a webhook
        # request.
        self._children: dict[tuple[object, ...], Counter] = {}
        self.received = Counter(
            f"{PREFIX}_notifications_received",
            "Inbound notification requests, before any check.",
            ["route"],
            registry=r,
        )
        self.accepted = Counter(
            f"{PREFIX}_notifications_accepted",
            "Notifications stored (outcome: new, coalesced, duplicate).",
            ["brand", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_notifications_rejected",
            "Notifications refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.hydrations = Counter(
            f"{PREFIX}_hydrations",
            "Hydration attempts by brand and outcome.",
            ["brand", "outcome"],
            registry=r,
        )
        self.hydration_seconds = Histogram(
            f"{PREFIX}_hydration_duration_seconds",
            "Time of one successful hydration (Clopos fetch plus store write).",
            ["brand"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.hydration_latency = Histogram(
            f"{PREFIX}_hydration_latency_seconds",
            "From the oldest notification covered to the snapshot stored.",
            ["brand"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            f"{PREFIX}_deliveries",
            "Delivery attempts by sink and outcome (delivered, retry, dead_letter).",
            ["sink", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            f"{PREFIX}_delivery_duration_seconds",
            "Time of one delivery attempt to a sink.",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            f"{PREFIX}_delivery_latency_seconds",
            "From the oldest notification behind a snapshot to its delivery.",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_lettered = Counter(
            f"{PREFIX}_dead_lettered",
            "Work ended in a dead letter, by kind and reason.",
            ["kind", "reason"],
            registry=r,
        )
        self.poll_cycles = Counter(
            f"{PREFIX}_poll_cycles",
            "Reconciliation poll cycles by brand and outcome (ok, partial: a backlog read "
            "on over several cycles, or the failure: rate_limited, transient, ...).",
            ["brand", "outcome"],
            registry=r,
        )
        self.poll_enqueued = Counter(
            f"{PREFIX}_poll_enqueued",
            "Order changes the poller found and enqueued (not yet known to the store).",
            ["brand"],
            registry=r,
        )
        self.orders_hydrated = Counter(
            f"{PREFIX}_orders_hydrated",
            "New order states stored for delivery, by brand and the read that carried "
            "them: order (one detail call each) or order_list (up to a page per call).",
            ["brand", "read"],
            registry=r,
        )
        self.list_satisfied = Counter(
            f"{PREFIX}_list_notifications_satisfied",
            "Notifications satisfied by a list page read after they were received "
            "(no detail call made for them).",
            ["brand"],
            registry=r,
        )
        self.list_fallbacks = Counter(
            f"{PREFIX}_list_fallbacks",
            "Listed orders a page could not decide, left to be fetched one by one.",
            ["brand"],
            registry=r,
        )

    def count_received(self, route: str) -> None:
        """One webhook request on ``route`` (default or brand), before any check."""
        self._child(self.received, route).inc()

    def count_accepted(self, brand: str, outcome: str) -> None:
        """One notification stored for ``brand`` (a configured one: the set is bounded)."""
        self._child(self.accepted, brand, outcome).inc()

    def _child(self, counter: Counter, *labels: str) -> Counter:
        key = (counter, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        return child

    def hydration_finished(
        self, brand: str, outcome: str, reason: str | None, seconds: float | None, latency: float
    ) -> None:
        """``seconds`` is None when the attempt was not timed (a crash)."""
        self.hydrations.labels(brand, outcome).inc()
        if outcome == "stored":
            self.orders_hydrated.labels(brand, "order").inc()
        if outcome in ("stored", "unchanged", "stale") and seconds is not None:
            self.hydration_seconds.labels(brand).observe(seconds)
            self.hydration_latency.labels(brand).observe(latency)
        if outcome == "dead_letter":
            self.dead_lettered.labels("hydration", reason or "unknown").inc()

    def delivery_finished(
        self, sink: str, outcome: str, reason: str | None, seconds: float | None, latency: float
    ) -> None:
        """``seconds`` is None when the attempt was not timed (a crash)."""
        self.deliveries.labels(sink, outcome).inc()
        if outcome != "lost_lease" and seconds is not None:
            self.delivery_seconds.labels(sink).observe(seconds)
        if outcome == "delivered":
            self.delivery_latency.labels(sink).observe(latency)
        if outcome == "dead_letter":
            self.dead_lettered.labels("delivery", reason or "unknown").inc()

    def poll_finished(self, brand: str, outcome: str, enqueued: int) -> None:
        self.poll_cycles.labels(brand, outcome).inc()
        if enqueued:
            self.poll_enqueued.labels(brand).inc(enqueued)

    def list_applied(self, brand: str, stored: int, satisfied: int, fallback: int) -> None:
        self.orders_hydrated.labels(brand, "order_list").inc(stored)
        self.list_satisfied.labels(brand).inc(satisfied)
        self.list_fallbacks.labels(brand).inc(fallback)

    def orders_hydrated_by_read(self, brand: str) -> dict[str, int]:
        """New order states stored for ``brand`` so far, by read (for the status)."""
        counts = {}
        for read in ("order", "order_list"):
            value = self.registry.get_sample_value(
                f"{PREFIX}_orders_hydrated_total", {"brand": brand, "read": read}
            )
            counts[read] = int(value or 0)
        return counts

    def render(self, status: ServiceStatus) -> bytes:
        """The exposition text: event metrics, then the state gauges of ``status``."""
        state = CollectorRegistry(auto_describe=False)
        state.register(_StatusCollector(status))
        return generate_latest(self.registry) + generate_latest(state)
