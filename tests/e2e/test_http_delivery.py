"""The http sink, end to end: the real service process delivering to real receivers.

Every delivery is verified by the receiver with the reference ``standardwebhooks``
package (tests/e2e/receiver.py), never with our own signing code. What is checked:
a sink that is down (circuit breaker open, /readyz and /metrics saying so) gets every
order's latest state once it is back, while a healthy sink keeps its latency; secret
rotation; bodies valid against app/schemas/order_hydrated.json; 4xx dead letters and
their replay; ``Retry-After``; and the same order state always carrying the same
``webhook-id``, never an older state after a newer one.
"""

from __future__ import annotations

import base64
import json
import re
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from tests.e2e.conftest import Clopos
from tests.e2e.receiver import Received, Receiver, Reply
from tests.e2e.service import ADMIN_TOKEN, WEBHOOK_SECRET, ServiceProcess, log_events, wait_until

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "app" / "schemas" / "order_hydrated.json"
# Secrets made here, not by app.signing: the receiver side must not depend on our code.
OLD = "whsec_" + base64.b64encode(b"old-secret-of-the-e2e-receiver!!").decode()
NEW = "whsec_" + base64.b64encode(b"new-secret-of-the-e2e-receiver!!").decode()
NOTIFY_HEADERS = {"X-Webhook-Token": WEBHOOK_SECRET}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
METRIC = "clopos_hydrator_"


# --- helpers -------------------------------------------------------------------------


def http_sink(name: str, url: str, secret: str | list[str] = NEW, **options: Any) -> dict[str, Any]:
    return {"type": "http", "name": name, "url": url, "secret": secret, **options}


def notify(client: httpx.Client, service: ServiceProcess, order_id: int) -> int:
    """Post one "order changed" notification; return its notification id."""
    response = client.post(
        f"{service.url}/webhooks/clopos",
        headers=NOTIFY_HEADERS,
        json={"event": "order.updated", "data": {"id": order_id}},
    )
    assert response.status_code == 202, response.text
    notification_id: int = response.json()["notification_id"]
    return notification_id


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text, matched on its full label set."""
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != METRIC + name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


def circuit_open(client: httpx.Client, service: ServiceProcess, sink: str) -> float | None:
    text = client.get(f"{service.url}/metrics").text
    return metric(text, "sink_circuit_open", sink=sink)


def readiness(client: httpx.Client, service: ServiceProcess) -> tuple[int, dict[str, Any]]:
    response = client.get(f"{service.url}/readyz")
    checks: dict[str, Any] = response.json()["checks"]
    return response.status_code, checks


def rev(received: Received) -> int:
    """The test's revision counter of the order state a delivery carried (0: untouched)."""
    value: int = received.json()["order"].get("e2e_rev", 0)
    return value


def never_backwards(received: list[Received]) -> dict[int, list[int]]:
    """Per order, the revisions accepted in arrival order; assert none goes back."""
    by_order: dict[int, list[int]] = {}
    for item in received:
        by_order.setdefault(item.json()["order_id"], []).append(rev(item))
    for order_id, revs in by_order.items():
        assert revs == sorted(revs), f"order {order_id} went backwards: {revs}"
    return by_order


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def _is_rfc3339(value: object) -> bool:
    """jsonschema checks date-time only with an optional extra installed; check it here."""
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        return False
    datetime.fromisoformat(value)
    return True


def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time", raises=ValueError)(_is_rfc3339)
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


# --- 1. a sink down, then back; the other sink unaffected ------------------------------


