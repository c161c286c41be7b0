"""The http sink against a real receiver on loopback.

The receiver verifies every signature with the reference ``standardwebhooks``
package (not our code) and records what it got; other routes answer with a chosen
status, sleep, drip, redirect or echo, to drive each outcome of ``deliver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app import __version__, signing
from app.errors import ConfigError, SinkPermanentError, SinkRetryableError
from app.http_client import make_http_client
from app.settings import HttpSinkConfig
from app.sinks.http import HttpSink, parse_retry_after
from app.snapshot import build_body, snapshot_key
from app.store.base import Delivery
from tests.servers import ServerThread, free_port

OLD = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW = signing.new_secret()
RECEIVER_SECRETS = {"old": [OLD], "new": [NEW]}
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "app" / "schemas" / "order_hydrated.json"
FIXED_NOW = 1_800_000_000.0

# A realistic Clopos order, as GET /v2/orders/{id}?with[0]=receipt:... returns its data.
ORDER: dict[str, Any] = {
    "id": 184467,
    "venue_id": 3,
    "type": "CALL_CENTER_ORDER",
    "integration": "wolt",
    "integration_uuid": "6f0c2a4e-1b8d-4c55-9d3e-2f7a8b9c0d1e",
    "integration_id": "WOLT-77120",
    "customer_ref_id": None,
    "integration_status": "accepted",
    "status": "RECEIVED",
    "payload": {
        "service": {"id": 2, "name": "\u00c7atd\u0131r\u0131lma", "type": "DELIVERY"},
        "customer": {
            "name": "Aysel Məmmədova",
            "phone": "+994501234567",
            "address": "Nizami k\u00fc\u00e7. 10, Bak\u0131",
        },
        "products": [
            {"product_id": 17, "name": "Plov", "count": 2, "price": 12.5, "modificators": []},
            {
                "product_id": 44,
                "name": "Ayran",
                "count": 1,
                "price": 2.0,
                "modificators": [{"id": 5, "name": "Buzlu", "price": 0}],
            },
        ],
        "meta": {"comment": "Qap\u0131n\u0131 d\u00f6y\u00fcn", "payment_method": "card"},
    },
    "integration_response": None,
    "created_at": "2026-02-02T17:40:11.000000Z",
    "updated_at": "2026-02-02 17:46:02",
    "receipt": {"id": 998877, "service_notification_id": 5512, "status": 2},
    "a_field_clopos_adds_later": {"nested": [1, 2, 3]},
}


def make_delivery(order: dict[str, Any] = ORDER, *, delivery_id: int = 1) -> Delivery:
    key = snapshot_key("acme", int(order["id"]), order)
    body = build_body(
        key=key,
        brand="acme",
        order_id=int(order["id"]),
        order=order,
        notification_ids=[41, 42, 57],
        received_at=1_770_054_362.123,
        hydrated_at=1_770_054_363.456,
    )
    return Delivery(
        id=delivery_id,
        sink="hook",
        snapshot_id=9,
        snapshot_key=key,
        brand="acme",
        order_id=int(order["id"]),
        version=3,
        body=body,
        attempts=0,
        lease_token="lease-1",
        created_at=1_770_054_363.5,
        first_received_at=1_770_054_362.123,
    )


# --- the receiver ----------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified_with: str | None


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.app = Starlette(
            routes=[
                Route("/verify/{who}", self.verify, methods=["POST"]),
                Route("/status/{code:int}", self.status, methods=["POST"]),
                Route("/slow", self.slow, methods=["POST"]),
                Route("/drip/{code:int}", self.drip, methods=["POST"]),
                Route("/redirect", self.redirect, methods=["POST"]),
            ]
        )

    async def _record(self, request: Request, verified_with: str | None = None) -> Received:
        item = Received(
            request.url.path, dict(request.headers), await request.body(), verified_with
        )
        self.requests.append(item)
        return item

    def paths(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def verify(self, request: Request) -> Response:
        """Accept only what the reference package verifies with this receiver's secret."""
        who = request.path_params["who"]
        body = await request.body()
        for secret in RECEIVER_SECRETS[who]:
            try:
                Webhook(secret).verify(body, dict(request.headers), json_parse=False)
            except WebhookVerificationError:
                continue
            await self._record(request, verified_with=who)
            return Response(status_code=204)
        await self._record(request)
        return JSONResponse({"error": "bad signature"}, status_code=401)

    async def status(self, request: Request) -> Response:
        item = await self._record(request)
        query = request.query_params
        headers = {}
        if "retry_after" in query:
            headers["retry-after"] = query["retry_after"]
        if "size" in query:
            content = b"E" * int(query["size"])
        elif "echo" in query:
            content = json.dumps({"url": str(request.url), "headers": item.headers}).encode()
        else:
            content = query.get("body", "").encode()
        return Response(content, status_code=request.path_params["code"], headers=headers)

    async def slow(self, request: Request) -> Response:
        await self._record(request)
        await asyncio.sleep(float(request.query_params["s"]))
        return Response(status_code=200)

    async def drip(self, request: Request) -> Response:
        """Headers at once, then a body that trickles for far longer than any timeout."""
        await self._record(request)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"still going "
                await asyncio.sleep(0.1)

        return StreamingResponse(chunks(), status_code=request.path_params["code"])

    async def redirect(self, request: Request) -> Response:
        await self._record(request)
        return Response(
            status_code=302, headers={"location": "/verify/old?token=should-not-leak-1"}
        )


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    with ServerThread(rec.app) as server:
        yield rec, server.url


