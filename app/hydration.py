"""Hydration: claim a due job, fetch the order from Clopos, store the snapshot.

The outcome of each attempt is decided by the error's class (app/errors.py) and the
pure retry policy (app/retry.py):

==========================  ==============================================================
fetched                     snapshot stored with one delivery per sink (or ``unchanged``)
CloposRateLimited           back after ``retry_after``; not a failed attempt
CloposCredentialsRejected   brand paused (readiness says so), job kept, retried slowly;
                            not a failed attempt
CloposUnauthorized          (a 401 despite a fresh token) backoff, like a transient error
CloposNotFound              retried a few times over minutes, then dead letter ``not_found``
CloposTransientError        exponential backoff with full jitter; ``gave_up`` after a day
CloposPermanentError        dead letter ``rejected`` at once (a 4xx will not get better)
==========================  ==============================================================
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from opentelemetry.trace import Tracer

from app import tracing
from app.attempts import Attempt, Report, crash_reported, observed, recorded
from app.errors import (
    CloposCredentialsRejected,
    CloposError,
    CloposNotFound,
    CloposPermanentError,
    CloposRateLimited,
    CloposTransientError,
    CloposUnauthorized,
)
from app.logs import get_logger
from app.retry import RetryPolicy
from app.snapshot import build_body, parse_clopos_time, snapshot_key
from app.store.base import HydrationJob, NewSnapshot, Store

log = get_logger("app.hydration")
PAUSED_JOB_DELAY_SECONDS = 5.0


class OrderFetcher(Protocol):
    """What hydration needs from Clopos (satisfied by app.clopos.CloposClient)."""

    async def get_order(self, order_id: int, venue_id: str | None = None) -> dict[str, Any]: ...


class AttemptObserver(Protocol):
    """Where attempts are counted (app.metrics.Metrics satisfies it)."""

    def hydration_finished(
        self, brand: str, outcome: str, reason: str | None, seconds: float | None, latency: float
    ) -> None: ...


def validate_order(order: Any, order_id: int) -> dict[str, Any]:
    """The ``data`` object must be an order with the id we asked for."""
    if not isinstance(order, dict):
        raise CloposPermanentError("order data is not an object")
    got = order.get("id")
    if got is None or str(got) != str(order_id):
        raise CloposPermanentError(f"asked for order {order_id}, Clopos returned id {got!r}")
    # We asked for the receipt embed; Clopos documents data.receipt as always present
    # then (an object, or null before there is one). Its absence means we would
    # deliver something other than what sinks are promised.
    if "receipt" not in order:
        raise CloposPermanentError("order data has no receipt key despite the receipt embed")
    return order


def make_snapshot(job: HydrationJob, order: dict[str, Any], *, now: float) -> NewSnapshot:
    key = snapshot_key(job.brand, job.order_id, order)
    body = build_body(
        key=key,
        brand=job.brand,
        order_id=job.order_id,
        order=order,
        notification_ids=list(job.notification_ids),
        received_at=job.first_received_at,
        hydrated_at=now,
    )
    return NewSnapshot(
        key=key,
        body=body,
        order_updated_at=parse_clopos_time(order.get("updated_at")),
        hydrated_at=now,
    )


class Hydrator:
    """Runs one attempt of one job, end to end, and records its outcome in the store."""

    def __init__(
        self,
        *,
        store: Store,
        fetchers: dict[str, OrderFetcher],
        sinks: list[str],
        policy: RetryPolicy,
        paused_retry_seconds: float,
        on_credentials_rejected: Callable[[str, CloposError], None],
        observer: AttemptObserver,
        on_stored: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer = tracer
        self._observer = observer
        self._on_stored = on_stored
        self._store = store
        self._fetchers = fetchers
        self._sinks = sinks
        self._policy = policy
        self._paused_retry = paused_retry_seconds
        self._on_credentials_rejected = on_credentials_rejected
        self._clock = clock

    def _report(self, job: HydrationJob) -> Report:
        return functools.partial(self._observer.hydration_finished, job.brand)

    async def process(self, job: HydrationJob) -> None:
        """One attempt with its log line and metrics, traced (when tracing is on) as a
        ``hydration`` span in the notification's trace."""
        with tracing.job_span(
            self._tracer,
            "hydration",
            job.traceparents,
            {
                "clopos.brand": job.brand,
                "clopos.order_id": job.order_id,
                "clopos.job_id": job.id,
                "clopos.attempt": job.attempts + 1,
                "clopos.notifications": len(job.notification_ids),
            },
        ) as span:
            attempt = await self._process(job)
            tracing.finish(span, attempt.outcome, attempt.detail)

    async def _process(self, job: HydrationJob) -> Attempt:
        """One attempt, then its canonical log line (``hydration.finished``) and metrics."""
        # The try number, 404s included: the same count a dead letter records as attempts
        # (a 404 is not a failed attempt for backoff, but it is a try the operator sees).
        tried = job.attempts + job.not_found_attempts
        structlog.contextvars.bind_contextvars(
            brand=job.brand, order_id=job.order_id, job_id=job.id, attempt=tried + 1
        )
        attempt = await observed(
            self.run(job),
            event="hydration.finished",
            log=log,
            report=self._report(job),
            received_at=job.first_received_at,
            clock=self._clock,
            fine=("stored", "unchanged"),
            notifications=len(job.notification_ids),
        )
        if attempt.outcome == "stored":
            self._on_stored()
        return attempt

    async def run(self, job: HydrationJob) -> Attempt:
        """Fetch, build the snapshot and record the outcome in the store."""
        fetcher = self._fetchers.get(job.brand)
        if fetcher is None:
            return await self._dead(job, "unknown_brand", "brand is no longer configured")
        try:
            order = validate_order(
                await fetcher.get_order(job.order_id, job.venue_id), job.order_id
            )
        except CloposError as exc:
            return await self._failed(job, exc)
        now = self._clock()
        try:
            snapshot = make_snapshot(job, order, now=now)
        except ValueError as exc:  # NaN/Infinity in the order: no sink could parse it
            return await self._dead(job, "invalid_response", f"order is not valid JSON: {exc}")
        result = await self._store.complete_hydration(job, snapshot, self._sinks, now=now)
        detail = f"version={result.version}" if result.version is not None else ""
        return Attempt(result.outcome, detail + (" requeued" if result.requeued else ""))

    async def crashed(self, job: HydrationJob, exc: Exception) -> None:
        """A bug surfaced while processing this job: end it visibly, not in a retry loop."""
        attempt = await self._dead(job, "internal_error", f"{type(exc).__name__}: {exc}"[:500])
        crash_reported(attempt.outcome == "dead_letter", self._report(job))

    async def _failed(self, job: HydrationJob, exc: CloposError) -> Attempt:
        now = self._clock()
        error = exc.describe()
        if isinstance(exc, CloposRateLimited):
            return await self._retry(job, Attempt("rate_limited", error, exc.retry_after))
        if isinstance(exc, CloposCredentialsRejected):
            self._on_credentials_rejected(job.brand, exc)
            # Claims skip a paused brand, so a short delay only means: due again as soon
            # as the brand resumes, not a full probe interval after that.
            delay = min(PAUSED_JOB_DELAY_SECONDS, self._paused_retry)
            return await self._retry(job, Attempt("paused", error, delay))
        if isinstance(exc, CloposNotFound):
            decision = self._policy.on_not_found(not_found_attempt=job.not_found_attempts + 1)
            if decision.action == "dead_letter":
                return await self._dead(job, decision.reason, error)
            return await self._retry(job, Attempt("not_found", error, decision.delay))
        if isinstance(exc, CloposTransientError | CloposUnauthorized):
            # An API 401 that survived a fresh token is not a token expiry (the client
            # handles those): count it and back off, like any failure that may pass.
            decision = self._policy.on_failure(
                attempt=job.attempts + 1, age=now - job.first_received_at
            )
            if decision.action == "dead_letter":
                return await self._dead(job, decision.reason, error)
            return await self._retry(job, Attempt("retry", error, decision.delay))
        # CloposPermanentError, or any other CloposError: it will not get better by waiting.
        # With a status, Clopos refused the request; without one, its answer was unusable.
        return await self._dead(job, "rejected" if exc.status else "invalid_response", error)

    async def _retry(self, job: HydrationJob, attempt: Attempt) -> Attempt:
        """Put the job back for ``attempt`` (its outcome says what counts); the attempt
        stands only if the store took the write."""
        assert attempt.delay is not None
        written = await self._store.retry_hydration(
            job,
            retry_at=self._clock() + attempt.delay,
            error=attempt.detail,
            # Only a failure counts; a 429 or a pause is not one, a 404 has its own counter.
            count_attempt=attempt.outcome == "retry",
            not_found=attempt.outcome == "not_found",
        )
        return recorded(written, attempt)

    async def _dead(self, job: HydrationJob, reason: str, error: str) -> Attempt:
        now = self._clock()
        written = await self._store.dead_letter_hydration(job, reason=reason, error=error, now=now)
        return recorded(written, Attempt("dead_letter", f"{reason}: {error}", reason=reason))
