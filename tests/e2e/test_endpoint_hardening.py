"""The public endpoint under hostile or odd input, against the real service process.

One service process serves the whole module (these tests only send requests and read
its log), so the module costs one start-up.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.sandbox import SandboxState, create_sandbox_app
from app.service import create_app
from app.settings import load_settings
from app.signing import sign
from tests.e2e.service import (
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    ServiceProcess,
    log_events,
    service_env,
    wait_until,
)
from tests.servers import ServerThread

TOKEN = {"X-Webhook-Token": WEBHOOK_SECRET}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
THIRTY_ONE_DIGITS = "9" * 31


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp: Path = tmp_path_factory.mktemp("hardening")
    with ServerThread(create_sandbox_app(SandboxState(seed_orders=10))) as clopos:
        env = service_env(f"{clopos.url}/open-api", tmp / "hydrator.db")
        proc = ServiceProcess(env, tmp / "service.log").start()
        try:
            yield proc
        finally:
            proc.stop()


def admin_status(service: ServiceProcess) -> dict[str, int]:
    """The hydration queue's counts, to show a refused request changed nothing."""
    body = httpx.get(f"{service.url}/admin/status", headers=ADMIN).json()
    return dict(body["queues"]["hydration"])


# --- item 13: one definition of an order id -------------------------------------------------