SinkFactory = Callable[..., HttpSink]


@pytest.fixture
async def make_sink() -> AsyncIterator[SinkFactory]:
    sinks: list[HttpSink] = []

    def factory(
        url: str,
        *,
        secrets: list[str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> HttpSink:
        config = HttpSinkConfig.model_validate(
            {
                "type": "http",
                "url": url,
                "secret": secrets or [OLD],
                "headers": headers or {},
                "timeout_seconds": timeout,
            }
        )
        sink = HttpSink("hook", config, clock=clock)
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        await sink.aclose()


async def deliver_error(
    sink: HttpSink, delivery: Delivery | None = None
) -> SinkRetryableError | SinkPermanentError:
    try:
        await sink.deliver(delivery or make_delivery())
    except (SinkRetryableError, SinkPermanentError) as exc:
        return exc
    raise AssertionError("deliver() succeeded")


async def timed(coro: Awaitable[Any]) -> float:
    started = time.monotonic()
    with contextlib.suppress(SinkRetryableError, SinkPermanentError):
        await coro
    return time.monotonic() - started


# --- signatures ------------------------------------------------------------------------


async def test_delivery_is_signed_and_verifies(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    rec, url = receiver
    delivery = make_delivery()
    await make_sink(f"{url}/verify/old").deliver(delivery)
    got = rec.paths("/verify/old")[-1]
    assert got.verified_with == "old"
    assert got.body == delivery.body
    assert got.headers["webhook-id"] == delivery.snapshot_key
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"] == f"clopos-hydrator/{__version__}"
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 5


@pytest.mark.parametrize("receiver_knows", ["old", "new"])
async def test_rotation_new_and_old_both_verify(
    receiver: tuple[Receiver, str], make_sink: SinkFactory, receiver_knows: str
) -> None:
    rec, url = receiver
    sink = make_sink(f"{url}/verify/{receiver_knows}", secrets=[NEW, OLD])
    await sink.deliver(make_delivery())
    got = rec.paths(f"/verify/{receiver_knows}")[-1]
    assert got.verified_with == receiver_knows
    assert len(got.headers["webhook-signature"].split(" ")) == 2


async def test_receiver_with_another_secret_refuses_permanently(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    _, url = receiver
    error = await deliver_error(make_sink(f"{url}/verify/new", secrets=[OLD]))
    assert isinstance(error, SinkPermanentError)
    assert error.status == 401
    assert "bad signature" in error.detail


async def test_same_delivery_twice_carries_the_same_webhook_id(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    rec, url = receiver
    sink = make_sink(f"{url}/verify/old")
    first, second = make_delivery(delivery_id=1), make_delivery(delivery_id=2)
    await sink.deliver(first)
    await sink.deliver(second)
    a, b = rec.paths("/verify/old")[-2:]
    assert a.headers["webhook-id"] == b.headers["webhook-id"] == first.snapshot_key
    assert a.verified_with == b.verified_with == "old"
    # A different order state gets a different id.
    changed = make_delivery({**ORDER, "status": "DELIVERED"})
    await sink.deliver(changed)
    assert rec.paths("/verify/old")[-1].headers["webhook-id"] != first.snapshot_key


async def test_extra_headers_are_sent_but_never_replace_ours(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    rec, url = receiver
    headers = {
        "X-Tenant": "acme-prod",
        "Authorization": "Bearer downstream-token-123",
        "Webhook-Id": "forged",
        "webhook-signature": "v1,forged",
        "Content-Type": "text/plain",
    }
    delivery = make_delivery()
    await make_sink(f"{url}/verify/old", headers=headers).deliver(delivery)
    got = rec.paths("/verify/old")[-1]
    assert got.verified_with == "old"
    assert got.headers["x-tenant"] == "acme-prod"
    assert got.headers["authorization"] == "Bearer downstream-token-123"
    assert got.headers["webhook-id"] == delivery.snapshot_key
    assert "forged" not in got.headers["webhook-signature"]
    assert got.headers["content-type"] == "application/json"


# --- outcomes --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [200, 201, 202, 204])
async def test_2xx_is_success(
    receiver: tuple[Receiver, str], make_sink: SinkFactory, code: int
) -> None:
    _, url = receiver
    await make_sink(f"{url}/status/{code}?body=ok").deliver(make_delivery())


@pytest.mark.parametrize("code", [500, 502, 503, 429, 408, 425])
async def test_retryable_statuses(
    receiver: tuple[Receiver, str], make_sink: SinkFactory, code: int
) -> None:
    _, url = receiver
    error = await deliver_error(make_sink(f"{url}/status/{code}?body=try+later"))
    assert isinstance(error, SinkRetryableError)
    assert error.status == code
    assert error.retry_after is None
    assert error.detail == f"HTTP {code}: try later"


async def test_retry_after_seconds_is_honoured(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    _, url = receiver
    error = await deliver_error(make_sink(f"{url}/status/503?retry_after=42"))
    assert isinstance(error, SinkRetryableError)
    assert error.retry_after == 42.0
    error = await deliver_error(make_sink(f"{url}/status/429?retry_after=999999"))
    assert isinstance(error, SinkRetryableError)
    assert error.retry_after == 3600.0  # capped


async def test_retry_after_http_date_is_honoured(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    _, url = receiver
    when = format_datetime(datetime.fromtimestamp(FIXED_NOW + 120, UTC), usegmt=True)
    sink = make_sink(f"{url}/status/429", clock=lambda: FIXED_NOW)
    error = await deliver_error(
        make_sink(
            str(httpx.URL(f"{url}/status/429", params={"retry_after": when})),
            clock=lambda: FIXED_NOW,
        )
    )
    assert isinstance(error, SinkRetryableError)
    assert error.retry_after == 120.0
    # Without the header there is nothing to honour.
    plain = await deliver_error(sink)
    assert isinstance(plain, SinkRetryableError)
    assert plain.retry_after is None


def test_parse_retry_after_edge_cases() -> None:
    now = FIXED_NOW
    past = format_datetime(datetime.fromtimestamp(now - 60, UTC), usegmt=True)
    assert parse_retry_after("0", now) == 0.0
    assert parse_retry_after(" 30 ", now) == 30.0
    assert parse_retry_after(past, now) == 0.0
    for junk in (None, "", "soon", "1.5", "-5", "²", "Mon, 99 Foo 2026 99:99:99 GMT"):
        assert parse_retry_after(junk, now) is None, junk


@pytest.mark.parametrize("code", [400, 404, 410, 422])
async def test_other_4xx_is_permanent_with_status_and_excerpt(
    receiver: tuple[Receiver, str], make_sink: SinkFactory, code: int
) -> None:
    _, url = receiver
    reason = '{"error":"unknown field order.receipt"}'
    error = await deliver_error(
        make_sink(str(httpx.URL(f"{url}/status/{code}", params={"body": reason})))
    )
    assert isinstance(error, SinkPermanentError)
    assert error.status == code
    assert error.detail == f"HTTP {code}: {reason}"


@pytest.mark.parametrize("code", [400, 500])
async def test_huge_answer_is_read_bounded_and_excerpted(
    receiver: tuple[Receiver, str], make_sink: SinkFactory, code: int
) -> None:
    _, url = receiver
    sink = make_sink(f"{url}/status/{code}?size=5000000")
    error = await deliver_error(sink)
    assert error.status == code
    assert len(error.detail) <= 500
    assert error.detail.startswith(f"HTTP {code}: EEEE")
    assert error.detail.endswith("...")


async def test_error_details_never_carry_secrets(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    _, url = receiver
    sink = make_sink(
        f"{url}/status/400?echo=1&token=url-secret-42",
        headers={"Authorization": "Bearer downstream-token-123"},
        secrets=[NEW, OLD],
    )
    error = await deliver_error(sink)
    assert isinstance(error, SinkPermanentError)
    assert "[REDACTED]" in error.detail
    for secret in ("downstream-token-123", "url-secret-42", NEW, OLD):
        assert secret not in error.detail
    # The path too: chat-style webhook URLs carry their secret there (the echo quotes it).
    assert "/status/400" not in error.detail

    assert "hook" in repr(sink)
    assert OLD not in repr(sink)


async def test_redirects_are_not_followed(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    rec, url = receiver
    before = len(rec.paths("/verify/old"))
    error = await deliver_error(make_sink(f"{url}/redirect"))
    assert isinstance(error, SinkPermanentError)
    assert error.status == 302
    assert "redirects are not followed" in error.detail
    assert "/verify/old" in error.detail
    assert "should-not-leak" not in error.detail
    assert len(rec.paths("/verify/old")) == before  # nothing went to the target


async def test_timeout_is_retryable(receiver: tuple[Receiver, str], make_sink: SinkFactory) -> None:
    _, url = receiver
    sink = make_sink(f"{url}/slow?s=1.5", timeout=0.3)
    started = time.monotonic()
    error = await deliver_error(sink)
    assert time.monotonic() - started < 1.2
    assert isinstance(error, SinkRetryableError)
    assert error.status is None
    assert "no answer within 0.3s" in error.detail


async def test_one_deadline_bounds_a_dripping_answer(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    _, url = receiver
    # The status decides; the trickling body is cut at the deadline, not waited out.
    assert await timed(make_sink(f"{url}/drip/200", timeout=0.5).deliver(make_delivery())) < 1.5
    error = await deliver_error(make_sink(f"{url}/drip/503", timeout=0.5))
    assert isinstance(error, SinkRetryableError)
    assert error.status == 503
    assert error.detail.startswith("HTTP 503: still going")


async def test_connection_refused_is_retryable(make_sink: SinkFactory) -> None:
    error = await deliver_error(make_sink(f"http://127.0.0.1:{free_port()}/hook"))
    assert isinstance(error, SinkRetryableError)
    assert error.status is None
    assert error.detail.startswith("network error: HttpConnectError")


# --- configuration ---------------------------------------------------------------------


def test_bad_configuration_stops_start_up() -> None:
    def config(**changes: Any) -> HttpSinkConfig:
        values = {"type": "http", "url": "http://127.0.0.1:9/hook", "secret": OLD, **changes}
        return HttpSinkConfig.model_validate(values)

    # A bad whsec_ secret is refused when SINKS is parsed, before any sink exists.
    with pytest.raises(ValidationError, match="not valid base64"):
        config(secret="whsec_***")
    with pytest.raises(ConfigError, match="not a valid header"):
        HttpSink("hook", config(headers={"X-Evil": "a\r\nInjected: 1"}))
    with pytest.raises(ConfigError, match="not a valid header"):
        HttpSink("hook", config(headers={"Bad Name": "x"}))
    # Credentials in the url are sent as Basic auth: not beside another Authorization,
    # and only what Basic auth can encode (each failed on every delivery before).
    with pytest.raises(ConfigError, match="keep one of them"):
        HttpSink(
            "hook",
            config(url="http://u:p@127.0.0.1:9/hook", headers={"Authorization": "Bearer t"}),
        )
    with pytest.raises(ConfigError, match="Latin-1"):
        HttpSink("hook", config(url="http://u:%E2%82%AC@127.0.0.1:9/hook"))
    HttpSink("hook", config(url="http://u:p%C3%A9@127.0.0.1:9/hook"))  # é is Latin-1


async def test_a_given_client_is_used_and_left_open(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    config = HttpSinkConfig.model_validate(
        {"type": "http", "url": f"{url}/verify/old", "secret": OLD, "concurrency": 2}
    )
    async with make_http_client(timeout=5.0, max_connections=2) as client:
        sink = HttpSink("hook", config, client=client)
        assert (sink.name, sink.kind, sink.concurrency) == ("hook", "http", 2)
        await sink.deliver(make_delivery())
        await sink.aclose()
        assert not client.is_closed
    assert rec.paths("/verify/old")[-1].verified_with == "old"


# --- the body and its schema -----------------------------------------------------------


def _is_rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)"
    if not re.fullmatch(pattern, value):
        return False
    datetime.fromisoformat(value)
    return True


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    # jsonschema only checks date-time when rfc3339-validator is installed; do it here.
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time", raises=ValueError)(_is_rfc3339)
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


async def test_emitted_body_validates_against_the_schema(
    receiver: tuple[Receiver, str], make_sink: SinkFactory
) -> None:
    rec, url = receiver
    await make_sink(f"{url}/verify/old").deliver(make_delivery())
    body = json.loads(rec.paths("/verify/old")[-1].body)
    check = validator()
    check.validate(body)
    assert body["order"] == ORDER  # verbatim, unknown fields included
    assert body["id"] == rec.paths("/verify/old")[-1].headers["webhook-id"]

    # A receipt that does not exist yet is null, and still valid.
    check.validate({**body, "order": {**ORDER, "receipt": None}})
    invalid = {
        "extra top-level field": {**body, "extra": 1},
        "wrong type": {**body, "type": "order.created"},
        "no receipt key": {**body, "order": {k: v for k, v in ORDER.items() if k != "receipt"}},
        "receipt without status": {**body, "order": {**ORDER, "receipt": {"id": 1}}},
        "bad timestamp": {**body, "hydrated_at": "02/02/2026 17:46"},
        "order id as text": {**body, "order_id": "184467"},
        "missing notification_ids": {k: v for k, v in body.items() if k != "notification_ids"},
    }
    for name, instance in invalid.items():
        assert not check.is_valid(instance), name