def test_down_sink_gets_every_latest_state_after_recovery_and_never_slows_the_other(
    make_service: Any, clopos: Clopos
) -> None:
    with Receiver({"/a": NEW}) as rec_a, Receiver({"/b": NEW}) as rec_b:
        sinks = [
            http_sink(
                "A",
                rec_a.url("/a"),
                breaker_failures=2,
                breaker_cooldown_seconds=1,
                timeout_seconds=2,
            ),
            http_sink("B", rec_b.url("/b")),
        ]
        service: ServiceProcess = make_service(SINKS=json.dumps(sinks))
        latest: dict[int, int] = {}  # order id -> the revision its latest state carries
        sent_at: dict[int, float] = {}  # notification id -> when it was sent
        counter = iter(range(1, 1000))

        def change_and_notify(client: httpx.Client, order_id: int) -> int:
            latest[order_id] = next(counter)
            clopos.state.update_order(order_id, e2e_rev=latest[order_id])
            started = time.monotonic()
            notification_id = notify(client, service, order_id)
            sent_at[notification_id] = started
            return notification_id

        def has_latest(received: list[Received], orders: set[int], after: float = 0.0) -> bool:
            got = {(r.json()["order_id"], rev(r)) for r in received if r.at >= after}
            return all((order_id, latest[order_id]) in got for order_id in orders)

        def b_latencies(notification_ids: list[int]) -> list[float]:
            """Sent -> first received by B, for each notification (all must have arrived)."""
            first_seen: dict[int, float] = {}
            for item in rec_b.received("/b", accepted=True):
                for nid in item.json()["notification_ids"]:
                    first_seen.setdefault(nid, item.at)
            assert set(notification_ids) <= set(first_seen), "B missed notifications"
            return [first_seen[nid] - sent_at[nid] for nid in notification_ids]

        with httpx.Client(timeout=10) as client:
            # Baseline: both sinks healthy. 4 notifications a second stays under the
            # Clopos budget (300/min), so the budget adds no queueing of its own.
            baseline_orders = list(range(1001, 1009))
            baseline = []
            for order_id in baseline_orders:
                baseline.append(change_and_notify(client, order_id))
                time.sleep(0.25)
            for rec, path in ((rec_a, "/a"), (rec_b, "/b")):
                assert wait_until(
                    lambda r=rec, p=path: has_latest(
                        r.received(p, accepted=True), set(baseline_orders)
                    ),
                    timeout=15,
                ), service.tail()
            status, checks = readiness(client, service)
            assert status == 200, checks
            assert checks["sink:A"]["ok"], checks
            assert circuit_open(client, service, "A") == 0

            # Outage of A: new orders, new states of orders A already has, and second
            # changes of orders whose first change A never got.
            rec_a.answer("/a", 503)
            outage_started = time.monotonic()
            outage_orders = [*range(1009, 1017), *range(1001, 1005), *range(1009, 1013)]
            outage = []
            seen_breaker_open: list[tuple[int, dict[str, Any], float | None]] = []
            b_ready_throughout = True
            for order_id in outage_orders:
                outage.append(change_and_notify(client, order_id))
                status, checks = readiness(client, service)
                b_ready_throughout &= bool(checks["sink:B"]["ok"])
                if not checks["sink:A"]["ok"]:
                    seen_breaker_open.append((status, checks, circuit_open(client, service, "A")))
                time.sleep(0.25)
            outage_seconds = time.monotonic() - outage_started
            assert wait_until(
                lambda: has_latest(rec_b.received("/b", accepted=True), set(latest)), timeout=15
            ), service.tail()
            # Still down: A was paused by its breaker, not hammered by every retry.
            attempts_during_outage = len(rec_a.received("/a")) - len(
                rec_a.received("/a", accepted=True)
            )

            # Recovery.
            rec_a.answer("/a", 200)
            recovered_at = time.monotonic()
            outage_changed = set(outage_orders)
            assert wait_until(
                lambda: has_latest(
                    rec_a.received("/a", accepted=True), outage_changed, after=recovered_at
                ),
                timeout=20,
            ), service.tail()
            ready_again = wait_until(lambda: readiness(client, service)[0] == 200, timeout=10)
            assert ready_again, readiness(client, service)
            final_status, final_checks = readiness(client, service)
            closed_metric = circuit_open(client, service, "A")

    # While the breaker was open, /readyz named sink A and why, and the gauge said 1.
    assert seen_breaker_open, "the breaker never opened during the outage"
    for seen_status, seen_checks, gauge in seen_breaker_open:
        assert seen_status == 503
        assert "circuit" in seen_checks["sink:A"]["detail"], seen_checks["sink:A"]
        assert gauge == 1, gauge
    assert b_ready_throughout
    # Recovered: ready again, gauge back to 0.
    assert final_status == 200, final_checks
    assert final_checks["sink:A"]["ok"], final_checks
    assert final_checks["sink:A"]["detail"] == "circuit closed"
    assert closed_metric == 0

    assert attempts_during_outage >= 2
    assert attempts_during_outage <= 4 + 2 * outage_seconds, attempts_during_outage

    # Every latest state reached A after it came back, and nothing went backwards.
    a_received = rec_a.received("/a", accepted=True)
    a_revs = never_backwards(a_received)
    never_backwards(rec_b.received("/b", accepted=True))
    assert {order_id: revs[-1] for order_id, revs in a_revs.items()} == latest
    assert all(r.verified for r in rec_a.received("/a") + rec_b.received("/b"))

    # B's latency during A's outage stayed at its normal level.
    before = b_latencies(baseline)
    during = b_latencies(outage)
    assert p95(during) < 1.0, (before, during)
    assert p95(during) < 3 * p95(before) + 0.3, (before, during)
    assert max(during) < 2.0, during


