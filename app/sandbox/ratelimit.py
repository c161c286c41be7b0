"""Sliding-window counters for the sandbox's three Clopos rate-limit tiers.

Each key (a client IP, or an ``integrator_id:brand`` pair) keeps a deque of the times its
counted calls arrived; a call is allowed while fewer than ``limit`` of them fall in the last
``WINDOW_SECONDS``. Refused calls are not counted, so a client that waits ``RateLimit-Reset``
seconds really does get a slot back. Not thread-safe by itself: the state's lock guards it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Quota:
    """One tier's view for one key: what the ``RateLimit-*`` headers report."""

    limit: int
    remaining: int
    reset: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


class SlidingWindow:
    """Per-key call times within the last minute, with a fixed limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._calls: dict[str, deque[float]] = {}

    def _live(self, key: str, now: float) -> deque[float]:
        calls = self._calls.setdefault(key, deque())
        cutoff = now - WINDOW_SECONDS
        while calls and calls[0] <= cutoff:
            calls.popleft()
        return calls

    def full(self, key: str, now: float) -> bool:
        """True when one more call for ``key`` would exceed the limit."""
        return len(self._live(key, now)) >= self.limit

    def hit(self, key: str, now: float) -> None:
        """Count one call for ``key`` at ``now``."""
        self._live(key, now).append(now)

    def quota(self, key: str, now: float) -> Quota:
        """Limit, remaining and seconds until the oldest counted call leaves the window."""
        calls = self._live(key, now)
        remaining = max(0, self.limit - len(calls))
        if not calls:
            return Quota(self.limit, remaining, 0)
        # Integer seconds, rounded up so waiting that long is always enough; never 0 while
        # something is still counted (a client must not read "0" as "go now" when limited).
        reset = max(1, math.ceil(calls[0] + WINDOW_SECONDS - now))
        return Quota(self.limit, remaining, reset)

    def clear(self) -> None:
        self._calls.clear()