@pytest.mark.parametrize("raw", ['"1001\\n"', '" 1001"', '"1_001"', '"+1001"', '"\\u00b2"'])
def test_webhook_refuses_order_ids_with_extra_characters(service: ServiceProcess, raw: str) -> None:
    body = b'{"data": {"id": ' + raw.encode() + b"}}"
    response = httpx.post(f"{service.url}/webhooks/clopos", headers=TOKEN, content=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_order_id"


@pytest.mark.parametrize("bad", ["1001%0A", "%201001", "1_001", "+1001", "1001.0", "0", "9" * 19])
def test_admin_hydrate_refuses_what_is_not_an_order_id(service: ServiceProcess, bad: str) -> None:
    before = admin_status(service)
    response = httpx.post(f"{service.url}/admin/orders/{bad}/hydrate", headers=ADMIN)
    assert response.status_code == 422, (bad, response.text)
    assert response.json()["error"] == "invalid_request"
    venue = httpx.post(f"{service.url}/admin/orders/1001/hydrate?venue_id={bad}", headers=ADMIN)
    assert venue.status_code == 422, (bad, venue.text)
    assert admin_status(service) == before


# --- item 14: admin integers out of range are a 422, never a store error --------------------

ADMIN_INTEGER_CASES = [
    ("GET", "/admin/dead-letters?after_id={n}"),
    ("GET", "/admin/dead-letters?limit={n}"),
    ("GET", "/admin/dead-letters/{n}"),
    ("POST", "/admin/dead-letters/{n}/replay"),
    ("DELETE", "/admin/dead-letters/{n}"),
    ("POST", "/admin/dead-letters/replay?brand=sandbox&limit={n}"),
    ("POST", "/admin/orders/{n}/hydrate"),
    ("POST", "/admin/orders/1001/hydrate?venue_id={n}"),
]


@pytest.mark.parametrize(("method", "template"), ADMIN_INTEGER_CASES)
@pytest.mark.parametrize("number", [THIRTY_ONE_DIGITS, str(2**63), "-1", "1%0A", "1_0"])
def test_admin_integers_out_of_range_are_422(
    service: ServiceProcess, method: str, template: str, number: str
) -> None:
    response = httpx.request(method, service.url + template.format(n=number), headers=ADMIN)
    assert response.status_code == 422, (method, template, number, response.text)
    assert response.json()["error"] == "invalid_request"
    assert response.json()["message"]


def test_admin_integers_at_the_top_of_the_range_are_served(service: ServiceProcess) -> None:
    top = str(2**63 - 1)
    page = httpx.get(f"{service.url}/admin/dead-letters?after_id={top}", headers=ADMIN)
    assert page.status_code == 200, page.text
    assert page.json()["items"] == []
    missing = httpx.get(f"{service.url}/admin/dead-letters/{top}", headers=ADMIN)
    assert missing.status_code == 404, missing.text


# --- item 15: no redirect repeats the query string (nor the token in it) -------------------

# Every route of the app (test_the_route_list_is_complete keeps this honest).
ROUTES = [
    ("POST", "/webhooks/clopos"),
    ("POST", "/webhooks/clopos/{brand}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/admin/status"),
    ("GET", "/admin/dead-letters"),
    ("DELETE", "/admin/dead-letters"),
    ("GET", "/admin/dead-letters/{dead_letter_id}"),
    ("POST", "/admin/dead-letters/replay"),
    ("POST", "/admin/dead-letters/{dead_letter_id}/replay"),
    ("DELETE", "/admin/dead-letters/{dead_letter_id}"),
    ("POST", "/admin/orders/{order_id}/hydrate"),
]
PATH_VALUES = {"brand": "sandbox", "dead_letter_id": "1", "order_id": "1001"}


def test_the_route_list_is_complete(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in service_env("http://127.0.0.1:9/open-api", tmp_path / "x.db").items():
        monkeypatch.setenv(name, value)
    app = create_app(load_settings())
    declared = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    assert declared | {("GET", "/openapi.json")} == set(ROUTES)


@pytest.mark.parametrize(("method", "template"), ROUTES)
def test_a_trailing_slash_is_never_redirected_with_the_token(
    service: ServiceProcess, method: str, template: str
) -> None:
    path = template.format(**PATH_VALUES)
    url = f"{service.url}{path}/?token={WEBHOOK_SECRET}"
    response = httpx.request(method, url, headers=ADMIN, content=b'{"data":{"id":1001}}')
    assert not 300 <= response.status_code < 400, (path, response.status_code, response.headers)
    for name, value in response.headers.items():
        assert WEBHOOK_SECRET not in value, (path, name, value)
    assert WEBHOOK_SECRET not in response.text


# --- item 12: a signed message's id must be one the replay guard can use --------------------


@pytest.mark.parametrize("msg_id", ["msg with space", "msg-\u00e9t\u00e9", "msg\ttab"])
def test_a_signed_message_with_an_unusable_id_is_refused_not_replayable(
    service: ServiceProcess, msg_id: str
) -> None:
    body = json.dumps({"data": {"id": 1002}}).encode()
    ts = int(time.time())
    # What a sender's library puts on the wire: the id as bytes, signed over its UTF-8.
    wire_id = msg_id.encode()
    signature = sign([WEBHOOK_SECRET], wire_id.decode("latin-1"), ts, body)
    headers = [
        (b"webhook-id", wire_id),
        (b"webhook-timestamp", str(ts).encode()),
        (b"webhook-signature", signature.encode()),
        (b"content-type", b"application/json"),
    ]
    answers = [
        httpx.post(f"{service.url}/webhooks/clopos", headers=headers, content=body)
        for _ in range(2)
    ]
    for answer in answers:
        assert 400 <= answer.status_code < 500, answer.text
        assert answer.json()["error"] == "invalid_webhook_id", answer.text


def test_a_signed_message_with_a_usable_id_is_still_replay_guarded(
    service: ServiceProcess,
) -> None:
    body = json.dumps({"data": {"id": 1003}}).encode()
    ts = int(time.time())
    headers = {
        "webhook-id": "msg_2b1f-ok",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign([WEBHOOK_SECRET], "msg_2b1f-ok", ts, body),
    }
    first = httpx.post(f"{service.url}/webhooks/clopos", headers=headers, content=body)
    again = httpx.post(f"{service.url}/webhooks/clopos", headers=headers, content=body)
    assert (first.status_code, again.status_code) == (202, 409), (first.text, again.text)


# --- item 11: a client that hangs up mid-body --------------------------------------------


def test_a_client_hanging_up_mid_body_is_logged_as_such_not_a_500(
    service: ServiceProcess,
) -> None:
    before = admin_status(service)
    request_ids = []
    for n in range(3):
        request_id = f"hangup-{n}-{time.monotonic_ns()}"
        request_ids.append(request_id)
        head = (
            "POST /webhooks/clopos HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"x-webhook-token: {WEBHOOK_SECRET}\r\nx-request-id: {request_id}\r\n"
            "content-length: 1000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(head.encode() + b'{"data": {"id": 10')
            time.sleep(0.2)  # the body has begun arriving; then the client is gone

    def story(request_id: str) -> list[dict[str, object]]:
        return [e for e in log_events(service.log_path) if e.get("request_id") == request_id]

    assert wait_until(
        lambda: all(any(e.get("event") == "http.request" for e in story(r)) for r in request_ids),
        timeout=10,
    ), service.tail()
    for request_id in request_ids:
        events = story(request_id)
        names = [e["event"] for e in events]
        assert "webhook.client_disconnected" in names, events
        for event in events:
            assert event["level"] in ("debug", "info"), event
            assert event.get("status") != 500, event
    # Nothing logged at error level anywhere (uvicorn's "Exception in ASGI application").
    assert not [e for e in log_events(service.log_path) if e.get("level") in ("error", "critical")]
    assert "Traceback" not in service.log_path.read_text()
    assert admin_status(service) == before  # nothing stored
