"""Graceful shutdown (SIGTERM) of the real service process, and what a restart picks up."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Clopos
from tests.e2e.service import ServiceProcess, log_events, wait_until
from tests.e2e.test_pipeline import delivered_ids, post_many


def test_sigterm_finishes_in_flight_work_and_exits_cleanly(
    make_service: Any, clopos: Clopos
) -> None:
    clopos.state.latency_seconds = 0.5  # every fetch is slow: work is in flight at SIGTERM
    service: ServiceProcess = make_service(HYDRATION_CONCURRENCY="4", SHUTDOWN_GRACE_SECONDS="10")
    order_ids = list(range(1001, 1021))
    statuses = asyncio.run(post_many(service.url, order_ids))
    assert set(statuses.values()) == {202}
    assert wait_until(lambda: clopos.state.count("/open-api/v2/orders/") >= 2, timeout=10)

    started = time.monotonic()
    code = service.kill(signal.SIGTERM, timeout=30)
    took = time.monotonic() - started
    # uvicorn re-raises the captured SIGTERM after a clean shutdown: exit status 143.
    assert code in (0, -signal.SIGTERM), service.tail()
    assert took < 10 + 5, took  # within the grace period plus the connection drain
    assert log_events(service.log_path, "service.stopped"), service.tail()
    # Every fetch that was in flight at SIGTERM finished (not cut off): none was released.
    finished = log_events(service.log_path, "hydration.finished")
    assert finished
    assert all(e["outcome"] == "stored" for e in finished)

    # Nothing accepted is lost: a restart delivers the rest.
    clopos.state.latency_seconds = 0.0
    again: ServiceProcess = make_service("restart.log")
    logs = [service.log_path, again.log_path]
    assert wait_until(lambda: set(order_ids) <= delivered_ids(logs), timeout=30), again.tail()


def test_sigterm_with_a_hung_upstream_releases_work_within_the_grace_period(
    make_service: Any, clopos: Clopos, tmp_path: Path
) -> None:
    clopos.state.hang_seconds = 60
    clopos.state.inject("hang", count=1)
    service: ServiceProcess = make_service(
        SHUTDOWN_GRACE_SECONDS="1", CLOPOS_TIMEOUT_SECONDS="30", LEASE_SECONDS="600"
    )
    assert asyncio.run(post_many(service.url, [1001])) == {1001: 202}
    assert wait_until(lambda: clopos.state.count("/open-api/v2/orders/1001") == 1, timeout=10)

    started = time.monotonic()
    assert service.kill(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 1 + 5 + 3  # grace, drain, and a little slack
    assert not log_events(service.log_path, "sink.log.order")
    # Cut off after the grace period, the job was given back to the store (not left
    # leased for LEASE_SECONDS), with its order in the log line's context.
    (released,) = log_events(service.log_path, "worker.released")
    assert (released["worker"], released["order_id"]) == ("hydration", 1001)

    again: ServiceProcess = make_service("restart.log")
    assert wait_until(lambda: 1001 in delivered_ids([again.log_path]), timeout=15), again.tail()
