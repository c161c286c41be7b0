"""Operations against the real service process: /healthz, /readyz, /metrics and /admin/*.

Readiness is driven into each of its failure modes for real (the sandbox refuses the
credentials; a sink answers 503 until its breaker opens) and must recover once the cause
is gone. Metrics are read with the Prometheus client's own parser, as a scraper would.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.e2e.conftest import Clopos
from tests.e2e.service import (
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    ServiceProcess,
    log_events,
    logged,
    notify,
    wait_until,
)
from tests.servers import ServerThread

HEADERS = {"X-Webhook-Token": WEBHOOK_SECRET}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SINK_SECRET = "whsec_" + base64.b64encode(b"e2e-operations-sink-secret-0123").decode()
TENANT = "sandbox-integrator:sandbox"


class SinkReceiver:
    """An http sink endpoint: records every POST and answers the status chosen for it."""

    def __init__(self, *, echo: bool = False) -> None:
        self.status = 200
        self.status_for: dict[int, int] = {}  # order id -> status, overriding ``status``
        self.script: dict[int, list[int]] = {}  # order id -> the next answers, in order
        # Echo the request headers in error answers, as a careless receiver might.
        self.echo = echo
        self._lock = threading.Lock()
        self._received: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = json.loads(await request.body())
        order_id = body["order_id"]
        with self._lock:
            scripted = self.script.get(order_id)
            status = scripted.pop(0) if scripted else self.status_for.get(order_id, self.status)
            self._received.append(
                {"headers": dict(request.headers), "body": body, "status": status}
            )
        if status >= 300:
            answer: dict[str, Any] = {"error": "refused by the test receiver"}
            if self.echo:
                answer["you_sent"] = dict(request.headers)
            return JSONResponse(answer, status_code=status)
        return Response(status_code=status)

    def received(self, order_id: int | None = None, *, ok: bool = True) -> list[dict[str, Any]]:
        """Requests received (only those answered 2xx when ``ok``), oldest first."""
        with self._lock:
            items = list(self._received)
        return [
            r
            for r in items
            if (order_id is None or r["body"]["order_id"] == order_id)
            and (not ok or r["status"] < 300)
        ]


@pytest.fixture
def receiver() -> Iterator[tuple[SinkReceiver, str]]:
    rx = SinkReceiver()
    with ServerThread(rx.app) as server:
        yield rx, f"{server.url}/hook"


def sinks(url: str, **options: Any) -> str:
    """SINKS: the http sink ``hook`` at ``url`` and a log sink beside it."""
    hook = {"type": "http", "name": "hook", "url": url, "secret": SINK_SECRET, **options}
    return json.dumps([hook, {"type": "log", "name": "log"}])


def fetches(clopos: Clopos, order_id: int) -> int:
    """GET /v2/orders/{id} calls the sandbox answered for exactly this order."""
    return sum(1 for c in clopos.state.calls if c.path == f"/open-api/v2/orders/{order_id}")


def readyz(service: ServiceProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{service.url}/readyz", timeout=5)
    body = response.json()
    assert body["ready"] is (response.status_code == 200)
    return response.status_code, body["checks"]


def admin(service: ServiceProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{service.url}/admin{path}", headers=ADMIN, timeout=10, **kwargs)


def dead_letters(service: ServiceProcess, **params: Any) -> dict[str, Any]:
    response = admin(service, "GET", "/dead-letters", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def scrape(service: ServiceProcess) -> dict[str, Any]:
    """/metrics parsed by prometheus_client: family name -> family."""
    response = httpx.get(f"{service.url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float | None:
    """The value of the sample named ``sample`` whose labels include ``labels``."""
    for family in families.values():
        for s in family.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                return float(s.value)
    return None


EXPECTED_FAMILIES = {
    "clopos_hydrator_notifications_received": "counter",
    "clopos_hydrator_notifications_accepted": "counter",
    "clopos_hydrator_notifications_rejected": "counter",
    "clopos_hydrator_queue_depth": "gauge",
    "clopos_hydrator_queue_oldest_age_seconds": "gauge",
    "clopos_hydrator_upstream_requests": "counter",
    "clopos_hydrator_upstream_auth_requests": "counter",
    "clopos_hydrator_budget_remaining": "gauge",
    "clopos_hydrator_budget_limit": "gauge",
    "clopos_hydrator_brand_paused": "gauge",
    "clopos_hydrator_hydrations": "counter",
    "clopos_hydrator_hydration_duration_seconds": "histogram",
    "clopos_hydrator_hydration_latency_seconds": "histogram",
    "clopos_hydrator_deliveries": "counter",
    "clopos_hydrator_delivery_duration_seconds": "histogram",
    "clopos_hydrator_delivery_latency_seconds": "histogram",
    "clopos_hydrator_dead_letters": "gauge",
    "clopos_hydrator_dead_lettered": "counter",
    "clopos_hydrator_sink_circuit_open": "gauge",
}


def test_health_readiness_and_metrics(
    make_service: Any, clopos: Clopos, receiver: tuple[SinkReceiver, str]
) -> None:
    rx, url = receiver
    rx.status_for[1002] = 410
    service: ServiceProcess = make_service(SINKS=sinks(url), NOT_FOUND_MAX_ATTEMPTS="1")
    for order_id in (1001, 1002, 99999):
        notify(service, order_id)
    hook = f"{service.url}/webhooks/clopos"
    assert httpx.post(hook, headers={"X-Webhook-Token": "wrong"}, json={"id": 1}).status_code == 401
    assert httpx.post(hook, headers=HEADERS, content=b"not json").status_code == 400
    assert wait_until(
        lambda: rx.received(1001) and dead_letters(service)["total"] == 2 and logged(service, 1002),
        timeout=15,
    ), service.tail()

    health = httpx.get(f"{service.url}/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})

    status, checks = readyz(service)
    assert status == 200, checks
    expected = {"store", "workers", "credentials:sandbox", "sink:hook", "sink:log", "backlog"}
    assert set(checks) == expected  # no webhook_auth warning: a secret is configured
    assert all(c["ok"] and not c["warning"] for c in checks.values()), checks
    assert checks["store"]["detail"] == "writable"
    assert checks["credentials:sandbox"]["detail"] == "accepted"

    families = scrape(service)
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in families, f"missing metric family {name}"
        assert families[name].type == kind, (name, families[name].type)
    for name, family in families.items():
        assert name.startswith("clopos_hydrator_"), name
        if name.endswith("_created"):  # prometheus_client's creation-time series
            assert name.removesuffix("_created") in families, name
            continue
        if "seconds" in name:
            assert name.endswith("_seconds"), f"unit not last in {name}"
        if family.type == "counter":
            assert all(s.name == f"{name}_total" for s in family.samples), name

    def v(sample: str, **labels: str) -> float | None:
        return value(families, sample, **labels)

    p = "clopos_hydrator_"
    assert v(f"{p}notifications_received_total", route="default") == 5
    assert v(f"{p}notifications_accepted_total", brand="sandbox", outcome="new") == 3
    assert v(f"{p}notifications_rejected_total", reason="bad_token") == 1
    assert v(f"{p}notifications_rejected_total", reason="invalid_json") == 1
    for sink in ("", "hook", "log"):
        stage = "delivery" if sink else "hydration"
        assert v(f"{p}queue_depth", stage=stage, sink=sink, state="pending") == 0
        assert v(f"{p}queue_depth", stage=stage, sink=sink, state="running") == 0
        assert v(f"{p}queue_oldest_age_seconds", stage=stage, sink=sink) == 0
    # What the service counted agrees with what the sandbox answered.
    assert v(f"{p}upstream_requests_total", brand="sandbox", status="200") == 2
    assert v(f"{p}upstream_requests_total", brand="sandbox", status="404") == 1
    assert clopos.state.count("/open-api/v2/orders/", status=200) == 2
    assert v(f"{p}upstream_auth_requests_total", brand="sandbox") == clopos.state.auth_calls()
    assert v(f"{p}budget_limit", tenant=TENANT) == 300
    remaining = v(f"{p}budget_remaining", tenant=TENANT)
    assert remaining is not None
    assert 0 < remaining < 300
    assert v(f"{p}brand_paused", brand="sandbox") == 0
    assert v(f"{p}hydrations_total", brand="sandbox", outcome="stored") == 2
    assert v(f"{p}hydrations_total", brand="sandbox", outcome="dead_letter") == 1
    for histogram in ("hydration_duration_seconds", "hydration_latency_seconds"):
        assert v(f"{p}{histogram}_count", brand="sandbox") == 2
        assert v(f"{p}{histogram}_bucket", brand="sandbox", le="+Inf") == 2
    assert v(f"{p}deliveries_total", sink="hook", outcome="delivered") == 1
    assert v(f"{p}deliveries_total", sink="hook", outcome="dead_letter") == 1
    assert v(f"{p}deliveries_total", sink="log", outcome="delivered") == 2
    assert v(f"{p}delivery_duration_seconds_count", sink="hook") == 2  # every attempt
    assert v(f"{p}delivery_latency_seconds_count", sink="hook") == 1  # deliveries only
    assert v(f"{p}delivery_latency_seconds_count", sink="log") == 2
    assert v(f"{p}dead_letters", kind="hydration", reason="not_found", sink="") == 1
    assert v(f"{p}dead_letters", kind="delivery", reason="http_410", sink="hook") == 1
    assert v(f"{p}dead_lettered_total", kind="hydration", reason="not_found") == 1
    assert v(f"{p}dead_lettered_total", kind="delivery", reason="http_410") == 1
    assert v(f"{p}sink_circuit_open", sink="hook") == 0
    assert v(f"{p}sink_circuit_open", sink="log") == 0


def test_readiness_reports_rejected_credentials_and_backlog_then_recovers(
    make_service: Any, clopos: Clopos
) -> None:
    service: ServiceProcess = make_service(PAUSED_BRAND_RETRY_SECONDS="1", READY_MAX_BACKLOG="2")
    notify(service, 1001)
    assert wait_until(lambda: logged(service, 1001) == 1, timeout=10), service.tail()
    assert readyz(service)[0] == 200

    clopos.state.reject_credentials("sandbox-client")
    clopos.state.expire_tokens()  # the next call must authenticate again, and is refused
    notify(service, 1002)
    assert wait_until(lambda: readyz(service)[0] == 503, timeout=10), service.tail()
    checks = readyz(service)[1]
    assert not checks["credentials:sandbox"]["ok"]
    assert "credentials_rejected" in checks["credentials:sandbox"]["detail"]
    assert all(checks[name]["ok"] for name in ("store", "workers", "sink:log", "backlog"))
    assert value(scrape(service), "clopos_hydrator_brand_paused", brand="sandbox") == 1

    # Work keeps being accepted while the brand is paused, but costs no Clopos call.
    notify(service, 1003)
    notify(service, 1004)
    assert wait_until(lambda: not readyz(service)[1]["backlog"]["ok"], timeout=5)
    assert "hydration has 3 waiting (> 2)" in readyz(service)[1]["backlog"]["detail"]
    assert fetches(clopos, 1003) == fetches(clopos, 1004) == 0

    clopos.state.reject_credentials("sandbox-client", on=False)
    assert wait_until(lambda: readyz(service)[0] == 200, timeout=15), readyz(service)
    assert wait_until(
        lambda: all(logged(service, o) == 1 for o in (1002, 1003, 1004)), timeout=10
    ), service.tail()
    assert value(scrape(service), "clopos_hydrator_brand_paused", brand="sandbox") == 0
    assert log_events(service.log_path, "brand.resumed")


def test_readiness_reports_a_broken_sink_then_recovers(
    make_service: Any, receiver: tuple[SinkReceiver, str]
) -> None:
    rx, url = receiver
    rx.status = 503
    service: ServiceProcess = make_service(
        SINKS=sinks(url, breaker_failures=2, breaker_cooldown_seconds=1)
    )
    notify(service, 1001)
    assert wait_until(lambda: readyz(service)[0] == 503, timeout=15), service.tail()
    checks = readyz(service)[1]
    assert not checks["sink:hook"]["ok"]
    assert "circuit" in checks["sink:hook"]["detail"]
    assert checks["sink:log"]["ok"]
    assert checks["credentials:sandbox"]["ok"]
    # The broken sink does not hold the other one back.
    assert logged(service, 1001) == 1
    families = scrape(service)
    assert value(families, "clopos_hydrator_sink_circuit_open", sink="hook") == 1
    retries = value(families, "clopos_hydrator_deliveries_total", sink="hook", outcome="retry")
    assert retries is not None
    assert retries >= 2

    rx.status = 200
    assert wait_until(lambda: readyz(service)[0] == 200, timeout=15), readyz(service)
    assert len(rx.received(1001)) == 1
    assert value(scrape(service), "clopos_hydrator_sink_circuit_open", sink="hook") == 0


def test_readiness_recovers_when_the_broken_sinks_work_ended_in_dead_letters(
    make_service: Any, receiver: tuple[SinkReceiver, str]
) -> None:
    """The breaker must not stay half-open with nothing left to try: the failed
    delivery went to a dead letter, so readiness comes back with no new traffic."""
    rx, url = receiver
    rx.status = 503
    service: ServiceProcess = make_service(
        SINKS=sinks(url, breaker_failures=1, breaker_cooldown_seconds=1),
        RETRY_GIVE_UP_SECONDS="1",
    )
    notify(service, 1001)
    assert wait_until(lambda: dead_letters(service, sink="hook")["total"] == 1, timeout=15)
    rx.status = 200
    assert wait_until(lambda: readyz(service)[0] == 200, timeout=15), readyz(service)
    assert value(scrape(service), "clopos_hydrator_sink_circuit_open", sink="hook") == 0


def test_readiness_names_deliveries_stranded_under_a_removed_sink_name(
    make_service: Any, receiver: tuple[SinkReceiver, str]
) -> None:
    rx, url = receiver
    rx.status = 503  # deliveries to "hook" stay queued
    first: ServiceProcess = make_service("first.log", SINKS=sinks(url))
    notify(first, 1001)
    assert wait_until(lambda: rx.received(1001, ok=False), timeout=10), first.tail()
    first.stop()
    renamed = json.dumps([{"type": "log", "name": "log"}])  # "hook" left SINKS
    second: ServiceProcess = make_service("second.log", SINKS=renamed)
    status, checks = readyz(second)
    assert status == 503
    assert not checks["unconfigured_sinks"]["ok"]
    assert "hook" in checks["unconfigured_sinks"]["detail"]


ADMIN_ROUTES = [
    ("GET", "/admin/status"),
    ("GET", "/admin/dead-letters"),
    ("GET", "/admin/dead-letters/1"),
    ("POST", "/admin/dead-letters/1/replay"),
    ("POST", "/admin/dead-letters/replay?all=true"),
    ("DELETE", "/admin/dead-letters/1"),
    ("DELETE", "/admin/dead-letters?all=true"),
    ("POST", "/admin/orders/1001/hydrate"),
]


def test_admin_api_needs_the_bearer_token(make_service: Any, clopos: Clopos) -> None:
    service: ServiceProcess = make_service(NOT_FOUND_MAX_ATTEMPTS="1")
    notify(service, 99999)
    assert wait_until(lambda: dead_letters(service)["total"] == 1, timeout=10), service.tail()
    refused = [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ]
    for method, path in ADMIN_ROUTES:
        for headers in refused:
            response = httpx.request(method, service.url + path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    # Nothing was done on behalf of the refused requests.
    assert dead_letters(service)["total"] == 1
    assert fetches(clopos, 1001) == 0

    status = admin(service, "GET", "/status")
    assert status.status_code == 200
    body = status.json()
    assert body["dead_letters"] == {"hydration/not_found": 1}
    assert body["brands"]["sandbox"]["credentials"] == "accepted"
    assert body["brands"]["sandbox"]["tenant"] == TENANT
    assert body["brands"]["sandbox"]["budget"]["limit"] == 300
    assert body["sinks"] == {"log": {"kind": "log", "circuit": "closed", "in_flight": 0}}
    assert set(body["queues"]) == {"hydration", "delivery:log"}


def test_admin_routes_are_absent_without_a_token_and_open_webhooks_are_flagged(
    make_service: Any,
) -> None:
    service: ServiceProcess = make_service(
        ADMIN_TOKEN="", WEBHOOK_SECRET="", WEBHOOK_ALLOW_UNAUTHENTICATED="true"
    )
    for method, path in ADMIN_ROUTES:
        response = httpx.request(method, service.url + path, headers=ADMIN)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"] == "not_found"
    status, checks = readyz(service)
    assert status == 200  # a warning, not a failure
    assert checks["webhook_auth"]["ok"]
    assert checks["webhook_auth"]["warning"]
    assert "WEBHOOK_ALLOW_UNAUTHENTICATED" in checks["webhook_auth"]["detail"]
    assert log_events(service.log_path, "webhook.unauthenticated_mode")  # warned at start
    unsigned = httpx.post(f"{service.url}/webhooks/clopos", json={"data": {"id": 1001}})
    assert unsigned.status_code == 202
    assert wait_until(lambda: logged(service, 1001) == 1, timeout=10), service.tail()


def test_dead_letters_filter_paginate_show_replay_and_purge(
    make_service: Any, clopos: Clopos, receiver: tuple[SinkReceiver, str]
) -> None:
    rx, url = receiver
    rx.status_for.update({1001: 410, 1002: 410, 1003: 410, 1004: 422})
    service: ServiceProcess = make_service(SINKS=sinks(url), NOT_FOUND_MAX_ATTEMPTS="1")
    missing = [99001, 99002, 99003, 99004, 99005]
    for order_id in [1001, 1002, 1003, 1004, *missing]:
        notify(service, order_id)
    assert wait_until(lambda: dead_letters(service)["total"] == 9, timeout=15), service.tail()

    # --- list and filters ---
    everything = dead_letters(service)["items"]
    ids = [d["id"] for d in everything]
    assert ids == sorted(ids)
    by_order = {d["order_id"]: d for d in everything}
    assert set(by_order) == {1001, 1002, 1003, 1004, *missing}

    def total(**params: str) -> int:
        count: int = dead_letters(service, **params)["total"]
        return count

    assert total(kind="hydration") == total(reason="not_found") == 5
    assert total(kind="delivery") == total(sink="hook") == 4
    assert total(reason="http_410") == 3
    assert total(reason="http_422", sink="hook", brand="sandbox") == 1
    assert total(brand="sandbox") == 9
    assert total(brand="other") == total(sink="log") == total(kind="delivery", reason="x") == 0
    only = dead_letters(service, kind="hydration")["items"]
    assert {d["order_id"] for d in only} == set(missing)
    assert all(d["sink"] is None and d["reason"] == "not_found" for d in only)
    bad = admin(service, "GET", "/dead-letters", params={"kind": "bogus"})
    assert bad.status_code == 422
    assert bad.json()["error"] == "invalid_request"
    assert admin(service, "GET", "/dead-letters", params={"limit": 0}).status_code == 422

    # --- pagination ---
    pages: list[list[int]] = []
    params: dict[str, Any] = {"limit": 4}
    while True:
        page = admin(service, "GET", "/dead-letters", params=params).json()
        assert page["total"] == 9
        pages.append([d["id"] for d in page["items"]])
        if page["next_cursor"] is None:
            break
        assert page["next_cursor"] == pages[-1][-1]
        params["after_id"] = page["next_cursor"]
    assert [len(p) for p in pages] == [4, 4, 1]
    assert [i for p in pages for i in p] == ids

    # --- show ---
    letter = admin(service, "GET", f"/dead-letters/{by_order[1001]['id']}").json()
    assert letter["kind"] == "delivery"
    assert letter["sink"] == "hook"
    assert letter["reason"] == "http_410"
    assert letter["last_error"].startswith("HTTP 410")
    assert letter["attempts"] == 1
    assert letter["brand"] == "sandbox"
    failed = rx.received(1001, ok=False)
    assert [r["headers"]["webhook-id"] for r in failed] == [letter["snapshot_key"]]
    missing_letter = admin(service, "GET", "/dead-letters/999999")
    assert missing_letter.status_code == 404
    assert missing_letter.json()["error"] == "not_found"

    # --- replay one, auto: the stored snapshot is sent again, nothing is fetched ---
    rx.status_for.clear()
    replay = admin(service, "POST", f"/dead-letters/{by_order[1001]['id']}/replay")
    assert (replay.status_code, replay.json()) == (202, {"replayed": 1})
    assert wait_until(lambda: rx.received(1001), timeout=10), service.tail()
    assert rx.received(1001)[0]["headers"]["webhook-id"] == letter["snapshot_key"]
    assert fetches(clopos, 1001) == 1
    assert logged(service, 1001) == 1
    gone = admin(service, "GET", f"/dead-letters/{by_order[1001]['id']}")
    assert gone.status_code == 404

    # --- replay one, hydrate: fetched afresh and delivered to every sink ---
    replay = admin(
        service, "POST", f"/dead-letters/{by_order[1002]['id']}/replay", params={"mode": "hydrate"}
    )
    assert replay.status_code == 202
    assert wait_until(lambda: rx.received(1002) and logged(service, 1002) == 2, timeout=10)
    assert fetches(clopos, 1002) == 2

    # --- replay many, deliver ---
    replay = admin(
        service, "POST", "/dead-letters/replay", params={"reason": "http_410", "mode": "deliver"}
    )
    assert replay.json() == {"replayed": 1}
    assert wait_until(lambda: rx.received(1003), timeout=10)
    assert fetches(clopos, 1003) == 1

    # --- replay many, auto and hydrate, bounded by limit ---
    for order_id in missing:
        clopos.state.put_order({"id": order_id})
    replay = admin(
        service, "POST", "/dead-letters/replay", params={"reason": "not_found", "limit": 2}
    )
    assert replay.json() == {"replayed": 2}
    replayed = [d["order_id"] for d in only[:2]]  # the oldest letters go first
    assert wait_until(lambda: all(rx.received(o) for o in replayed), timeout=10)
    assert total(kind="hydration") == 3
    replay = admin(
        service,
        "POST",
        "/dead-letters/replay",
        params={"kind": "hydration", "mode": "hydrate", "limit": 1},
    )
    assert replay.json() == {"replayed": 1}
    replayed.append(only[2]["order_id"])
    assert wait_until(lambda: all(logged(service, o) == 1 for o in replayed), timeout=10)
    left = dead_letters(service, kind="hydration")["items"]
    assert [d["order_id"] for d in left] == [d["order_id"] for d in only[3:]]
    assert all(fetches(clopos, d["order_id"]) == 1 for d in left)  # not replayed: not fetched

    # --- purge ---
    first = left[0]["id"]
    purge = admin(service, "DELETE", f"/dead-letters/{first}")
    assert purge.status_code == 204
    assert admin(service, "DELETE", f"/dead-letters/{first}").status_code == 404
    assert admin(service, "GET", f"/dead-letters/{first}").status_code == 404
    refused = admin(service, "DELETE", "/dead-letters")
    assert refused.status_code == 400
    assert refused.json()["error"] == "filter_required"
    purge = admin(service, "DELETE", "/dead-letters", params={"reason": "not_found"})
    assert purge.json() == {"purged": 1}
    assert total(reason="http_422") == 1
    purge = admin(service, "DELETE", "/dead-letters", params={"all": "true"})
    assert purge.json() == {"purged": 1}
    assert total() == 0


def test_admin_hydrate_now_forces_a_fetch_and_a_delivery(
    make_service: Any, clopos: Clopos, receiver: tuple[SinkReceiver, str]
) -> None:
    rx, url = receiver
    service: ServiceProcess = make_service(SINKS=sinks(url))
    answer = admin(service, "POST", "/orders/1005/hydrate")
    assert answer.status_code == 202
    body = answer.json()
    assert body["accepted"]
    assert body["brand"] == "sandbox"
    assert body["order_id"] == 1005
    assert isinstance(body["job_id"], int)
    assert wait_until(lambda: rx.received(1005) and logged(service, 1005) == 1, timeout=10)
    assert rx.received(1005)[0]["body"]["order"]["receipt"]["id"] == 5005

    # The same state again: a notification would deliver nothing new, a forced one does.
    again = admin(service, "POST", "/orders/1005/hydrate", params={"brand": "sandbox"})
    assert again.status_code == 202
    assert wait_until(lambda: len(rx.received(1005)) == 2 and logged(service, 1005) == 2, 10)
    assert fetches(clopos, 1005) == 2
    first, second = rx.received(1005)
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]

    unknown = admin(service, "POST", "/orders/1005/hydrate", params={"brand": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "unknown_brand"
    assert admin(service, "POST", "/orders/0/hydrate").status_code == 422
    assert admin(service, "POST", "/orders/abc/hydrate").status_code == 422
    assert fetches(clopos, 1005) == 2
