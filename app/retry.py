"""Retry policy as a pure value: given what happened, when (if ever) to try again.

Two layers are kept apart (style.md): the Clopos client makes no hidden retries of
its own beyond one token refresh, and the durable retries between attempts are
decided here and stored as ``retry_at``. Nothing here sleeps or does I/O.

Backoff is exponential with *full jitter* (a uniform draw in ``[0, cap]``), so a
burst of failures does not come back as a burst. Every retry sequence is bounded
in time (``give_up_after``) as well as by its cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Action = Literal["retry", "dead_letter"]


@dataclass(frozen=True)
class RetryDecision:
    action: Action
    delay: float = 0.0  # seconds from now, when action == "retry"
    reason: str = ""  # dead-letter reason when action == "dead_letter"


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 2.0
    cap: float = 600.0
    give_up_after: float = 86_400.0
    not_found_attempts: int = 5
    not_found_base: float = 30.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter delay before retry number ``attempt`` (1-based)."""
        ceiling = min(self.cap, self.base * (2 ** min(max(attempt - 1, 0), 30)))
        draw = (rng or random).uniform(0, ceiling)
        # Never hot-loop: at least a tenth of the base.
        return max(draw, self.base / 10)

    def on_failure(
        self,
        *,
        attempt: int,
        age: float,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """A retryable failure (transient upstream, sink 5xx...).

        ``attempt`` counts this failure; ``age`` is how long the work has existed.
        A server's ``retry_after`` is honoured as a floor, still within the cap.
        """
        delay = self.backoff(attempt, rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.cap, 3600.0)))
        if age + delay > self.give_up_after:
            return RetryDecision("dead_letter", reason="gave_up")
        return RetryDecision("retry", delay)

    def on_not_found(
        self, *, not_found_attempt: int, rng: random.Random | None = None
    ) -> RetryDecision:
        """A 404: the order may not be readable yet, so retry a few times over minutes."""
        if not_found_attempt >= self.not_found_attempts:
            return RetryDecision("dead_letter", reason="not_found")
        ceiling = self.not_found_base * (2 ** (not_found_attempt - 1))
        # Half fixed, half jitter: spreads retries but keeps the few-minutes window.
        delay = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
        return RetryDecision("retry", delay)
