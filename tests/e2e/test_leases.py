"""Leases against the real service process (issue 8, item 4).

A fetch slower than LEASE_SECONDS keeps its lease (running work renews it) and is made
once; and a job that kills the process every time it runs ends in a dead letter instead
of being retried forever, because attempts count when work is claimed.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.e2e.conftest import Clopos
from tests.e2e.service import (
    ADMIN_TOKEN,
    ServiceProcess,
    log_events,
    logged,
    notify,
    wait_until,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_a_fetch_longer_than_its_lease_is_made_once_and_delivered(
    make_service: Any, clopos: Clopos
) -> None:
    """LEASE_SECONDS=5 and 6 s of Clopos latency: once, 5 fetches in 24 s, all lost_lease."""
    service: ServiceProcess = make_service(LEASE_SECONDS="5")
    notify(service, 1001)  # a quick one first: the token is fetched without the latency
    assert wait_until(lambda: logged(service, 1001) == 1, timeout=15), service.tail()

    order_path = "/open-api/v2/orders/1002"
    clopos.state.latency_seconds = 6.0
    notify(service, 1002)
    assert wait_until(lambda: logged(service, 1002) == 1, timeout=20), service.tail()
    clopos.state.latency_seconds = 0.0

    assert clopos.state.count(order_path) == 1, "one notice, one fetch"
    outcomes = [
        e["outcome"]
        for e in log_events(service.log_path, "hydration.finished")
        if e.get("order_id") == 1002
    ]
    assert outcomes == ["stored"]
    assert not log_events(service.log_path, "worker.lease_lost")


def test_a_job_that_kills_the_process_every_time_ends_in_a_dead_letter(
    make_service: Any, clopos: Clopos
) -> None:
    """Each try of the job dies with its process (kill -9 mid-fetch). With
    MAX_LOST_LEASES=2, the third start does not try it again: it writes a dead letter."""
    clopos.state.latency_seconds = 30.0  # every call hangs: the process dies mid-fetch
    env = {"MAX_LOST_LEASES": "2"}
    for run in range(2):
        before = clopos.state.count()  # a restart claims the job before it answers /healthz
        service: ServiceProcess = make_service(f"run{run}.log", **env)
        if run == 0:
            notify(service, 1003)
        # The restarted process claims the job again at once (its lease was voided).
        assert wait_until(lambda b=before: clopos.state.count() > b, timeout=15), service.tail()
        service.kill()

    last: ServiceProcess = make_service("run2.log", **env)
    with httpx.Client(timeout=10) as client:

        def letters() -> list[dict[str, Any]]:
            page = client.get(f"{last.url}/admin/dead-letters", headers=ADMIN).json()
            items: list[dict[str, Any]] = page["items"]
            return items

        assert wait_until(lambda: len(letters()) == 1, timeout=15), last.tail()
        (letter,) = letters()
    assert (letter["kind"], letter["reason"], letter["order_id"]) == (
        "hydration",
        "lease_lost",
        1003,
    )
    assert letter["attempts"] == 2
    (event,) = log_events(last.log_path, "store.lease_lost_dead_letter")
    assert event["order_id"] == 1003
    calls = clopos.state.count()
    time.sleep(1.0)
    assert clopos.state.count() == calls, "the job is not tried a third time"