# --- 2. signatures, secret rotation, schema ------------------------------------------


def test_every_delivery_verifies_with_either_secret_during_a_rotation(
    make_service: Any, clopos: Clopos
) -> None:
    with Receiver({"/new": NEW, "/old": OLD, "/control": OLD}) as rec:
        sinks = [
            http_sink("rot_new", rec.url("/new"), secret=[NEW, OLD]),
            http_sink("rot_old", rec.url("/old"), secret=[NEW, OLD]),
            # Control: a sink that signs with the new secret only is refused by a receiver
            # that knows only the old one, so the verifier really tells them apart.
            http_sink("new_only", rec.url("/control"), secret=NEW),
        ]
        service: ServiceProcess = make_service(SINKS=json.dumps(sinks))
        order_ids = list(range(1001, 1007))  # 1002 has no receipt yet (receipt: null)
        with httpx.Client(timeout=10) as client:
            for order_id in order_ids:
                notify(client, service, order_id)
        assert wait_until(
            lambda: all(len(rec.received(p)) >= len(order_ids) for p in ("/new", "/old")),
            timeout=15,
        ), service.tail()
        assert wait_until(lambda: len(rec.received("/control")) >= len(order_ids), timeout=10)
        time.sleep(0.3)  # anything extra (a duplicate) would have arrived by now

    check = schema_validator()
    for path in ("/new", "/old"):
        received = rec.received(path)
        assert len(received) == len(order_ids)
        assert all(r.verified for r in received), [r.headers for r in received if not r.verified]
        assert sorted(r.json()["order_id"] for r in received) == order_ids
        for item in received:
            body = item.json()
            check.validate(body)
            assert item.webhook_id == body["id"]
            assert item.headers["content-type"] == "application/json"
            assert len(item.headers["webhook-signature"].split(" ")) == 2  # one per secret
            assert body["order"]["x_extra"] == {"kept": True}  # unknown fields pass through
            assert "receipt" in body["order"]
    # The same order state is the same message on both sinks.
    ids_new = {r.json()["order_id"]: r.webhook_id for r in rec.received("/new")}
    ids_old = {r.json()["order_id"]: r.webhook_id for r in rec.received("/old")}
    assert ids_new == ids_old
    assert not any(r.verified for r in rec.received("/control"))


# --- 3. 4xx dead letter, and its replay ------------------------------------------------


def test_410_dead_letters_and_replay_carries_the_same_webhook_id(
    make_service: Any, clopos: Clopos
) -> None:
    with Receiver({"/gone": NEW}) as rec:
        rec.answer("/gone", 410)
        sinks = [http_sink("gone", rec.url("/gone"))]
        service: ServiceProcess = make_service(SINKS=json.dumps(sinks))
        letters_url = f"{service.url}/admin/dead-letters"
        with httpx.Client(timeout=10) as client:
            notify(client, service, 1003)

            def letters(**params: str) -> dict[str, Any]:
                response = client.get(letters_url, headers=ADMIN_HEADERS, params=params)
                assert response.status_code == 200, response.text
                page: dict[str, Any] = response.json()
                return page

            assert wait_until(lambda: letters()["total"] == 1, timeout=15), service.tail()
            time.sleep(1.0)  # longer than any retry backoff here: a 410 is not retried
            first_attempts = rec.received("/gone")
            assert len(first_attempts) == 1
            first = first_attempts[0]
            assert first.verified

            assert client.get(letters_url).status_code == 401
            page = letters(sink="gone", reason="http_410")
            assert page["total"] == 1
            letter = page["items"][0]
            assert letter["kind"] == "delivery"
            assert letter["reason"] == "http_410"
            assert letter["sink"] == "gone"
            assert letter["order_id"] == 1003
            assert letter["snapshot_key"] == first.webhook_id
            assert "410" in letter["last_error"]
            assert letters(reason="http_503")["total"] == 0
            shown = client.get(f"{letters_url}/{letter['id']}", headers=ADMIN_HEADERS)
            assert shown.json()["snapshot_key"] == first.webhook_id
            gauge = metric(
                client.get(f"{service.url}/metrics").text,
                "dead_letters",
                kind="delivery",
                reason="http_410",
                sink="gone",
            )
            assert gauge == 1

            # The receiver is fixed; the operator replays the dead letter.
            rec.answer("/gone", 200)
            replay = client.post(f"{letters_url}/{letter['id']}/replay", headers=ADMIN_HEADERS)
            assert replay.status_code == 202, replay.text
            assert wait_until(lambda: len(rec.received("/gone", accepted=True)) == 1, timeout=15)
            assert letters()["total"] == 0

    replayed = rec.received("/gone", accepted=True)[0]
    assert replayed.verified
    assert replayed.webhook_id == first.webhook_id  # same order state -> same id
    assert replayed.body == first.body
    assert len(rec.received("/gone")) == 2


