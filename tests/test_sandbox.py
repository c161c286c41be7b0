"""The Clopos sandbox, driven over real HTTP (httpx -> uvicorn on loopback).

Time that matters (token expiry, rate-limit windows) is a fake clock shared with the state;
only the delay tests (hang, latency, gateway delay) really wait, and briefly.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from app.sandbox import SandboxState, create_sandbox_app
from tests.clock import FakeClock
from tests.servers import ServerThread

CREDENTIALS = {
    "client_id": "sandbox-client",
    "client_secret": "sandbox-client-secret",
    "brand": "sandbox",
    "integrator_id": "sandbox-integrator",
}
RECEIPT_QUERY = {"with[0]": "receipt:id,service_notification_id,status"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000000Z$")
START = 1_770_000_000.0  # 2026-02-02T02:40:00Z


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def limits() -> dict[str, int]:
    """Overridden by tests that need small rate limits."""
    return {}


@pytest.fixture
def state(clock: FakeClock, limits: dict[str, int]) -> SandboxState:
    return SandboxState(clock=clock, **limits)


@pytest.fixture
def server(state: SandboxState) -> Iterator[ServerThread]:
    with ServerThread(create_sandbox_app(state)) as running:
        yield running


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/open-api", timeout=5) as client:
        yield client


@pytest.fixture
def control(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/_sandbox", timeout=5) as client:
        yield client


def login(api: httpx.Client, **overrides: str) -> str:
    response = api.post("/v2/auth", json={**CREDENTIALS, **overrides})
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def get_order(api: httpx.Client, token: str, order_id: int | str, **kw: Any) -> httpx.Response:
    headers = {"x-token": token, **kw.pop("headers", {})}
    return api.get(f"/v2/orders/{order_id}", headers=headers, **kw)


def jwt_claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    assert len(parts) == 3
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload))
    return claims


# --- auth --------------------------------------------------------------------------------


def test_auth_success_issues_a_jwt_with_exp_equal_to_expires_at(
    api: httpx.Client, state: SandboxState
) -> None:
    response = api.post("/v2/auth", json=CREDENTIALS)

    body = response.json()
    assert response.status_code == 200
    assert body["success"] is True
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["expires_at"] == int(START) + 3600
    assert body["message"] == "Authentication successful"
    assert body["token"].startswith("eyJ")
    assert jwt_claims(body["token"])["exp"] == body["expires_at"]
    assert response.headers["RateLimit-Limit"] == "60"
    assert response.headers["RateLimit-Remaining"] == "59"
    assert state.auth_calls() == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"brand": None}, "The brand field is required."),
        ({"client_secret": ""}, "The client_secret field is required."),
        ({"integrator_id": "nobody"}, "Invalid integrator_id"),
    ],
)
def test_auth_bad_parameters_are_400(
    api: httpx.Client, change: dict[str, str | None], message: str
) -> None:
    body = {k: v for k, v in {**CREDENTIALS, **change}.items() if v is not None}

    response = api.post("/v2/auth", json=body)

    assert response.status_code == 400
    assert response.json()["success"] is False
    assert response.json()["message"] == message


def test_auth_body_that_is_not_json_is_400(api: httpx.Client) -> None:
    response = api.post("/v2/auth", content=b"client_id=x", headers={"content-type": "text/plain"})

    assert response.status_code == 400
    assert response.json()["success"] is False


def test_auth_wrong_secret_and_rejected_client_are_401(
    api: httpx.Client, state: SandboxState
) -> None:
    wrong = api.post("/v2/auth", json={**CREDENTIALS, "client_secret": "nope"})
    state.reject_credentials("sandbox-client")
    rejected = api.post("/v2/auth", json=CREDENTIALS)
    state.reject_credentials("sandbox-client", on=False)
    accepted = api.post("/v2/auth", json=CREDENTIALS)

    assert wrong.status_code == 401
    assert rejected.status_code == 401
    assert rejected.json() == {
        "success": False,
        "error": "unauthorized",
        "message": "Invalid credentials",
    }
    assert accepted.json()["success"] is True


def test_test_mode_integrator_gets_200_with_success_false(
    api: httpx.Client, state: SandboxState
) -> None:
    state.add_client("test-client", "test-secret", "prod-brand", "test-integrator", test_mode=True)

    response = api.post(
        "/v2/auth",
        json={
            "client_id": "test-client",
            "client_secret": "test-secret",
            "brand": "prod-brand",
            "integrator_id": "test-integrator",
        },
    )

    assert response.status_code == 200
    assert response.json() == {
        "success": False,
        "message": "Test integrator cannot access production brand",
    }


# --- tokens ------------------------------------------------------------------------------


def test_missing_and_unknown_tokens_are_401_with_clopos_messages(api: httpx.Client) -> None:
    missing = api.get("/v2/orders/1001")
    unknown = get_order(api, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", 1001)

    assert missing.status_code == 401
    assert missing.json()["message"] == "Headers are missing"
    assert unknown.status_code == 401
    assert unknown.json()["message"] == "Invalid token"
    assert "RateLimit-Remaining" in unknown.headers


def test_token_expires_on_the_clock_with_iso_expires_at(
    api: httpx.Client, clock: FakeClock
) -> None:
    token = login(api)
    clock.advance(3599)
    still_valid = get_order(api, token, 1001)
    clock.advance(1)

    expired = get_order(api, token, 1001)

    assert still_valid.status_code == 200
    assert expired.status_code == 401
    assert expired.json()["message"] == "Token expired"
    assert expired.json()["expires_at"] == "2026-02-02T03:40:00.000000Z"


def test_expire_tokens_invalidates_every_issued_token(
    api: httpx.Client, state: SandboxState
) -> None:
    token = login(api)
    state.expire_tokens()

    response = get_order(api, token, 1001)
    fresh = get_order(api, login(api), 1001)

    assert response.json()["message"] == "Token expired"
    assert fresh.status_code == 200


# --- orders ------------------------------------------------------------------------------


def test_receipt_is_present_only_when_asked(api: httpx.Client) -> None:
    token = login(api)

    plain = get_order(api, token, 1001).json()["data"]
    embedded = get_order(api, token, 1001, params=RECEIPT_QUERY).json()["data"]
    without_receipt = get_order(api, token, 1002, params=RECEIPT_QUERY).json()["data"]

    assert "receipt" not in plain
    assert embedded["receipt"] == {"id": 5001, "service_notification_id": 9001, "status": 1}
    assert "receipt" in without_receipt
    assert without_receipt["receipt"] is None


def test_order_has_standard_fields_and_keeps_unknown_ones(api: httpx.Client) -> None:
    response = get_order(api, login(api), 1001)

    body = response.json()
    order = body["data"]
    assert body["success"] is True
    assert order["id"] == 1001
    assert order["venue_id"] == 1
    assert order["x_extra"] == {"kept": True}
    for name in ("type", "integration_uuid", "status", "payload", "integration_response"):
        assert name in order
    assert TIMESTAMP.match(order["created_at"])
    assert TIMESTAMP.match(order["updated_at"])


def test_unknown_order_is_404_with_clopos_body(api: httpx.Client) -> None:
    response = get_order(api, login(api), 999999)

    assert response.status_code == 404
    assert response.json() == {
        "success": False,
        "error": "resource_not_found",
        "message": "Order not found",
    }


def test_order_in_another_venue_needs_x_venue(api: httpx.Client, state: SandboxState) -> None:
    state.put_order({"id": 2001, "venue_id": 2, "custom": [1, 2]})
    token = login(api)

    hidden = get_order(api, token, 2001)
    shown = get_order(api, token, 2001, headers={"x-venue": "2"})

    assert hidden.status_code == 404
    assert shown.status_code == 200
    assert shown.json()["data"]["custom"] == [1, 2]


def test_update_order_changes_fields_and_bumps_updated_at(
    api: httpx.Client, state: SandboxState, clock: FakeClock
) -> None:
    before = state.get_order(1001)
    clock.advance(90)

    updated = state.update_order(1001, status="DELIVERED")
    fetched = get_order(api, login(api), 1001).json()["data"]

    assert before is not None
    assert updated["updated_at"] != before["updated_at"]
    assert fetched["status"] == "DELIVERED"
    assert fetched["updated_at"] == updated["updated_at"]


# --- list --------------------------------------------------------------------------------


def test_list_pages_with_total(api: httpx.Client) -> None:
    token = login(api)

    pages = [
        api.get("/v2/orders", params={"page": p, "limit": 2}, headers={"x-token": token}).json()
        for p in (1, 2, 3)
    ]

    assert [[o["id"] for o in page["data"]] for page in pages] == [
        [1001, 1002],
        [1003, 1004],
        [1005],
    ]
    assert {page["total"] for page in pages} == {5}
    assert pages[0]["last_page"] == 3


def test_list_sorts_by_updated_at_and_filters(
    api: httpx.Client, state: SandboxState, clock: FakeClock
) -> None:
    clock.advance(60)
    state.update_order(1002, status="RECEIVED")
    token = {"x-token": login(api)}

    newest = api.get("/v2/orders", params={"sort[0]": "updated_at", "sort[1]": "-1"}, headers=token)
    received = api.get("/v2/orders", params={"status": "RECEIVED", **RECEIPT_QUERY}, headers=token)
    bad = api.get("/v2/orders", params={"sort[0]": "secret"}, headers=token)

    assert [o["id"] for o in newest.json()["data"]] == [1002, 1005, 1004, 1003, 1001]
    assert {o["id"] for o in received.json()["data"]} == {1001, 1002, 1004}
    assert all("receipt" in o for o in received.json()["data"])
    assert bad.status_code == 400


def test_list_date_range_is_inclusive_on_created_at(api: httpx.Client, state: SandboxState) -> None:
    state.put_order({"id": 3001, "venue_id": 1, "created_at": "2025-08-18 13:44:10"})
    token = login(api)

    response = api.get(
        "/v2/orders",
        params={"date[0]": "2025-08-18", "date[1]": "2025-08-18"},
        headers={"x-token": token},
    )

    assert [o["id"] for o in response.json()["data"]] == [3001]


# --- rate limits -------------------------------------------------------------------------


@pytest.mark.parametrize("limits", [{"tenant_limit_per_minute": 3}])
def test_tier3_limits_the_tenant_across_tokens(
    api: httpx.Client, state: SandboxState, clock: FakeClock
) -> None:
    state.add_client("second", "second-secret", "sandbox", "sandbox-integrator")
    first, second = login(api), login(api, client_id="second", client_secret="second-secret")

    answers = [get_order(api, t, 1001) for t in (first, second, first, second)]
    clock.advance(61)
    later = get_order(api, first, 1001)

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert answers[3].json() == {
        "success": False,
        "error": "rate_limited",
        "message": "Too many requests. Retry later.",
    }
    assert answers[3].headers["RateLimit-Limit"] == "3"
    assert 1 <= int(answers[3].headers["RateLimit-Reset"]) <= 60
    assert later.status_code == 200
    assert state.rate_limited() == 1


@pytest.mark.parametrize("limits", [{"auth_limit_per_minute": 2}])
def test_tier1_limits_auth_per_ip(api: httpx.Client, state: SandboxState, clock: FakeClock) -> None:
    answers = [api.post("/v2/auth", json=CREDENTIALS) for _ in range(3)]
    clock.advance(30)
    still = api.post("/v2/auth", json=CREDENTIALS)
    clock.advance(31)
    again = api.post("/v2/auth", json=CREDENTIALS)

    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].headers["RateLimit-Remaining"] == "0"
    assert answers[2].headers["RateLimit-Reset"] == "60"
    assert still.headers["RateLimit-Reset"] == "30"
    assert again.status_code == 200
    assert state.auth_calls() == 5
    assert state.rate_limited() == 2


@pytest.mark.parametrize("limits", [{"failed_limit_per_minute": 2}])
def test_tier2_counts_failures_before_token_validation(
    api: httpx.Client, state: SandboxState
) -> None:
    token = login(api)
    failures = [get_order(api, "bogus", 1001), get_order(api, token, 424242)]

    blocked = get_order(api, token, 1001)

    assert [f.status_code for f in failures] == [401, 404]
    assert blocked.status_code == 429
    assert blocked.headers["RateLimit-Limit"] == "2"
    assert blocked.json()["error"] == "rate_limited"


# --- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status"), [("500", 500), ("504", 504), ("429", 429), ("401", 401)]
)
def test_injected_fault_counts_down(
    api: httpx.Client, state: SandboxState, kind: str, status: int
) -> None:
    token = login(api)
    state.inject(kind, 2)

    statuses = [get_order(api, token, 1001).status_code for _ in range(3)]

    assert statuses == [status, status, 200]
    assert state.pending_faults()["orders"] == []
    assert state.count("/open-api/v2/orders/", status=status) == 2


def test_injected_429_carries_rate_limit_headers(api: httpx.Client, state: SandboxState) -> None:
    token = login(api)
    state.inject("429")

    response = get_order(api, token, 1001)

    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Reset"] == "1"
    assert response.json()["error"] == "rate_limited"


def test_injected_success_false_on_orders_and_auth(api: httpx.Client, state: SandboxState) -> None:
    token = login(api)
    state.inject("success_false")
    state.inject("success_false", route="auth")

    order = get_order(api, token, 1001)
    auth = api.post("/v2/auth", json=CREDENTIALS)

    assert (order.status_code, order.json()["success"]) == (200, False)
    assert auth.json() == {
        "success": False,
        "message": "Test integrator cannot access production brand",
    }
    assert api.post("/v2/auth", json=CREDENTIALS).json()["success"] is True


def test_injected_auth_500_then_recovers(api: httpx.Client, state: SandboxState) -> None:
    state.inject("500", route="auth")

    first = api.post("/v2/auth", json=CREDENTIALS)
    second = api.post("/v2/auth", json=CREDENTIALS)

    assert (first.status_code, second.status_code) == (500, 200)


def test_hang_does_not_block_the_server(
    api: httpx.Client, state: SandboxState, server: ServerThread
) -> None:
    token = login(api)
    state.hang_seconds = 0.6
    state.inject("hang")

    with pytest.raises(httpx.ReadTimeout):
        get_order(api, token, 1001, timeout=0.2)
    started = time.monotonic()
    stats = httpx.get(f"{server.url}/_sandbox/stats", timeout=2)
    responsive_in = time.monotonic() - started
    after = get_order(api, token, 1001)

    assert stats.status_code == 200
    assert responsive_in < 0.3
    assert after.status_code == 200
    # Recorded when decided, before the sleep: the timed-out call is counted.
    assert state.count("/open-api/v2/orders/") == 2
    time.sleep(0.5)  # let the hung request finish so the server stops promptly


def test_gateway_delay_and_latency_slow_answers(api: httpx.Client, state: SandboxState) -> None:
    token = login(api)
    state.gateway_delay_seconds = 0.2
    state.inject("504")

    started = time.monotonic()
    gateway = get_order(api, token, 1001)
    gateway_took = time.monotonic() - started
    state.latency_seconds = 0.15
    started = time.monotonic()
    slow = get_order(api, token, 1001)
    slow_took = time.monotonic() - started

    assert gateway.status_code == 504
    assert gateway_took >= 0.2
    assert slow.status_code == 200
    assert slow_took >= 0.15


def test_inject_rejects_unknown_kind_and_route(state: SandboxState) -> None:
    with pytest.raises(ValueError, match="kind"):
        state.inject("418")
    with pytest.raises(ValueError, match="route"):
        state.inject("500", route="receipts")


# --- counters and control routes ---------------------------------------------------------


def test_calls_are_recorded_raw(api: httpx.Client, state: SandboxState) -> None:
    token = login(api)
    get_order(api, token, 1001, params=RECEIPT_QUERY)
    api.get("/v2/nothing-here", headers={"x-token": token})

    calls = state.calls

    assert [(c.method, c.path, c.status) for c in calls] == [
        ("POST", "/open-api/v2/auth", 200),
        ("GET", "/open-api/v2/orders/1001", 200),
        ("GET", "/open-api/v2/nothing-here", 404),
    ]
    assert calls[1].query == RECEIPT_QUERY
    assert calls[1].headers["x-token"] == token
    assert calls[1].time == START
    assert state.count("/open-api/v2/orders") == 1
    assert state.count(status=404) == 1
    state.reset_counters()
    assert state.calls == []


def test_control_routes_arrange_the_sandbox(
    api: httpx.Client, control: httpx.Client, state: SandboxState, clock: FakeClock
) -> None:
    created = control.post("/orders", json={"id": 4242, "venue_id": 1, "note": "hi"})
    clock.advance(5)
    touched = control.post("/orders/4242/touch", json={"status": "DELIVERED"})
    injected = control.post("/faults", json={"kind": "500", "count": 1})
    bad = control.post("/faults", json={"kind": "teapot"})
    token = login(api)
    faulted = get_order(api, token, 4242)
    fetched = get_order(api, token, 4242)
    stats = control.get("/stats").json()

    assert created.json()["data"]["note"] == "hi"
    assert touched.json()["data"]["status"] == "DELIVERED"
    assert touched.json()["data"]["updated_at"] != created.json()["data"]["updated_at"]
    assert touched.json()["notified"] is False  # no notify_url configured
    assert injected.json()["faults"]["orders"] == ["500"]
    assert bad.status_code == 400
    assert (faulted.status_code, fetched.status_code) == (500, 200)
    assert fetched.json()["data"]["status"] == "DELIVERED"
    assert stats["calls"] == 3  # control routes are not recorded
    assert stats["auth_calls"] == 1
    assert stats["by_status"] == {"200": 2, "500": 1}
    assert control.post("/orders/999/touch").status_code == 404
    assert control.post("/reset").json()["success"] is True
    assert state.calls == []


def test_control_faults_can_expire_tokens_and_set_delays(
    api: httpx.Client, control: httpx.Client, state: SandboxState
) -> None:
    token = login(api)

    control.post("/faults", json={"expire_tokens": True, "hang_seconds": 1.5})

    assert get_order(api, token, 1001).json()["message"] == "Token expired"
    assert state.hang_seconds == 1.5


def _receiver(received: list[tuple[dict[str, Any], str | None]], event: threading.Event) -> Any:
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> dict[str, bool]:
        received.append((await request.json(), request.headers.get("x-webhook-token")))
        event.set()
        return {"accepted": True}

    return app


def test_touch_and_update_order_notify_the_receiver(
    control: httpx.Client, state: SandboxState
) -> None:
    received: list[tuple[dict[str, Any], str | None]] = []
    arrived = threading.Event()
    with ServerThread(_receiver(received, arrived)) as receiver:
        state.notify_url = f"{receiver.url}/hook"
        state.notify_token = "hook-secret"

        touched = control.post("/orders/1003/touch", json={"status": "DELIVERED"})
        assert arrived.wait(5)
        arrived.clear()
        state.update_order(1004, notify=True, status="IGNORE")
        assert arrived.wait(5)

    assert touched.json()["notified"] is True
    assert received == [
        ({"event": "order.updated", "data": {"id": 1003, "venue_id": 1}}, "hook-secret"),
        ({"event": "order.updated", "data": {"id": 1004, "venue_id": 1}}, "hook-secret"),
    ]


def test_notify_failure_is_not_raised(control: httpx.Client, state: SandboxState) -> None:
    state.notify_url = "http://127.0.0.1:9/nowhere"

    touched = control.post("/orders/1001/touch", json={})

    assert touched.status_code == 200
    assert touched.json()["notified"] is True


def test_works_when_mounted_under_a_prefix(state: SandboxState) -> None:
    host = FastAPI()
    host.mount("/sandbox", create_sandbox_app(state))

    with ServerThread(host) as running, httpx.Client(base_url=running.url, timeout=5) as client:
        auth = client.post("/sandbox/open-api/v2/auth", json=CREDENTIALS)
        order = client.get(
            "/sandbox/open-api/v2/orders/1001", headers={"x-token": auth.json()["token"]}
        )
        stats = client.get("/sandbox/_sandbox/stats")

    assert order.status_code == 200
    assert stats.json()["calls"] == 2
    assert [c.path for c in state.calls] == ["/open-api/v2/auth", "/open-api/v2/orders/1001"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    "path", ["/open-api/v2/auth", "/_sandbox/orders/1002/touch", "/_sandbox/orders"]
)
def test_a_client_hanging_up_mid_body_is_no_500_and_changes_nothing(
    server: ServerThread, state: SandboxState, path: str
) -> None:
    # The sandbox is served on the service's own port by `clopos-hydrator sandbox`: a
    # client that hangs up mid-body must not make uvicorn log an ERROR traceback.
    errors = _Records()
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(errors)
    before = dict(state.get_order(1002) or {})
    try:
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head.encode() + b'{"status": "CLOS')
            time.sleep(0.2)  # the body has begun arriving; then the client is gone
        time.sleep(0.5)  # let the server notice and finish the request
    finally:
        uvicorn_errors.removeHandler(errors)

    assert [r.getMessage() for r in errors.records if r.levelno >= logging.ERROR] == []
    assert state.get_order(1002) == before
    assert state.tokens_issued() == 0
