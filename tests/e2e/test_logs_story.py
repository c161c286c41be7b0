"""The logs of a whole run: no secret in them, and one order's story one filter away.

A full run at LOG_LEVEL=debug through every path that handles a secret: inbound
notifications authenticated by header, by query token and by signature; Clopos tokens
issued, expired and renewed; an http sink with a signing secret and an auth header that
echoes what it received into its error answers; admin calls with the admin token. Then the
captured log file is searched for every one of those secrets, and filtered by order id.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx

from app.signing import sign
from tests.e2e.conftest import Clopos
from tests.e2e.service import ADMIN_TOKEN, WEBHOOK_SECRET, ServiceProcess, log_events, wait_until
from tests.e2e.test_operations import SINK_SECRET, SinkReceiver
from tests.servers import ServerThread

CLIENT_SECRET = "sandbox-client-secret"
SINK_HEADER_SECRET = "sink-header-credential-7f3a9c"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def issued_tokens(clopos: Clopos) -> set[str]:
    """Every Clopos token of the run: as the sandbox issued them and as they were sent."""
    issued = set(clopos.state._tokens)  # the sandbox keeps issued tokens in this dict
    sent = {c.headers["x-token"] for c in clopos.state.calls if "x-token" in c.headers}
    assert sent <= issued
    return issued


def story(path: Path, order_id: int) -> list[dict[str, Any]]:
    """``jq 'select(.order_id == N)'``: one order's lines, in order."""
    return [e for e in log_events(path) if e.get("order_id") == order_id]


def named(events: list[dict[str, Any]], event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e for e in events if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
    ]


def post(service: ServiceProcess, order_id: int, **kwargs: Any) -> httpx.Response:
    body = json.dumps({"event": "order.updated", "data": {"id": order_id}}).encode()
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{service.url}/webhooks/clopos", content=body, headers=headers, **kwargs)


def signed(order_id: int) -> dict[str, str]:
    body = json.dumps({"event": "order.updated", "data": {"id": order_id}}).encode()
    msg_id, timestamp = f"msg-story-{order_id}", int(time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([WEBHOOK_SECRET], msg_id, timestamp, body),
    }


