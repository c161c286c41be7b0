"""CloposClient and its transport, against the Clopos sandbox over real HTTP on loopback.

The sandbox, the client and the budget share one fake clock, so token expiry and rate
windows are driven by the test; the budget's fake sleep advances that clock instead of
waiting. Calls that must not overlap a fake-clock jump are made one after another.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import structlog
from multidict import CIMultiDict

from app.clopos.budget import LocalRateBudget
from app.clopos.client import (
    RECEIPT_QUERY,
    RECEIPT_WITH,
    CloposClient,
    OrdersPage,
    _error_for,
    _token_lifetime,
)
from app.errors import (
    CloposCredentialsRejected,
    CloposNotFound,
    CloposPermanentError,
    CloposRateLimited,
    CloposTransientError,
    CloposUnauthorized,
    HttpConnectError,
    HttpTimeout,
)
from app.http_client import HttpAnswer, HttpClient, make_http_client
from app.logs import MASK, configure_logging
from app.sandbox import (
    DEFAULT_BRAND,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_INTEGRATOR_ID,
    SandboxState,
    create_sandbox_app,
)
from app.settings import BrandConfig
from tests.clock import FakeClock
from tests.servers import ServerThread, free_port

ORDERS = "/open-api/v2/orders"
ORDER = "/open-api/v2/orders/"
BRAND = BrandConfig(
    brand=DEFAULT_BRAND,
    client_id=DEFAULT_CLIENT_ID,
    client_secret=DEFAULT_CLIENT_SECRET,
    integrator_id=DEFAULT_INTEGRATOR_ID,
)

CREDENTIALS = {
    "client_id": DEFAULT_CLIENT_ID,
    "client_secret": DEFAULT_CLIENT_SECRET,
    "brand": DEFAULT_BRAND,
    "integrator_id": DEFAULT_INTEGRATOR_ID,
}


@dataclass
class Sandbox:
    state: SandboxState
    base: str  # the client's base URL, <server>/open-api
    server: ServerThread


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox(clock: FakeClock) -> Iterator[Sandbox]:
    state = SandboxState(clock=clock)
    with ServerThread(create_sandbox_app(state)) as server:
        yield Sandbox(state, f"{server.url}/open-api", server)


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    async with make_http_client(timeout=5.0, max_connections=16) as client:
        yield client


def make_client(
    sandbox: Sandbox,
    http: HttpClient,
    clock: FakeClock,
    *,
    per_minute: int = 10_000,
    brand: BrandConfig = BRAND,
    **kwargs: Any,
) -> CloposClient:
    budget = LocalRateBudget(per_minute, clock=clock, sleep=clock.sleep)
    return CloposClient(
        brand, base_url=sandbox.base, http=http, budget=budget, clock=clock, **kwargs
    )


def gets(sandbox: Sandbox) -> list[Any]:
    return [c for c in sandbox.state.calls if c.path.startswith(ORDERS)]


# --- token ------------------------------------------------------------------------------


async def test_one_auth_for_many_concurrent_requests(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    orders = await asyncio.gather(*(client.get_order(1001 + i % 5) for i in range(40)))
    assert {o["id"] for o in orders} == {1001, 1002, 1003, 1004, 1005}
    assert sandbox.state.auth_calls() == 1
    assert client.auth_calls == 1
    assert sandbox.state.count(ORDER, status=200) == 40
    tokens = {c.headers["x-token"] for c in gets(sandbox)}
    assert len(tokens) == 1
    assert client.calls_by_status == {"200": 40}


async def test_token_refreshed_shortly_before_expiry(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    await client.authenticate()
    expires_at = client.token_expires_at
    assert expires_at is not None
    assert expires_at == pytest.approx(clock.now + 3600, abs=1)

    clock.now = expires_at - 90  # outside the 60 s margin: keep the token
    await client.get_order(1001)
    assert sandbox.state.auth_calls() == 1

    clock.now = expires_at - 30  # inside it: refresh before calling, no 401 first
    await client.get_order(1001)
    assert sandbox.state.auth_calls() == 2
    assert sandbox.state.count(status=401) == 0
    first, second = (c.headers["x-token"] for c in gets(sandbox))
    assert first != second
    assert client.token_expires_at == pytest.approx(clock.now + 3600, abs=1)


async def test_short_lived_token_refreshes_at_ten_percent(
    clock: FakeClock, http: HttpClient
) -> None:
    state = SandboxState(clock=clock, token_ttl_seconds=120)
    with ServerThread(create_sandbox_app(state)) as server:
        sandbox = Sandbox(state, f"{server.url}/open-api", server)
        client = make_client(sandbox, http, clock)
        await client.authenticate()
        clock.now += 100  # 20 s left: more than 10 % (12 s), keep it
        await client.authenticate()
        assert state.auth_calls() == 1
        clock.now += 10  # 10 s left: refresh
        await client.authenticate()
        assert state.auth_calls() == 2


async def test_expired_tokens_cause_a_single_reauth(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    await client.get_order(1001)
    sandbox.state.expire_tokens()
    sandbox.state.reset_counters()

    orders = await asyncio.gather(*(client.get_order(1001) for _ in range(10)))

    assert all(o["id"] == 1001 for o in orders)
    assert sandbox.state.auth_calls() == 1  # one refresh for ten refused requests
    assert client.auth_calls == 2
    assert sandbox.state.count(ORDER, status=401) == 10  # each retried once...
    assert sandbox.state.count(ORDER, status=200) == 10  # ...and only once


async def test_401_twice_is_unauthorized_not_a_loop(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    sandbox.state.inject("401", count=5)
    with pytest.raises(CloposUnauthorized) as caught:
        await client.get_order(1001)
    assert not isinstance(caught.value, CloposCredentialsRejected)
    assert caught.value.status == 401
    assert len(gets(sandbox)) == 2
    assert sandbox.state.auth_calls() == 2


# --- credentials and the auth floor -----------------------------------------------------


async def test_rejected_credentials_raise_distinctly_without_auth_storm(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    sandbox.state.reject_credentials(DEFAULT_CLIENT_ID)
    for _ in range(20):
        with pytest.raises(CloposCredentialsRejected) as caught:
            await client.get_order(1001)
        assert caught.value.status == 401
    assert sandbox.state.auth_calls() == 1  # remembered for the cool-down
    assert gets(sandbox) == []  # and no API call made without a token

    clock.now += 61  # cool-down over: one new attempt, still refused
    with pytest.raises(CloposCredentialsRejected):
        await client.authenticate()
    assert sandbox.state.auth_calls() == 2

    sandbox.state.reject_credentials(DEFAULT_CLIENT_ID, on=False)
    clock.now += 61
    await client.authenticate()  # the paused brand's probe succeeds
    assert (await client.get_order(1001))["id"] == 1001


async def test_success_false_at_auth_is_a_rejection(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    sandbox.state.add_client(
        "test-client", "test-client-secret", "prod-brand", DEFAULT_INTEGRATOR_ID, test_mode=True
    )
    brand = BrandConfig(
        brand="prod-brand",
        client_id="test-client",
        client_secret="test-client-secret",
        integrator_id=DEFAULT_INTEGRATOR_ID,
    )
    client = make_client(sandbox, http, clock, brand=brand)
    for _ in range(5):
        with pytest.raises(CloposCredentialsRejected) as caught:
            await client.get_order(1001)
        assert caught.value.status == 200
        assert "production" in caught.value.message
    assert sandbox.state.auth_calls() == 1


async def test_invalid_integrator_400_is_a_rejection(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    brand = BRAND.model_copy(update={"integrator_id": "no-such-integrator"})
    client = make_client(sandbox, http, clock, brand=brand)
    with pytest.raises(CloposCredentialsRejected) as caught:
        await client.authenticate()
    assert caught.value.status == 400


async def test_auth_floor_caps_attempts_whatever_happens(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    sandbox.state.inject("500", count=100, route="auth")
    outcomes = []
    for _ in range(25):
        with pytest.raises((CloposTransientError, CloposRateLimited)) as caught:
            await client.get_order(1001)
        outcomes.append(type(caught.value))
    # Default floor: 10 auth attempts per minute, a sixth of Clopos's 60/min per IP.
    assert outcomes[:10] == [CloposTransientError] * 10
    assert outcomes[10:] == [CloposRateLimited] * 15
    assert sandbox.state.auth_calls() == 10
    clock.now += 61
    with pytest.raises(CloposTransientError):
        await client.authenticate()
    assert sandbox.state.auth_calls() == 11


async def test_waiters_share_a_failed_auth_attempt(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    sandbox.state.inject("500", route="auth")
    results = await asyncio.gather(
        *(client.get_order(1001) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, CloposTransientError) for r in results)
    assert sandbox.state.auth_calls() == 1
    assert (await client.get_order(1001))["id"] == 1001  # the next caller tries again
    assert sandbox.state.auth_calls() == 2


async def test_auth_429_is_waited_out_without_new_calls(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    sandbox.state.inject("429", route="auth")
    with pytest.raises(CloposRateLimited) as caught:
        await client.authenticate()
    assert caught.value.retry_after >= 1
    with pytest.raises(CloposRateLimited):
        await client.authenticate()
    assert sandbox.state.auth_calls() == 1
    clock.now += caught.value.retry_after
    await client.authenticate()
    assert sandbox.state.auth_calls() == 2


# --- budget -----------------------------------------------------------------------------


async def test_no_request_beyond_the_budget(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock, per_minute=3)
    start = clock.now
    for _ in range(10):  # sequential: the fake clock must not jump under an in-flight call
        await client.get_order(1001)
    times = [c.time for c in gets(sandbox)]
    assert len(times) == 10
    per_window = max(sum(1 for t in times if s <= t < s + 60) for s in times)
    assert per_window == 3
    assert clock.now - start >= 180  # 10 calls at 3/min
    assert sandbox.state.rate_limited() == 0


async def test_429_from_another_replica_is_honoured(clock: FakeClock, http: HttpClient) -> None:
    state = SandboxState(clock=clock, tenant_limit_per_minute=5)
    with ServerThread(create_sandbox_app(state)) as server:
        sandbox = Sandbox(state, f"{server.url}/open-api", server)
        # Another process on the same tenant, not sharing our budget, uses the window up.
        async with httpx.AsyncClient() as other:
            auth = await other.post(f"{sandbox.base}/v2/auth", json=CREDENTIALS)
            token = auth.json()["token"]
            for _ in range(5):
                r = await other.get(f"{sandbox.base}/v2/orders/1001", headers={"x-token": token})
                assert r.status_code == 200
        client = make_client(sandbox, http, clock)
        with pytest.raises(CloposRateLimited) as caught:
            await client.get_order(1002)
        limited_at = clock.now
        assert caught.value.retry_after == pytest.approx(60, abs=1)

        order = await client.get_order(1002)  # the budget holds it until the reset

        assert order["id"] == 1002
        mine = [c for c in gets(sandbox) if c.path.endswith("/1002")]
        assert [c.status for c in mine] == [429, 200]
        assert mine[1].time >= limited_at + caught.value.retry_after
        assert state.rate_limited() == 1
        assert client.calls_by_status == {"429": 1, "200": 1}


async def test_injected_429_no_call_before_reset(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    await client.get_order(1001)
    sandbox.state.inject("429")
    with pytest.raises(CloposRateLimited) as caught:
        await client.get_order(1001)
    assert caught.value.retry_after == 1
    limited = gets(sandbox)[-1]
    assert limited.status == 429
    await client.get_order(1001)
    after = gets(sandbox)[-1]
    assert after.status == 200
    assert after.time >= limited.time + 1
    assert len(gets(sandbox)) == 3


# --- the order call ---------------------------------------------------------------------


async def test_order_verbatim_with_receipt_and_unknown_fields(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    order = await client.get_order(1001)
    assert order["x_extra"] == {"kept": True}
    assert set(order["receipt"]) == {"id", "service_notification_id", "status"}
    assert (await client.get_order(1002))["receipt"] is None
    # Exactly what the server sent: compare with the raw body fetched independently.
    token = gets(sandbox)[0].headers["x-token"]
    raw = await http.request(
        "GET", f"{sandbox.base}/v2/orders/1001?{RECEIPT_QUERY}", headers={"x-token": token}
    )
    assert order == raw.json()["data"]
    assert gets(sandbox)[0].query == {"with[0]": RECEIPT_WITH}


async def test_x_venue_sent_when_known(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    sandbox.state.put_order({"id": 7001, "venue_id": 2})
    client = make_client(sandbox, http, clock)
    with pytest.raises(CloposNotFound):
        await client.get_order(7001)  # not in the token's default venue
    assert (await client.get_order(7001, venue_id="2"))["venue_id"] == 2
    without, with_venue = gets(sandbox)
    assert "x-venue" not in without.headers
    assert with_venue.headers["x-venue"] == "2"


async def test_success_false_is_an_error_not_retried(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    client = make_client(sandbox, http, clock)
    sandbox.state.inject("success_false")
    # An error (never data), retryable later by the worker, not by the client.
    with pytest.raises(CloposTransientError) as caught:
        await client.get_order(1001)
    assert caught.value.status == 200
    assert len(gets(sandbox)) == 1


@pytest.mark.parametrize(("fault", "status"), [("500", 500), ("504", 504)], ids=["500", "504"])
async def test_server_errors_are_transient_and_not_retried(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock, fault: str, status: int
) -> None:
    client = make_client(sandbox, http, clock)
    sandbox.state.inject(fault)
    with pytest.raises(CloposTransientError) as caught:
        await client.get_order(1001)
    assert caught.value.status == status
    assert len(gets(sandbox)) == 1
    assert client.calls_by_status == {str(status): 1}


async def test_not_found(sandbox: Sandbox, http: HttpClient, clock: FakeClock) -> None:
    client = make_client(sandbox, http, clock)
    with pytest.raises(CloposNotFound) as caught:
        await client.get_order(999_999)
    assert caught.value.error == "resource_not_found"
    assert len(gets(sandbox)) == 1


async def test_list_orders(sandbox: Sandbox, http: HttpClient, clock: FakeClock) -> None:
    client = make_client(sandbox, http, clock)
    page = await client.list_orders(limit=2)
    assert isinstance(page, OrdersPage)
    assert (page.page, page.limit, page.total) == (1, 2, 5)
    assert len(page.orders) == 2
    assert all("receipt" in o and o["x_extra"] == {"kept": True} for o in page.orders)
    stamps = [o["updated_at"] for o in page.orders]
    assert stamps == sorted(stamps, reverse=True)
    assert gets(sandbox)[0].query == {
        "page": "1",
        "limit": "2",
        "sort[0]": "updated_at",
        "sort[1]": "-1",
        "with[0]": RECEIPT_WITH,
    }
    ascending = await client.list_orders(page=2, limit=2, sort_by="id", descending=False)
    assert [o["id"] for o in ascending.orders] == [1003, 1004]


async def test_list_orders_filters_and_venue(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock
) -> None:
    sandbox.state.put_order({"id": 7001, "venue_id": 2, "status": "PENDING"})
    client = make_client(sandbox, http, clock)
    day = datetime.fromtimestamp(clock.now, UTC).date()
    page = await client.list_orders(
        status="PENDING", date_from=day, date_to=day.isoformat(), venue_id="2"
    )
    assert [o["id"] for o in page.orders] == [7001]
    call = gets(sandbox)[0]
    assert call.headers["x-venue"] == "2"
    assert call.query["status"] == "PENDING"
    assert call.query["date[0]"] == call.query["date[1]"] == day.isoformat()


# --- timeouts and connection failures ---------------------------------------------------


async def test_hung_upstream_is_cut_off_by_the_timeout(sandbox: Sandbox, clock: FakeClock) -> None:
    sandbox.state.hang_seconds = 3.0
    async with make_http_client(timeout=0.4, max_connections=4) as http:
        client = make_client(sandbox, http, clock)
        await client.authenticate()
        sandbox.state.inject("hang")
        started = time.monotonic()
        with pytest.raises(CloposTransientError):
            await client.get_order(1001)
        assert time.monotonic() - started < 1.5
        assert client.calls_by_status == {"timeout": 1}
        assert (await client.get_order(1002))["id"] == 1002  # the pool is still usable


async def test_transport_itself_honours_the_read_timeout(sandbox: Sandbox) -> None:
    """The HTTP client itself cuts a hung exchange at its deadline."""
    sandbox.state.hang_seconds = 3.0
    sandbox.state.inject("hang", route="auth")
    async with make_http_client(timeout=0.4, max_connections=4) as http:
        started = time.monotonic()
        with pytest.raises(HttpTimeout):
            await http.request("POST", f"{sandbox.base}/v2/auth", headers={}, body=b"{}")
        assert time.monotonic() - started < 1.5


async def test_refused_connection_is_a_connect_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/open-api"
    async with make_http_client(timeout=2.0, max_connections=4) as http:
        with pytest.raises(HttpConnectError):  # not a timeout
            await http.request("GET", url, headers={})
        budget = LocalRateBudget(100)
        client = CloposClient(BRAND, base_url=url, http=http, budget=budget)
        with pytest.raises(CloposTransientError):
            await client.authenticate()


async def test_server_gone_mid_life_counts_connect_error(
    clock: FakeClock, http: HttpClient
) -> None:
    state = SandboxState(clock=clock)
    server = ServerThread(create_sandbox_app(state)).start()
    sandbox = Sandbox(state, f"{server.url}/open-api", server)
    client = make_client(sandbox, http, clock)
    await client.get_order(1001)
    server.stop()
    with pytest.raises(CloposTransientError):
        await client.get_order(1001)
    assert set(client.calls_by_status) == {"200"} | (
        set(client.calls_by_status) & {"connect_error", "transport_error"}
    )
    assert len(client.calls_by_status) == 2


# --- logs -------------------------------------------------------------------------------


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(fmt="json", level="debug", secrets=[DEFAULT_CLIENT_SECRET], stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []
    logging.getLogger().setLevel(logging.WARNING)


async def test_secrets_and_tokens_never_logged(
    sandbox: Sandbox, http: HttpClient, clock: FakeClock, captured_logs: io.StringIO
) -> None:
    client = make_client(sandbox, http, clock)
    await client.get_order(1001)
    sandbox.state.expire_tokens()
    await client.get_order(1002)
    with pytest.raises(CloposNotFound):
        await client.get_order(424_242)
    sandbox.state.reject_credentials(DEFAULT_CLIENT_ID)
    sandbox.state.expire_tokens()
    with pytest.raises(CloposCredentialsRejected):
        await client.get_order(1001)

    output = captured_logs.getvalue()
    tokens = {c.headers["x-token"] for c in gets(sandbox)}
    assert len(tokens) == 2
    assert DEFAULT_CLIENT_SECRET not in output
    assert all(token not in output for token in tokens)
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    ours = [e for e in events if e.get("logger") == "app.clopos"]
    names = [e["event"] for e in ours]
    assert names.count("clopos.auth.ok") == 2
    assert "clopos.auth.rejected" in names
    assert names.count("clopos.request") == 5
    assert all(e["brand"] == DEFAULT_BRAND for e in ours)
    # Nothing of ours needed masking: we never tried to log a secret.
    assert not any(MASK in json.dumps(e) for e in ours)


# --- pure parts -------------------------------------------------------------------------


def _response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> HttpAnswer:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpAnswer(status, "", CIMultiDict(headers or {}), content, "/v2/orders/1")


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, {"success": False}, CloposTransientError),
        (502, b"<html>bad gateway</html>", CloposTransientError),
        (504, {"success": False, "error": "gateway_timeout"}, CloposTransientError),
        (408, b"", CloposTransientError),
        (404, {"success": False, "error": "resource_not_found"}, CloposNotFound),
        (401, {"success": False, "message": "Token expired"}, CloposUnauthorized),
        (400, {"success": False, "error": "validation_failed"}, CloposPermanentError),
        (403, {"success": False}, CloposPermanentError),
        (422, {"success": False}, CloposPermanentError),
        (200, b"not json", CloposPermanentError),
        (200, ["a", "list"], CloposPermanentError),
        (200, {"success": False, "message": "nope"}, CloposTransientError),
        (200, {"success": False, "error": "token_expired"}, CloposUnauthorized),
        (302, b"", CloposPermanentError),
    ],
)
def test_error_mapping(status: int, body: Any, expected: type[Exception]) -> None:
    error = _error_for(_response(status, body), body if isinstance(body, dict) else None)
    assert type(error) is expected


def test_success_maps_to_no_error() -> None:
    body = {"success": True, "data": {"id": 1}}
    assert _error_for(_response(200, body), body) is None


def test_429_retry_after_takes_the_largest_hint() -> None:
    headers = {"RateLimit-Reset": "17", "Retry-After": "5"}
    error = _error_for(_response(429, {"success": False}, headers), {"success": False})
    assert isinstance(error, CloposRateLimited)
    assert error.retry_after == 17
    bare = _error_for(_response(429, b""), None)
    assert isinstance(bare, CloposRateLimited)
    assert bare.retry_after == 1


@pytest.mark.parametrize(
    ("body", "lifetime"),
    [
        ({"expires_in": 3600, "expires_at": 1_000 + 3600}, 3600),
        ({"expires_in": 3600, "expires_at": 1_000 + 1800}, 1800),  # server clock behind
        ({"expires_in": 3600, "expires_at": 500}, 3600),  # already past on our clock
        ({"expires_at": 1_000 + 600}, 600),
        ({"expires_in": "120"}, 120),
        ({}, 300),
        ({"expires_in": True, "expires_at": "soon"}, 300),
    ],
)
def test_token_lifetime(body: dict[str, Any], lifetime: float) -> None:
    assert _token_lifetime(body, 1_000.0) == lifetime


def test_receipt_query_is_encoded_as_documented() -> None:
    assert RECEIPT_QUERY == "with%5B0%5D=receipt%3Aid%2Cservice_notification_id%2Cstatus"


class RawUpstream:
    """A bare ASGI server: records raw query strings and concurrency, answers orders with
    ``order_body`` after ``delay`` s, or drips it a byte per 0.1 s with ``drip``."""

    def __init__(self) -> None:
        self.queries: list[bytes] = []
        self.order_body: bytes = json.dumps({"success": True, "data": {"id": 9}}).encode()
        self.delay = 0.0
        self.drip = False
        self.active = 0
        self.max_active = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.queries.append(scope["query_string"])
        headers = [(b"content-type", b"application/json")]
        if scope["path"].endswith("/auth"):
            body = {"success": True, "token": "t0k3n-abcdef", "expires_in": 3600}
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if self.drip:
                await self._drip(send)
            await send({"type": "http.response.body", "body": self.order_body})
        except OSError:  # the client hung up (uvicorn's ClientDisconnected)
            return
        finally:
            self.active -= 1

    @staticmethod
    async def _drip(send: Any) -> None:
        for _ in range(30):  # whitespace before the JSON: valid, and never idle 0.4 s
            await send({"type": "http.response.body", "body": b" ", "more_body": True})
            await asyncio.sleep(0.1)


@pytest.fixture
async def raw_client(clock: FakeClock) -> AsyncIterator[tuple[CloposClient, RawUpstream]]:
    upstream = RawUpstream()
    with ServerThread(upstream) as server:
        async with make_http_client(timeout=5, max_connections=2) as http:
            budget = LocalRateBudget(100, clock=clock, sleep=clock.sleep)
            client = CloposClient(BRAND, base_url=server.url, http=http, budget=budget, clock=clock)
            yield client, upstream


async def test_receipt_query_reaches_the_wire_unchanged(
    raw_client: tuple[CloposClient, RawUpstream],
) -> None:
    """The sandbox records decoded query params; a raw ASGI server sees the bytes sent."""
    client, upstream = raw_client
    assert await client.get_order(9) == {"id": 9}
    assert upstream.queries == [b"", RECEIPT_QUERY.encode()]


@pytest.mark.parametrize(
    "body",
    [b"<html>maintenance</html>", b'{"success": true}', b'{"success": true, "data": [1]}'],
    ids=["not-json", "no-data", "data-not-object"],
)
async def test_unusable_order_answer_is_permanent(
    raw_client: tuple[CloposClient, RawUpstream], body: bytes
) -> None:
    client, upstream = raw_client
    upstream.order_body = body
    with pytest.raises(CloposPermanentError):
        await client.get_order(9)
    assert len(upstream.queries) == 2  # auth + one GET: not retried


async def test_slow_drip_is_cut_off_by_the_total_deadline(clock: FakeClock) -> None:
    """Each read is quick, so only the client's whole-exchange deadline stops it."""
    upstream = RawUpstream()
    upstream.drip = True
    with ServerThread(upstream) as server:
        async with make_http_client(timeout=0.4, max_connections=2) as http:
            budget = LocalRateBudget(100, clock=clock, sleep=clock.sleep)
            client = CloposClient(BRAND, base_url=server.url, http=http, budget=budget, clock=clock)
            started = time.monotonic()
            with pytest.raises(CloposTransientError, match="no answer within"):
                await client.get_order(9)
            assert time.monotonic() - started < 1.5
            assert client.calls_by_status == {"timeout": 1}


async def test_connection_pool_is_bounded(clock: FakeClock) -> None:
    upstream = RawUpstream()
    upstream.delay = 0.1
    with ServerThread(upstream) as server:
        async with make_http_client(timeout=5, max_connections=2) as http:
            budget = LocalRateBudget(10_000, clock=clock, sleep=clock.sleep)
            client = CloposClient(BRAND, base_url=server.url, http=http, budget=budget, clock=clock)
            await asyncio.gather(*(client.get_order(9) for _ in range(6)))
    assert upstream.max_active == 2


def test_rejects_a_bad_order_id() -> None:
    client = CloposClient(
        BRAND,
        base_url="http://x",
        http=make_http_client(timeout=1, max_connections=1),
        budget=LocalRateBudget(1),
    )
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(client.get_order(0))
