"""The Clopos budget survives kill -9 and restart (issue 8, item 8).

Clopos counts a tenant's calls over a sliding 60 s window, whichever process made them.
A process that starts with an empty budget while its predecessor's last minute is still
being counted sends straight into a full window and gets 429s. Here the real service runs
a backlog against the sandbox, whose tier 3 allows 60 calls a minute (the service is left
at its default budget of 300: it learns the lower limit from ``RateLimit-Limit``, and that
too must survive a restart), and is killed with -9 and restarted several times while it
fetches. Clopos must answer no 429 at all.

It takes about 75 s: the window has to be full before a restart can overrun it, and at
60 calls a minute it fills in a minute, whatever the limit.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from app.sandbox import SandboxState, create_sandbox_app
from tests.e2e.service import WEBHOOK_SECRET, ServiceProcess, service_env
from tests.servers import ServerThread

TENANT_LIMIT = 60
ORDERS = range(1001, 1201)  # far more than the window lets through during the test
# Seconds after the backlog arrives when the running process is killed -9 and another
# started at once: early ones while the window fills, then several into a full window.
RESTARTS_AT = (20.0, 45.0, 61.0, 66.0, 71.0)
ORDER_PATH = "/open-api/v2/orders/"


def post_backlog(service: ServiceProcess) -> None:
    with httpx.Client(timeout=10) as client:
        for order_id in ORDERS:
            response = client.post(
                f"{service.url}/webhooks/clopos",
                headers={"X-Webhook-Token": WEBHOOK_SECRET},
                json={"data": {"id": order_id}},
            )
            assert response.status_code == 202, response.text


def test_no_429_across_a_kill_9_crash_loop_under_backlog(tmp_path: Path) -> None:
    state = SandboxState(seed_orders=300, tenant_limit_per_minute=TENANT_LIMIT)
    with ServerThread(create_sandbox_app(state)) as server:
        env = service_env(f"{server.url}/open-api", tmp_path / "hydrator.db")
        runs: list[ServiceProcess] = []

        def start() -> ServiceProcess:
            run = ServiceProcess(env, tmp_path / f"run{len(runs)}.log").start()
            runs.append(run)
            return run

        try:
            service = start()
            post_backlog(service)
            began = time.monotonic()
            for at in RESTARTS_AT:
                time.sleep(max(0.0, began + at - time.monotonic()))
                service.kill(signal.SIGKILL)
                service = start()
            time.sleep(3.0)  # the last process's first calls
        finally:
            for run in runs:
                run.stop()

        fetches = [call for call in state.calls if call.path.startswith(ORDER_PATH)]
        refused = [call for call in state.calls if call.status == 429]  # auth calls too
        after_first_restart = [call for call in fetches if call.time >= fetches[0].time + 15]
        print(
            f"{len(RESTARTS_AT)} kill -9 restarts, {len(fetches)} order fetches "
            f"({len(after_first_restart)} after the first restart), {len(refused)} x 429"
        )
        assert refused == [], [
            (round(call.time - fetches[0].time, 1), call.path) for call in refused
        ]
        # The restarted processes did fetch: the backlog went on at about the tenant's
        # pace, not stalled by an over-cautious budget.
        elapsed = RESTARTS_AT[-1] + 3.0
        assert len(fetches) >= 0.6 * TENANT_LIMIT * elapsed / 60, len(fetches)
