"""The circuit breaker, driven by a fake clock."""

from __future__ import annotations

import pytest

from app.sinks.breaker import CircuitBreaker
from tests.clock import FakeClock


def state(breaker: CircuitBreaker) -> str:
    """Read the state afresh (a helper, so type narrowing does not carry across calls)."""
    return breaker.state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def open_breaker(clock: FakeClock, threshold: int = 3, cooldown: float = 30.0) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold, cooldown, clock)
    for _ in range(threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert state(breaker) == "open"
    return breaker


def test_starts_closed_and_allows(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 30.0, clock)
    assert state(breaker) == "closed"
    assert breaker.opened_until is None
    assert breaker.consecutive_failures == 0
    assert all(breaker.allow() for _ in range(10))


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 30.0, clock)
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 2
    breaker.record_failure()
    assert state(breaker) == "open"
    assert breaker.opened_until == 1001.0  # the first probe, a second later
    assert not breaker.allow()


def test_a_success_resets_the_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 30.0, clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) == "closed"


def test_stays_open_until_the_first_probe_then_lets_one_trial(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(0.9)
    assert not breaker.allow()
    assert state(breaker) == "open"
    clock.advance(0.1)
    assert breaker.allow()  # the trial
    assert state(breaker) == "half_open"
    assert breaker.opened_until is None
    assert not breaker.allow()  # only one at a time
    assert not breaker.allow()


def test_successful_trial_closes(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(30)
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 0
    assert breaker.allow()
    assert breaker.allow()


def test_probes_come_on_a_growing_schedule_up_to_the_cap(clock: FakeClock) -> None:
    """1 s, 2 s, 4 s ... between probes while each one fails, never more than the cap."""
    breaker = open_breaker(clock, cooldown=30.0)
    waits = []
    for _ in range(7):
        waits.append(breaker.retry_in())
        clock.advance(breaker.retry_in() - 0.01)
        assert not breaker.allow(), "no probe before its time"
        clock.advance(0.01)
        assert breaker.allow()  # the probe
        assert state(breaker) == "half_open"
        breaker.record_failure()  # the sink is still down
        assert state(breaker) == "open"
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_successful_probe_closes_and_starts_the_schedule_over(clock: FakeClock) -> None:
    breaker = open_breaker(clock, cooldown=30.0)
    for _ in range(3):  # probes after 1, 2 and 4 s fail
        clock.advance(breaker.retry_in())
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.retry_in() == 8.0
    clock.advance(8.0)
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) == "closed"
    for _ in range(3):  # the next outage opens it again
        breaker.record_failure()
    assert state(breaker) == "open"
    assert breaker.retry_in() == 1.0, "a new outage starts at the first probe again"


def test_the_first_probe_never_waits_longer_than_the_cap(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 0.5, clock)
    breaker.record_failure()
    assert breaker.retry_in() == 0.5
    clock.advance(0.5)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.retry_in() == 0.5


def test_late_outcomes_while_open_change_nothing(clock: FakeClock) -> None:
    # Calls admitted before the breaker opened finish while it is open.
    breaker = open_breaker(clock)
    until = breaker.opened_until
    clock.advance(0.5)
    breaker.record_success()
    assert state(breaker) == "open"
    breaker.record_failure()
    assert state(breaker) == "open"
    assert breaker.opened_until == until
    assert not breaker.allow()


def test_lost_trial_does_not_wedge_half_open(clock: FakeClock) -> None:
    breaker = open_breaker(clock, cooldown=30.0)
    clock.advance(1)
    assert breaker.allow()  # a trial whose outcome is never recorded
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()  # a new trial after trial_timeout (default: the cap)
    assert not breaker.allow()


def test_threshold_of_one(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 5.0, clock)
    breaker.record_failure()
    assert state(breaker) == "open"
    clock.advance(1)
    assert breaker.allow()


@pytest.mark.parametrize(
    ("threshold", "cooldown", "first_probe"), [(0, 1.0, 1.0), (1, 0.0, 1.0), (1, 1.0, 0.0)]
)
def test_refuses_nonsense(threshold: int, cooldown: float, first_probe: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(threshold, cooldown, first_probe_seconds=first_probe)


def test_retry_in_tells_how_long_until_a_trial() -> None:
    now = [100.0]
    breaker = CircuitBreaker(1, 30.0, clock=lambda: now[0])
    assert breaker.retry_in() == 0.0
    breaker.record_failure()
    assert breaker.state == "open"
    now[0] = 100.25
    assert breaker.retry_in() == 0.75
    now[0] = 101.0
    assert breaker.allow()
    assert breaker.state == "half_open"
    assert 0 < breaker.retry_in() <= 30.0  # the trial is out; another only after its timeout


def test_an_unused_trial_closes_the_breaker() -> None:
    now = [0.0]
    breaker = CircuitBreaker(1, 5.0, clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 1.0
    assert breaker.allow()
    assert breaker.state == "half_open"
    breaker.trial_unused()  # the loop claimed nothing to try
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0
    breaker.record_failure()  # a new failure opens it again
    assert breaker.state == "open"
    breaker.trial_unused()  # no effect unless half-open
    assert breaker.state == "open"
