"""Delivery: send one claimed snapshot to one sink and record the outcome.

Each sink has its own queue (rows keyed by sink), its own work loop and
concurrency, and its own circuit breaker, so a sink that is down only slows itself.
While the breaker is open the loop claims nothing for that sink; after the
probe delay (1 s, 2 s, 4 s ... up to the cap) one trial delivery goes through
(half-open) and decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import structlog
from opentelemetry.trace import Tracer

from app import tracing
from app.attempts import Attempt, crash_reported, observed, recorded
from app.errors import SinkError, SinkPermanentError, SinkRetryableError
from app.logs import get_logger
from app.retry import RetryPolicy
from app.sinks.base import Sink
from app.sinks.breaker import CircuitBreaker
from app.store.base import Delivery, Store

log = get_logger("app.delivery")


class DeliveryObserver(Protocol):
    """Where delivery attempts are counted (app.metrics.Metrics satisfies it)."""

    def delivery_finished(
        self, sink: str, outcome: str, reason: str | None, seconds: float | None, latency: float
    ) -> None: ...


class SinkDeliverer:
    """Delivers one sink's claimed deliveries; owns that sink's breaker."""

    def __init__(
        self,
        sink: Sink,
        *,
        store: Store,
        policy: RetryPolicy,
        breaker: CircuitBreaker,
        observer: DeliveryObserver,
        clock: Callable[[], float] = time.time,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer = tracer
        self._observer = observer
        # When the last retry this deliverer scheduled comes due (see idle()).
        self._retries_until = 0.0
        self.sink = sink
        self.breaker = breaker
        self._store = store
        self._policy = policy
        self._clock = clock

    def admit(self, free: int) -> tuple[float, int]:
        """How many deliveries the loop may claim now, or how long to wait.

        Closed: as many as there are free slots. Half-open: exactly one trial.
        Open: none, until the next probe is due.
        """
        before = self.breaker.state
        if not self.breaker.allow():
            # A finished trial wakes the loop early; this is only the longest wait.
            return max(0.05, self.breaker.retry_in()), 0
        if self.breaker.state == "half_open":
            if before == "open":
                log.info("sink.breaker.half_open", sink=self.sink.name)
            return 0.0, 1
        return 0.0, free

    def idle(self) -> None:
        """Nothing was due for this sink. If no retry this deliverer scheduled is still
        waiting in backoff either, a pending half-open trial is moot: close the breaker
        (a sink whose failed work all went to dead letters is not known to be broken).
        While retries wait, stay half-open: the first one to come due is the trial."""
        if self.breaker.state == "half_open" and self._clock() >= self._retries_until:
            self.breaker.trial_unused()
            log.info("sink.breaker.closed", sink=self.sink.name, reason="nothing_to_try")

    def _record(self, *, failure: bool) -> None:
        before = self.breaker.state
        if failure:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        after = self.breaker.state
        if after != before and after in ("open", "closed"):
            (log.warning if after == "open" else log.info)(
                f"sink.breaker.{'opened' if after == 'open' else 'closed'}",
                sink=self.sink.name,
                consecutive_failures=self.breaker.consecutive_failures,
                next_probe_in_s=self.breaker.probe_delay if after == "open" else None,
            )

    def lease_seconds(self, minimum: float) -> float:
        """A delivery's lease outlives the sink's own timeout, with room for a retry."""
        return max(minimum, 2 * self.sink.timeout_seconds + 5)

    async def process(self, delivery: Delivery) -> None:
        """One attempt with its log line and metrics, traced (when tracing is on) as a
        ``delivery`` span in the notification's trace."""
        with tracing.job_span(
            self._tracer,
            "delivery",
            delivery.traceparents,
            {
                "clopos.brand": delivery.brand,
                "clopos.order_id": delivery.order_id,
                "clopos.sink": self.sink.name,
                "clopos.sink_kind": self.sink.kind,
                "clopos.delivery_id": delivery.id,
                "clopos.attempt": delivery.attempts + 1,
                "clopos.webhook_id": delivery.snapshot_key,
            },
        ) as span:
            attempt = await self._process(delivery)
            tracing.finish(span, attempt.outcome, attempt.detail)

    async def _process(self, delivery: Delivery) -> Attempt:
        """One attempt, then its canonical log line (``delivery.finished``) and metrics."""
        structlog.contextvars.bind_contextvars(
            brand=delivery.brand,
            order_id=delivery.order_id,
            delivery_id=delivery.id,
            sink=self.sink.name,
            attempt=delivery.attempts + 1,
        )
        return await observed(
            self.run(delivery),
            event="delivery.finished",
            log=log,
            report=self._report,
            received_at=delivery.first_received_at,
            clock=self._clock,
            fine=("delivered",),
            webhook_id=delivery.snapshot_key,
            version=delivery.version,
        )

    def _report(
        self, outcome: str, reason: str | None, seconds: float | None, latency: float
    ) -> None:
        self._observer.delivery_finished(self.sink.name, outcome, reason, seconds, latency)

    async def run(self, delivery: Delivery) -> Attempt:
        """Send, then record the outcome in the store and the breaker."""
        try:
            await self.sink.deliver(delivery)
        except SinkError as exc:
            return await self._failed(delivery, exc)
        self._record(failure=False)
        done = await self._store.complete_delivery(delivery, now=self._clock())
        return recorded(done, Attempt("delivered"))

    async def crashed(self, delivery: Delivery, exc: Exception) -> None:
        """A bug surfaced while delivering: end it visibly, not in a retry loop."""
        attempt = await self._dead(delivery, "internal_error", f"{type(exc).__name__}: {exc}"[:500])
        crash_reported(attempt.outcome == "dead_letter", self._report)

    async def _dead(self, delivery: Delivery, reason: str, detail: str) -> Attempt:
        written = await self._store.dead_letter_delivery(
            delivery, reason=reason, error=detail, now=self._clock()
        )
        return recorded(written, Attempt("dead_letter", f"{reason}: {detail}", reason=reason))

    async def _failed(self, delivery: Delivery, exc: SinkError) -> Attempt:
        now = self._clock()
        detail = exc.detail[:500]
        if isinstance(exc, SinkPermanentError):
            # The sink answered: it is up, so this does not count against the breaker.
            self._record(failure=False)
            reason = f"http_{exc.status}" if exc.status is not None else "rejected"
            return await self._dead(delivery, reason, detail)
        self._record(failure=True)
        retry_after = exc.retry_after if isinstance(exc, SinkRetryableError) else None
        decision = self._policy.on_failure(
            attempt=delivery.attempts + 1, age=now - delivery.created_at, retry_after=retry_after
        )
        if decision.action == "dead_letter":
            return await self._dead(delivery, decision.reason, detail)
        written = await self._store.retry_delivery(
            delivery, retry_at=now + decision.delay, error=detail
        )
        if written:  # a retry another worker now owns is not this deliverer's to wait for
            self._retries_until = max(self._retries_until, now + decision.delay)
        return recorded(written, Attempt("retry", detail, decision.delay))