def test_a_full_run_logs_no_secret_and_tells_each_orders_story(
    make_service: Any, clopos: Clopos
) -> None:
    rx = SinkReceiver(echo=True)
    rx.script[1001] = [503]  # one retry, then delivered
    rx.status_for[1002] = 410  # a delivery dead letter
    with ServerThread(rx.app) as server:
        hook = {
            "type": "http",
            "name": "hook",
            "url": f"{server.url}/hook",
            "secret": SINK_SECRET,
            "headers": {"X-Api-Key": SINK_HEADER_SECRET},
        }
        service: ServiceProcess = make_service(
            LOG_LEVEL="debug",
            NOT_FOUND_MAX_ATTEMPTS="1",
            SINKS=json.dumps([hook, {"type": "log", "name": "log"}]),
        )
        by_header = {"X-Webhook-Token": WEBHOOK_SECRET, "X-Request-ID": "story-1001"}
        assert post(service, 1001, headers=by_header).status_code == 202
        assert post(service, 1002, params={"token": WEBHOOK_SECRET}).status_code == 202
        assert post(service, 99999, headers=signed(99999)).status_code == 202
        assert post(service, 1003, headers={"X-Webhook-Token": "wrong"}).status_code == 401
        assert wait_until(lambda: rx.received(1001), timeout=15), service.tail()

        def dead_letters() -> list[dict[str, Any]]:
            answer = httpx.get(f"{service.url}/admin/dead-letters", headers=ADMIN)
            items: list[dict[str, Any]] = answer.json()["items"]
            return items

        assert wait_until(lambda: len(dead_letters()) == 2, timeout=15), service.tail()

        # Tokens expire: the next fetch is refused, a new token is issued and used.
        clopos.state.expire_tokens()
        assert post(service, 1003, headers=signed(1003)).status_code == 202
        assert wait_until(lambda: rx.received(1003), timeout=15), service.tail()

        # The operator replays the refused delivery once the sink accepts it.
        rx.status_for.clear()
        letter = next(d for d in dead_letters() if d["order_id"] == 1002)
        replay = httpx.post(
            f"{service.url}/admin/dead-letters/{letter['id']}/replay", headers=ADMIN
        )
        assert replay.status_code == 202
        assert wait_until(lambda: rx.received(1002), timeout=15), service.tail()
        wrong_admin = {"Authorization": f"Bearer {ADMIN_TOKEN}-not"}
        assert httpx.get(f"{service.url}/admin/status", headers=wrong_admin).status_code == 401
        service.stop()

    text = service.log_path.read_text()
    events = log_events(service.log_path)
    # The log is the whole debug story, not an empty file that trivially holds no secret.
    assert any(e["event"] == "clopos.request" and e["level"] == "debug" for e in events)
    assert named(events, "service.stopped")

    # --- no secret anywhere ---
    tokens = issued_tokens(clopos)
    assert len(tokens) >= 2, "the run was meant to renew the Clopos token"
    secrets = {
        CLIENT_SECRET: "client secret",
        WEBHOOK_SECRET: "webhook secret",
        ADMIN_TOKEN: "admin token",
        SINK_SECRET: "sink secret",
        SINK_SECRET.removeprefix("whsec_"): "sink secret (key part)",
        base64.b64decode(SINK_SECRET.removeprefix("whsec_")).decode(): "sink secret (raw key)",
        SINK_HEADER_SECRET: "sink header value",
    }
    for token in tokens:
        secrets[token] = "Clopos token"
        secrets[token.rsplit(".", 1)[1]] = "Clopos token signature"
    for secret, what in secrets.items():
        assert secret not in text, f"the log contains the {what}"
    # The echoing sink's answers did reach the log (redacted), so the check above bit.
    assert any("you_sent" in (e.get("detail") or "") for e in named(events, "delivery.finished"))

    # --- one order's story: 1001, retried once by the sink ---
    lines = story(service.log_path, 1001)
    assert {e["brand"] for e in lines} == {"sandbox"}
    (accepted,) = named(lines, "webhook.accepted")
    assert accepted["request_id"] == "story-1001"
    job_id = accepted["job_id"]
    access = [e for e in named(events, "http.request") if e["request_id"] == "story-1001"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/webhooks/clopos", 202)
    ]
    (hydrated,) = named(lines, "hydration.finished")
    assert hydrated["job_id"] == job_id
    assert hydrated["attempt"] == 1
    assert hydrated["outcome"] == "stored"
    assert isinstance(hydrated["duration_ms"], float)
    fetch = named(lines, "clopos.request", job_id=job_id)
    assert [f["status"] for f in fetch] == [200]
    assert fetch[0]["attempt"] == 1
    to_hook = named(lines, "delivery.finished", sink="hook")
    assert [(d["outcome"], d["attempt"]) for d in to_hook] == [("retry", 1), ("delivered", 2)]
    assert len({d["delivery_id"] for d in to_hook}) == 1
    assert to_hook[0]["detail"].startswith("HTTP 503")
    assert to_hook[0]["retry_in_s"] is not None
    (to_log,) = named(lines, "delivery.finished", sink="log")
    assert (to_log["outcome"], to_log["attempt"]) == ("delivered", 1)
    assert to_log["webhook_id"] == to_hook[-1]["webhook_id"]
    order = [e["event"] for e in lines]
    assert order.index("webhook.accepted") < order.index("hydration.finished")
    assert order.index("hydration.finished") < order.index("delivery.finished")

    # --- 1002: a dead letter, replayed, delivered ---
    lines = story(service.log_path, 1002)
    assert named(lines, "webhook.accepted")
    outcomes = [d["outcome"] for d in named(lines, "delivery.finished", sink="hook")]
    assert outcomes == ["dead_letter", "delivered"]
    (dead,) = named(lines, "delivery.finished", outcome="dead_letter")
    assert dead["detail"].startswith("http_410: HTTP 410")

    # --- 99999: the hydration dead letter ---
    lines = story(service.log_path, 99999)
    (accepted,) = named(lines, "webhook.accepted")
    (failed,) = named(lines, "hydration.finished")
    assert failed["job_id"] == accepted["job_id"]
    assert failed["outcome"] == "dead_letter"
    assert failed["detail"].startswith("not_found")

    # --- 1003: fetched after the token expired, with a renewed token ---
    lines = story(service.log_path, 1003)
    assert named(lines, "clopos.auth.ok")
    assert named(lines, "hydration.finished", outcome="stored")
    assert named(lines, "delivery.finished", sink="hook", outcome="delivered")

    # Every access line is in the same JSON format, and carries its request id.
    for line in named(events, "http.request"):
        assert {"method", "path", "status", "duration_ms", "request_id", "level"} <= set(line)
        assert "?" not in line["path"]


def test_console_logs_tell_the_story_to_grep(make_service: Any) -> None:
    service: ServiceProcess = make_service(LOG_FORMAT="console")
    answer = post(service, 1001, headers={"X-Webhook-Token": WEBHOOK_SECRET})
    assert answer.status_code == 202
    request_id = answer.headers["x-request-id"]

    def text() -> str:
        return service.log_path.read_text()

    assert wait_until(lambda: "delivery.finished" in text(), timeout=10), service.tail()
    grepped = [line for line in text().splitlines() if "order_id=1001" in line]
    for event in ("webhook.accepted", "hydration.finished", "delivery.finished"):
        assert any(event in line for line in grepped), (event, grepped)
    assert any(f"request_id={request_id}" in line for line in grepped)
    assert any("job_id=" in line and "attempt=1" in line for line in grepped)
    assert WEBHOOK_SECRET not in text()