# --- 4. Retry-After --------------------------------------------------------------------


def test_retry_after_is_honoured(make_service: Any, clopos: Clopos) -> None:
    with Receiver({"/busy": NEW}) as rec:
        rec.answer_next("/busy", Reply(429, headers={"Retry-After": "2"}))
        service: ServiceProcess = make_service(
            SINKS=json.dumps([http_sink("busy", rec.url("/busy"))])
        )
        with httpx.Client(timeout=10) as client:
            notify(client, service, 1004)
            delivered = wait_until(lambda: len(rec.received("/busy", accepted=True)) == 1, 15)
            assert delivered, service.tail()
            text = client.get(f"{service.url}/metrics").text

    first, second = rec.received("/busy")
    assert first.status == 429
    assert second.status == 200
    # RETRY_BASE_SECONDS is 0.2 and RETRY_MAX_SECONDS 1 here: only Retry-After explains >= 2 s.
    gap = second.at - first.at
    assert 1.95 <= gap < 4.5, gap
    assert second.webhook_id == first.webhook_id
    assert first.verified
    assert second.verified
    assert metric(text, "deliveries_total", sink="busy", outcome="retry") == 1
    assert metric(text, "deliveries_total", sink="busy", outcome="delivered") == 1


# --- 5. same state -> same webhook-id; never backwards --------------------------------


def test_same_state_has_the_same_webhook_id_and_never_goes_backwards(
    make_service: Any, clopos: Clopos
) -> None:
    order_id = 1005
    order_path = f"/open-api/v2/orders/{order_id}"
    with Receiver({"/s": NEW}) as rec:
        service: ServiceProcess = make_service(SINKS=json.dumps([http_sink("s", rec.url("/s"))]))
        hydrate_url = f"{service.url}/admin/orders/{order_id}/hydrate"

        def accepted() -> list[Received]:
            return rec.received("/s", accepted=True)

        with httpx.Client(timeout=10) as client:
            notify(client, service, order_id)
            assert wait_until(lambda: len(accepted()) == 1, timeout=15), service.tail()

            # A forced re-hydration of the unchanged order: delivered again, same id.
            forced = client.post(hydrate_url, headers=ADMIN_HEADERS)
            assert forced.status_code == 202, forced.text
            assert wait_until(lambda: len(accepted()) == 2, timeout=15), service.tail()
            assert clopos.state.count(order_path) == 2

            # A plain notification of the unchanged order is fetched but delivers nothing.
            notify(client, service, order_id)
            assert wait_until(
                lambda: any(
                    e.get("order_id") == order_id and e.get("outcome") == "unchanged"
                    for e in log_events(service.log_path, "hydration.finished")
                ),
                timeout=15,
            ), service.tail()
            time.sleep(0.5)
            assert len(accepted()) == 2
            first, again = accepted()

            # Now the order changes quickly, with slow fetches and a slow receiver, so
            # new states arrive while older ones are being fetched and delivered; some
            # are forced re-hydrations.
            clopos.state.latency_seconds = 0.05
            rec.answer("/s", 200, delay=0.15)
            for revision in range(1, 7):
                clopos.state.update_order(order_id, e2e_rev=revision)
                notify(client, service, order_id)
                if revision % 2 == 0:
                    assert client.post(hydrate_url, headers=ADMIN_HEADERS).status_code == 202
                time.sleep(0.1)
            assert wait_until(lambda: any(rev(r) == 6 for r in accepted()), timeout=15), (
                service.tail()
            )
            time.sleep(1.0)  # a late, older delivery would show up now

    assert again.webhook_id == first.webhook_id
    assert again.json()["id"] == first.json()["id"] == first.webhook_id
    assert again.json()["order"] == first.json()["order"]
    assert again.json()["hydrated_at"] != first.json()["hydrated_at"]  # a new fetch, same id

    received = accepted()
    assert all(r.verified for r in rec.received("/s"))
    revs = never_backwards(received)[order_id]
    assert revs[-1] == 6
    # One id per state, a new id for each new state, and the first state's id is gone.
    ids_by_rev: dict[int, set[str]] = {}
    for item in received:
        ids_by_rev.setdefault(rev(item), set()).add(item.webhook_id)
    assert all(len(ids) == 1 for ids in ids_by_rev.values()), ids_by_rev
    all_ids = [next(iter(ids)) for ids in ids_by_rev.values()]
    assert len(set(all_ids)) == len(all_ids)
    assert first.webhook_id not in {r.webhook_id for r in received if rev(r) > 0}


