"""The real service process on PostgreSQL: a kill -9 mid-burst loses nothing.

On PostgreSQL a restarted process does not void leases (other replicas may hold them):
the work the dead process held is recovered when its lease expires by the database's
clock, so this test runs with the shortest lease the settings allow.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tests.e2e.conftest import Clopos
from tests.e2e.service import ServiceProcess, log_events, service_env, wait_until
from tests.e2e.test_pipeline import delivered, delivered_ids, post_many


def test_kill_9_mid_burst_on_postgresql_loses_nothing(
    clopos: Clopos, tmp_path: Path, pg_url: str
) -> None:
    clopos.state.latency_seconds = 0.05  # so part of the burst is still queued at the kill
    env = service_env(clopos.url, tmp_path / "unused.db", DATABASE_URL=pg_url, LEASE_SECONDS="5")
    first = ServiceProcess(env, tmp_path / "run1.log").start()
    second: ServiceProcess | None = None
    try:
        order_ids = list(range(1001, 1121))

        async def burst_then_kill() -> dict[int, int]:
            task = asyncio.create_task(post_many(first.url, order_ids, concurrency=8))
            while len(log_events(first.log_path, "webhook.accepted")) < 60 and not task.done():
                await asyncio.sleep(0.01)
            first.kill(signal.SIGKILL)
            return await task

        statuses = asyncio.run(burst_then_kill())
        acked = {order_id for order_id, status in statuses.items() if status == 202}
        assert len(acked) >= 60
        assert all(status in (202, 0) for status in statuses.values()), statuses
        assert acked - delivered_ids([first.log_path]), "the kill came too late to test anything"

        second = ServiceProcess(env, tmp_path / "run2.log").start()
        logs = [first.log_path, second.log_path]
        assert wait_until(lambda: acked <= delivered_ids(logs), timeout=60), (
            f"lost after kill -9: {sorted(acked - delivered_ids(logs))[:20]}"
        )
        assert all("receipt" in body["order"] for body in delivered(logs))
        assert clopos.state.rate_limited() == 0
        assert not (tmp_path / "unused.db").exists(), "the store was PostgreSQL, not SQLite"
    finally:
        first.stop()
        if second is not None:
            second.stop()
