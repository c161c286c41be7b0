"""A circuit breaker for one sink: stop hammering a sink that keeps failing, and find out
within seconds when it is back.

States::

    closed ──(failure_threshold consecutive failures)──► open
    open ──(the probe delay elapsed, on the next allow())──► half_open (one trial: the probe)
    half_open ──trial succeeds──► closed
    half_open ──trial fails──► open (the next probe delay, twice as long)

Probes come on a growing schedule: the first ``first_probe_seconds`` (1 s) after opening,
then 2 s, 4 s ... after each failed probe, never more than ``cooldown_seconds`` (the cap).
A short outage costs seconds, not a whole cool-down; a long one costs one probe per cap.
Closing starts the schedule over.

Only the delivery worker decides what counts: a retryable failure is a failure; a
success, or a sink that answered with a permanent refusal, is a success.

Outcomes that arrive while the breaker is open come from calls admitted before it
opened; they do not close it early (a success) nor extend the delay (a failure), so
the schedule is predictable and exactly one trial decides.

A trial whose outcome is never recorded (its caller claimed nothing, or crashed)
would wedge the breaker half-open; after ``trial_timeout`` another trial is let
through. Pure state and an injectable clock: no I/O, no sleeping, one event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]
FIRST_PROBE_SECONDS = 1.0


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        cooldown_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        trial_timeout: float | None = None,
        first_probe_seconds: float = FIRST_PROBE_SECONDS,
    ) -> None:
        """``cooldown_seconds`` caps the wait between two probes; the first probe comes
        ``first_probe_seconds`` after opening (or at the cap, if that is shorter)."""
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown_seconds <= 0:
            raise ValueError("cooldown_seconds must be > 0")
        if first_probe_seconds <= 0:
            raise ValueError("first_probe_seconds must be > 0")
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.first_probe_seconds = min(first_probe_seconds, cooldown_seconds)
        # The wait before the next probe: doubles with each failed probe, up to the cap.
        self.probe_delay = self.first_probe_seconds
        self.trial_timeout = trial_timeout if trial_timeout is not None else cooldown_seconds
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_until: float | None = None
        self._trial_started: float | None = None

    @property
    def state(self) -> BreakerState:
        """The state as of the last call; open turns half_open on the next ``allow()``."""
        return self._state

    @property
    def opened_until(self) -> float | None:
        """When the next probe may go (on ``clock``'s scale) while open; None otherwise."""
        return self._opened_until if self._state == "open" else None

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until ``allow()`` may say yes again (0 when it would now)."""
        if self._state == "closed":
            return 0.0
        now = self._clock()
        if self._state == "open":
            return max(0.0, (self._opened_until or now) - now)
        started = self._trial_started if self._trial_started is not None else now
        return max(0.0, started + self.trial_timeout - now)

    def allow(self) -> bool:
        """May a call go out now? In half_open, True for one trial at a time."""
        if self._state == "closed":
            return True
        now = self._clock()
        if self._state == "open":
            if self._opened_until is not None and now < self._opened_until:
                return False
            self._state = "half_open"
            self._opened_until = None
            self._trial_started = now
            return True
        # half_open: the one trial is out; let another go only if that one got lost.
        if self._trial_started is not None and now - self._trial_started < self.trial_timeout:
            return False
        self._trial_started = now
        return True

    def record_success(self) -> None:
        if self._state == "open":
            return  # a call admitted before opening; the trial decides, not it
        self._close()

    def trial_unused(self) -> None:
        """The half-open trial found nothing to send: nothing says the sink is still
        broken, and staying half-open would keep it reported as broken forever (the
        failed work has gone to dead letters). Close; new failures re-open it."""
        if self._state == "half_open":
            self._close()

    def record_failure(self) -> None:
        self._failures += 1
        if self._state == "open":
            return  # a call admitted before opening; do not move the next probe
        if self._state == "half_open":
            # The probe failed: the sink is still down, wait twice as long (up to the cap).
            self.probe_delay = min(self.cooldown_seconds, self.probe_delay * 2)
            self._open()
        elif self._failures >= self.failure_threshold:
            self.probe_delay = self.first_probe_seconds
            self._open()

    def _open(self) -> None:
        self._state = "open"
        self._opened_until = self._clock() + self.probe_delay
        self._trial_started = None

    def _close(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._trial_started = None
        self.probe_delay = self.first_probe_seconds