# --- 6. recovery after a short outage takes seconds, not a cool-down -------------------


def test_deliveries_resume_within_seconds_after_a_4s_sink_outage(
    make_service: Any, clopos: Clopos
) -> None:
    """The breaker with its default settings (5 failures, 30 s cap) and the default retry
    backoff: a sink down for 4 s gets the orders changed meanwhile a few seconds after it is
    back, because the breaker probes on a growing schedule (1 s, 2 s, 4 s ...) and closes on
    the first probe that succeeds, instead of waiting out a fixed 30 s cool-down."""
    outage_seconds = 4.0
    with Receiver({"/a": NEW}) as rec:
        service: ServiceProcess = make_service(
            SINKS=json.dumps([http_sink("A", rec.url("/a"))]),
            RETRY_BASE_SECONDS="2",
            RETRY_MAX_SECONDS="600",
        )
        sent_at: dict[int, float] = {}  # order id -> when its last notification was sent
        with httpx.Client(timeout=10) as client:
            notify(client, service, 1001)  # warm: a token, a delivery, the breaker closed
            assert wait_until(lambda: len(rec.received("/a", accepted=True)) == 1, 15)

            rec.answer("/a", 503)
            down_at = time.monotonic()
            orders = list(range(1002, 1018))
            for index, order_id in enumerate(orders):
                clopos.state.update_order(order_id, e2e_rev=1)
                sent_at[order_id] = time.monotonic()
                notify(client, service, order_id)
                # Spread over the outage; the last one just before the sink is back.
                pause = down_at + (index + 1) * outage_seconds / len(orders) - time.monotonic()
                time.sleep(max(0.0, pause))
            time.sleep(max(0.0, down_at + outage_seconds - time.monotonic()))
            rec.answer("/a", 200)
            up_at = time.monotonic()
            opened = circuit_open(client, service, "A")

            def delivered_at() -> dict[int, float]:
                first: dict[int, float] = {}
                for item in rec.received("/a", accepted=True):
                    if item.at >= up_at and rev(item) == 1:
                        first.setdefault(item.json()["order_id"], item.at)
                return first

            assert wait_until(lambda: set(orders) <= set(delivered_at()), timeout=60), (
                service.tail()
            )
            arrived = delivered_at()
            assert wait_until(lambda: circuit_open(client, service, "A") == 0, timeout=10)
            status, checks = readiness(client, service)

    latencies = sorted(arrived[order_id] - sent_at[order_id] for order_id in orders)
    p50 = statistics.median(latencies)
    print(
        f"sink down {up_at - down_at:.1f} s: notification -> delivery p50 {p50:.1f} s, "
        f"max {latencies[-1]:.1f} s; back at the sink {max(arrived.values()) - up_at:.1f} s "
        "after it recovered"
    )
    assert opened == 1, "the breaker did open during the outage"
    assert p50 <= 10.0, latencies
    assert status == 200, checks
    assert checks["sink:A"]["detail"] == "circuit closed"
