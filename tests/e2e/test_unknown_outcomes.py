"""Never wrong under ambiguity: unknown delivery outcomes, clocks that lie (issue 8).

Item 1, never backwards when a delivery's outcome is unknown:
A receiver that stores every request but answers after 1.6 s, behind an http sink that
gives up after 1 s: every delivery "fails" although the receiver got it. Orders change
while their deliveries are in flight. Whatever the receiver saw of one order, in
arrival order, must never go back to an older state: once a newer version was
attempted, an older one is superseded, never sent again.

Item 3: orders are compared by content, not by clock, so a stamp in the future freezes
nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from tests.e2e.conftest import Clopos
from tests.e2e.receiver import Receiver
from tests.e2e.service import ADMIN_TOKEN, ServiceProcess, log_events, logged, wait_until
from tests.e2e.test_http_delivery import NEW, http_sink, notify, rev

ORDERS = (1101, 1102, 1103, 1104)
REVISIONS = 3


def test_a_timed_out_older_version_is_never_sent_after_a_newer_one(
    make_service: Any, clopos: Clopos
) -> None:
    with Receiver({"/s": NEW}) as rec:
        rec.answer("/s", 200, delay=1.6)
        sink = http_sink("s", rec.url("/s"), timeout_seconds=1, breaker_failures=1000)
        service: ServiceProcess = make_service(SINKS=json.dumps([sink]))
        with httpx.Client(timeout=10) as client:
            # Each new state is noticed while the previous one is still on the wire.
            for revision in range(1, REVISIONS + 1):
                for order_id in ORDERS:
                    clopos.state.update_order(order_id, e2e_rev=revision)
                    notify(client, service, order_id)
                time.sleep(0.7)
            time.sleep(2.0)  # retries of timed-out versions come due meanwhile
            rec.answer("/s", 200)  # the receiver recovers: everything settles

            def settled() -> bool:
                done = {
                    r.json()["order_id"]
                    for r in rec.received("/s", accepted=True)
                    if rev(r) == REVISIONS
                }
                return done == set(ORDERS)

            assert wait_until(settled, timeout=30), service.tail()
            time.sleep(1.5)  # a late retry of an older version would arrive now

    seen: dict[int, list[int]] = {}
    for item in rec.received("/s"):  # every request, answered in time or not
        seen.setdefault(item.json()["order_id"], []).append(rev(item))
    assert set(seen) == set(ORDERS)
    for order_id, revs in seen.items():
        assert revs == sorted(revs), f"order {order_id} went backwards: {revs}"


def test_an_order_stamped_in_the_future_is_not_frozen(make_service: Any, clopos: Clopos) -> None:
    """Issue 8 item 3: a state whose updated_at lies a day ahead must not hide the real
    changes after it (honest, earlier stamps), nor block an operator's forced hydration."""
    order_id = 1201
    service: ServiceProcess = make_service()
    ahead = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86_400))
    clopos.state.update_order(order_id, e2e_rev=1, updated_at=ahead)
    with httpx.Client(timeout=10) as client:
        notify(client, service, order_id)
        assert wait_until(lambda: logged(service, order_id) == 1, timeout=15), service.tail()

        clopos.state.update_order(order_id, e2e_rev=2)  # a real change, stamped now
        notify(client, service, order_id)
        assert wait_until(lambda: logged(service, order_id) == 2, timeout=15), service.tail()

        forced = client.post(
            f"{service.url}/admin/orders/{order_id}/hydrate",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert forced.status_code == 202, forced.text
        assert wait_until(lambda: logged(service, order_id) == 3, timeout=15), service.tail()

    revs = [
        e["body"]["order"]["e2e_rev"]
        for e in log_events(service.log_path, "sink.log.order")
        if e["body"]["order_id"] == order_id
    ]
    assert revs == [1, 2, 2]
    outcomes = [
        e["outcome"]
        for e in log_events(service.log_path, "hydration.finished")
        if e.get("order_id") == order_id
    ]
    assert "stale" not in outcomes, outcomes
