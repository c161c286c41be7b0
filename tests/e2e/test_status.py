"""One status model: /readyz, /metrics and /admin/status describe the same moment.

The store is made unreadable for real: another connection holds SQLite's write lock
(as a stray `sqlite3` shell or a second process would), so every read the service makes
waits out the busy timeout and fails. Nothing the service reports may then be a figure
from an earlier read presented as current.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.service import ServiceProcess, notify, wait_until
from tests.e2e.test_operations import ADMIN, readyz, scrape, value


@contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Hold SQLite's write lock on ``db`` from another connection."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def admin_status(service: ServiceProcess) -> dict[str, Any]:
    response = httpx.get(f"{service.url}/admin/status", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_an_unreadable_store_is_reported_as_such_never_as_the_last_figures(
    make_service: Any, tmp_path: Path
) -> None:
    service: ServiceProcess = make_service()
    notify(service, 1001)
    p = "clopos_hydrator_"
    assert wait_until(lambda: readyz(service)[0] == 200, timeout=15), service.tail()
    before = scrape(service)
    assert value(before, f"{p}queue_depth", stage="hydration", state="pending") is not None

    with write_lock(tmp_path / "hydrator.db"):
        # Answered promptly: a probe's own timeout is short, the store's busy wait is not.
        started = time.monotonic()
        response = httpx.get(f"{service.url}/readyz", timeout=5)
        assert time.monotonic() - started < 4
        assert response.status_code == 503
        checks = response.json()["checks"]
        assert not checks["store"]["ok"]
        # The backlog cannot be judged without reading it: not "ok" on an old reading.
        assert not checks["backlog"]["ok"], checks["backlog"]
        assert "store" in checks["backlog"]["detail"]

        families = scrape(service)
        # No queue figures from an earlier read passed off as current; the store's
        # state and readiness are metrics of their own.
        assert value(families, f"{p}queue_depth") is None
        assert value(families, f"{p}queue_oldest_age_seconds") is None
        assert value(families, f"{p}store_up") == 0
        assert value(families, f"{p}ready") == 0
        assert value(families, f"{p}readiness_check_ok", check="store") == 0

        status = admin_status(service)
        assert status["store_error"]
        assert status["queues"] == {}
        assert status["ready"] is False

    assert wait_until(lambda: readyz(service)[0] == 200, timeout=15), readyz(service)
    families = scrape(service)
    assert value(families, f"{p}store_up") == 1
    assert value(families, f"{p}ready") == 1
    assert value(families, f"{p}queue_depth", stage="hydration", state="pending") == 0
    status = admin_status(service)
    assert status["store_error"] is None
    assert status["ready"] is True
    assert status["queues"]["hydration"]["pending"] == 0
