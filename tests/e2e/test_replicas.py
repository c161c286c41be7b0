"""Three real service processes on one PostgreSQL, against the sandbox Clopos.

One replica is killed with -9 in the middle of a burst of changes and stays dead. What
must hold for the fleet: every order's newest state reaches the HTTP sink and no sink
ever sees an order go backwards; Clopos answers no 429 although the replicas together
could send three times its tenant limit (they share one budget row, which also takes
what Clopos's RateLimit-* headers say remains); each replica
authenticates at most once per brand (the token outlives the test); and exactly one
replica polls the brand at any time, a survivor taking over from the dead one.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from app.sandbox import SandboxState, create_sandbox_app
from tests.e2e.receiver import Receiver
from tests.e2e.service import (
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    ServiceProcess,
    log_events,
    service_env,
    wait_until,
)
from tests.e2e.test_http_delivery import NEW, http_sink, never_backwards, rev
from tests.servers import ServerThread

TENANT_LIMIT = 150  # per minute, enforced by the sandbox and configured in the service
TENANT = "sandbox-integrator:sandbox"
OTHERS_LEFT = 20
ORDERS = list(range(1101, 1141))  # seeded orders (1001..1300)


def notify(client: httpx.Client, replica: ServiceProcess, order_id: int) -> None:
    response = client.post(
        f"{replica.url}/webhooks/clopos",
        headers={"X-Webhook-Token": WEBHOOK_SECRET},
        json={"event": "order.updated", "data": {"id": order_id}},
    )
    assert response.status_code == 202, response.text


def poll_status(client: httpx.Client, replica: ServiceProcess) -> dict[str, Any]:
    response = client.get(
        f"{replica.url}/admin/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 200, response.text
    poll: dict[str, Any] = response.json()["brands"]["sandbox"]["poll"]
    return poll


def test_three_replicas_share_queue_budget_and_poller_through_a_kill_9(
    tmp_path: Path, pg_url: str
) -> None:
    state = SandboxState(seed_orders=300, tenant_limit_per_minute=TENANT_LIMIT)
    state.latency_seconds = 0.05  # so work is in flight when a replica dies
    # Someone else spent most of the tenant's minute 50 s ago: for the first 10 s only
    # OTHERS_LEFT calls remain, which the replicas learn from RateLimit-Remaining (fed
    # back into the shared row) and must not overspend together.
    for _ in range(TENANT_LIMIT - OTHERS_LEFT):
        state.tenant_window.hit(TENANT, state.clock() - 50)
    with ServerThread(create_sandbox_app(state)) as clopos, Receiver({"/a": NEW}) as receiver:
        env = service_env(
            f"{clopos.url}/open-api",
            tmp_path / "unused.db",
            DATABASE_URL=pg_url,
            LEASE_SECONDS="5",
            POLL_INTERVAL_SECONDS="2",
            CLOPOS_RATE_LIMIT_PER_MINUTE=str(TENANT_LIMIT),
            SINKS=json.dumps([http_sink("A", receiver.url("/a"))]),
        )
        replicas = [ServiceProcess(env, tmp_path / f"replica{i}.log").start() for i in range(3)]
        try:
            run(state, receiver, replicas)
        finally:
            for replica in replicas:
                replica.stop()


def run(state: SandboxState, receiver: Receiver, replicas: list[ServiceProcess]) -> None:
    latest: dict[int, int] = {}
    started = time.monotonic()
    with httpx.Client(timeout=10) as client:
        # One poller for the brand among the three.
        assert wait_until(
            lambda: sum(poll_status(client, r)["leading"] for r in replicas) == 1, timeout=10
        )
        holders = {poll_status(client, r)["holder"] for r in replicas}
        assert len(holders) == 1, holders

        def change(order_id: int, revision: int, replica: ServiceProcess) -> None:
            latest[order_id] = revision
            state.update_order(order_id, e2e_rev=revision)
            notify(client, replica, order_id)

        for i, order_id in enumerate(ORDERS):  # spread over the three
            change(order_id, 1, replicas[i % 3])
        victim = next(r for r in replicas if poll_status(client, r)["leading"])
        victim.kill(signal.SIGKILL)  # the poller's holder, mid-burst, for good
        survivors = [r for r in replicas if r is not victim]
        for i, order_id in enumerate(ORDERS[::2]):  # a second change to half of them
            change(order_id, 2, survivors[i % 2])

        def all_latest() -> bool:
            got = {(r.json()["order_id"], rev(r)) for r in receiver.received("/a", accepted=True)}
            return all((order_id, revision) in got for order_id, revision in latest.items())

        assert wait_until(all_latest, timeout=75), "not every order's newest state arrived"
        elapsed = time.monotonic() - started

        # A survivor took the poller over from the dead holder; still exactly one, and
        # every survivor's /readyz names it.
        assert wait_until(
            lambda: sum(poll_status(client, r)["leading"] for r in survivors) == 1, timeout=10
        )
        holder = next(poll_status(client, r)["holder"] for r in survivors)
        assert holder not in holders, "the dead replica's lock was released"
        for replica in survivors:
            check = client.get(f"{replica.url}/readyz").json()["checks"]["poller:sandbox"]
            assert check["ok"], check
            assert holder in check["detail"], check

    accepted = receiver.received("/a", accepted=True)
    never_backwards([r for r in accepted if r.json()["order_id"] in latest])
    assert state.rate_limited() == 0, "Clopos answered 429: the replicas overspent"
    assert state.auth_calls() <= len(replicas), "more than one auth per replica and brand"
    lead_taken = [e for r in replicas for e in log_events(r.log_path, "poller.lead_taken")]
    assert len(lead_taken) == 2, "one holder at start, one takeover after the kill"
    print(
        f"\nreplicas=3 (1 killed) orders={len(latest)} deliveries={len(accepted)}"
        f" 429s={state.rate_limited()} auth_calls={state.auth_calls()}"
        f" clopos_calls={len(state.calls)} elapsed={elapsed:.1f}s"
    )
