"""The sink port: where hydrated orders go.

A sink delivers one snapshot body and either returns (success) or raises
:class:`~app.errors.SinkRetryableError` / :class:`~app.errors.SinkPermanentError`.
Queueing, retries, ordering and the circuit breaker belong to the delivery worker
(``app.delivery``), not to sinks, so a sink is only the I/O.
"""

from __future__ import annotations

from typing import Protocol

from app.store.base import Delivery


class Sink(Protocol):
    name: str
    kind: str  # "http" or "log"
    concurrency: int
    timeout_seconds: float  # the longest one delivery may take (leases are sized on it)

    async def deliver(self, delivery: Delivery) -> None:
        """Send ``delivery.body``; raise a SinkError subclass on failure."""

    async def aclose(self) -> None: ...
