"""The Clopos v2 stand-in: a FastAPI app over a :class:`SandboxState`.

API routes (under ``/open-api``, recorded in ``state.calls``) imitate Clopos: the auth
answers including the historical 200-with-``success:false``, the 401 messages, the 404
envelope, the three rate-limit tiers with ``RateLimit-*`` headers, the receipt embed and the
list parameters. Injected faults and latency apply to them only. Control routes under
``/_sandbox`` (no auth, not recorded) let demos and other processes arrange the sandbox.

All routes are relative to the app, so it works standalone and mounted (e.g. at ``/sandbox``).
An API request goes through one pipeline: limits, then token, then fault, then the handler;
the status decides what the windows count; the call is recorded; then any delay is slept
(``asyncio.sleep``, so a "hang" never blocks the server).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from app.logs import get_logger
from app.sandbox import orders as order_data
from app.sandbox.control import control_router
from app.sandbox.ratelimit import Quota
from app.sandbox.state import CallRecord, SandboxState, TokenInfo

log = get_logger("app.sandbox")

AUTH_FIELDS = ("client_id", "client_secret", "brand", "integrator_id")
RATE_LIMITED_BODY = {
    "success": False,
    "error": "rate_limited",
    "message": "Too many requests. Retry later.",
}
NOT_FOUND_BODY = {"success": False, "error": "resource_not_found", "message": "Order not found"}
TEST_MODE_MESSAGE = "Test integrator cannot access production brand"
# An injected 429 says "retry in a second": a test honouring it must not wait a minute.
INJECTED_RESET_SECONDS = 1


@dataclass
class Answer:
    """A decided response, before it is recorded, delayed and sent."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # Refused by a limiter: not counted as a failed call (tier 2) once more.
    limited: bool = False


def _error(status: int, error: str, message: str, **extra: Any) -> Answer:
    return Answer(status, {"success": False, "error": error, "message": message, **extra})


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _relative_path(request: Request) -> str:
    """The path below the sandbox root, the same standalone and mounted."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class SandboxApi:
    """The API routes' logic; one instance per app, bound to one state."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state

    # --- shared plumbing -----------------------------------------------------------

    async def respond(self, request: Request, arrived: float, answer: Answer) -> Response:
        """Record the call, sleep any delay, send the answer."""
        # Mounted apps get no lifespan events: a request is where the server loop is seen,
        # so notifications scheduled from other threads can run on it.
        self.state.notifier.bind(asyncio.get_running_loop())
        self.state.record_call(
            CallRecord(
                time=arrived,
                method=request.method,
                path=_relative_path(request),
                query=dict(request.query_params),
                headers={k.lower(): v for k, v in request.headers.items()},
                status=answer.status,
            )
        )
        delay = answer.delay + self.state.latency_seconds
        if delay > 0:
            await asyncio.sleep(delay)
        return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

    def fault_answer(self, kind: str, route: str, limit: int) -> Answer | None:
        """The answer an injected fault gives; None for "hang" (slow, then normal)."""
        if kind == "500":
            return _error(500, "server_error", "Internal server error")
        if kind == "504":
            answer = _error(504, "gateway_timeout", "The upstream service did not respond")
            answer.delay = self.state.gateway_delay_seconds
            return answer
        if kind == "429":
            answer = Answer(429, dict(RATE_LIMITED_BODY))
            answer.headers = Quota(limit, 0, INJECTED_RESET_SECONDS).headers()
            return answer
        if kind == "401":
            message = "Invalid credentials" if route == "auth" else "Invalid token"
            return _error(401, "unauthorized", message)
        if kind == "404":
            # As Clopos answers for what is not in the targeted brand and venue (e.g. a
            # list with an x-venue the token may not read).
            return _error(404, "resource_not_found", "Not found")
        if kind == "success_false":
            message = TEST_MODE_MESSAGE if route == "auth" else "The request could not be completed"
            return Answer(200, {"success": False, "message": message})
        return None

    # --- POST /v2/auth -------------------------------------------------------------

    async def auth(self, request: Request) -> Response:
        arrived = self.state.clock()
        allowed, quota = self.state.take_auth_slot(_client_ip(request))
        if not allowed:
            answer = Answer(429, dict(RATE_LIMITED_BODY), limited=True)
        else:
            answer = await self._auth_answer(request, quota.limit)
        answer.headers = {**quota.headers(), **answer.headers}
        return await self.respond(request, arrived, answer)

    async def _auth_answer(self, request: Request, limit: int) -> Answer:
        kind = self.state.take_fault("auth")
        hang = 0.0
        if kind is not None:
            faulted = self.fault_answer(kind, "auth", limit)
            if faulted is not None:
                return faulted
            hang = self.state.hang_seconds
        answer = self._authenticate(await _json_body(request))
        answer.delay += hang
        return answer

    def _authenticate(self, body: Any) -> Answer:
        if not isinstance(body, dict):
            return _error(400, "validation_failed", "The request body must be a JSON object.")
        for name in AUTH_FIELDS:
            if not isinstance(body.get(name), str) or not body[name]:
                return _error(400, "validation_failed", f"The {name} field is required.")
        if not self.state.known_integrator(body["integrator_id"]):
            return _error(400, "invalid_parameter", "Invalid integrator_id")
        client = self.state.client(body["client_id"])
        if (
            client is None
            or not hmac.compare_digest(client.client_secret, body["client_secret"])
            or client.brand != body["brand"]
            or client.integrator_id != body["integrator_id"]
            or client.rejected
        ):
            return _error(401, "unauthorized", "Invalid credentials")
        if client.test_mode:
            # Clopos's historical quirk: a refusal with status 200.
            return Answer(200, {"success": False, "message": TEST_MODE_MESSAGE})
        token, info = self.state.issue_token(client.client_id)
        log.info("sandbox.auth.issued", brand=info.brand, venue_id=info.venue_id)
        return Answer(
            200,
            {
                "success": True,
                "token": token,
                "token_type": "Bearer",
                "expires_in": int(self.state.token_ttl_seconds),
                "expires_at": int(info.expires_at),
                "message": "Authentication successful",
            },
        )

    # --- authenticated routes ------------------------------------------------------

    async def authenticated(
        self, request: Request, handler: Callable[[Request, TokenInfo], Answer]
    ) -> Response:
        """Tier 2, token, tier 3, fault, handler; then count, add headers, record, answer."""
        arrived = self.state.clock()
        ip = _client_ip(request)
        tenant: str | None = None
        answer: Answer
        refused = self.state.failed_limit_reached(ip)
        if refused is not None:
            answer = Answer(429, dict(RATE_LIMITED_BODY), refused.headers(), limited=True)
            return await self.respond(request, arrived, answer)
        token_answer, info = self._check_token(request.headers.get("x-token"))
        if info is None:
            answer = token_answer or _error(401, "unauthorized", "Invalid token")
        else:
            tenant = info.tenant
            answer = await self._tenant_answer(request, info, handler)
        if answer.status >= 400 and not answer.limited:
            self.state.record_failure(ip)
        if not answer.headers:
            answer.headers = self.state.api_quota(ip, tenant).headers()
        return await self.respond(request, arrived, answer)

    def _check_token(self, token: str | None) -> tuple[Answer | None, TokenInfo | None]:
        if not token:
            return _error(401, "unauthorized", "Headers are missing"), None
        info = self.state.token_info(token)
        if info is None:
            return _error(401, "unauthorized", "Invalid token"), None
        if self.state.clock() >= info.expires_at:
            expired = _error(
                401, "unauthorized", "Token expired", expires_at=order_data.iso(info.expires_at)
            )
            return expired, None
        return None, info

    async def _tenant_answer(
        self, request: Request, info: TokenInfo, handler: Callable[[Request, TokenInfo], Answer]
    ) -> Answer:
        allowed, quota = self.state.take_tenant_slot(info.tenant)
        if not allowed:
            return Answer(429, dict(RATE_LIMITED_BODY), quota.headers(), limited=True)
        kind = self.state.take_fault("orders")
        hang = 0.0
        if kind is not None:
            faulted = self.fault_answer(kind, "orders", quota.limit)
            if faulted is not None:
                return faulted
            hang = self.state.hang_seconds
        answer = handler(request, info)
        answer.delay += hang
        return answer

    # --- handlers (called with a valid token and a tier-3 slot) ---------------------

    def order_detail(self, request: Request, info: TokenInfo) -> Answer:
        venue = _venue(request, info)
        if isinstance(venue, Answer):
            return venue
        try:
            order_id = int(request.path_params["order_id"])
        except ValueError:
            return _error(400, "invalid_parameter", "The id must be an integer.")
        order = self.state.get_order(order_id)
        if order is None or order.get("venue_id") != venue:
            return Answer(404, dict(NOT_FOUND_BODY))
        fields = order_data.receipt_fields(request.query_params.multi_items())
        return Answer(200, {"success": True, "data": order_data.view(order, fields)})

    def order_list(self, request: Request, info: TokenInfo) -> Answer:
        venue = _venue(request, info)
        if isinstance(venue, Answer):
            return venue
        try:
            query = order_data.ListQuery.parse(request.query_params.multi_items())
        except ValueError as exc:
            return _error(400, "invalid_parameter", str(exc))
        data, total = query.apply(self.state.orders_in_venue(venue))
        last_page = max(1, -(-total // query.limit))
        body = {
            "success": True,
            "data": data,
            "total": total,
            "page": query.page,
            "limit": query.limit,
            "last_page": last_page,
        }
        return Answer(200, body)

    async def unknown_route(self, request: Request) -> Response:
        answer = _error(404, "not_found", "Route not found")
        return await self.respond(request, self.state.clock(), answer)


def _venue(request: Request, info: TokenInfo) -> int | Answer:
    """The token's venue, or the one ``x-venue`` names for this request."""
    raw = request.headers.get("x-venue")
    if raw is None or raw.strip() == "":
        return info.venue_id
    try:
        return int(raw)
    except ValueError:
        return _error(400, "invalid_parameter", "The x-venue header must be a venue id.")


async def _json_body(request: Request) -> Any:
    """The parsed JSON body, or None when it is not JSON."""
    try:
        return json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        return None


def create_sandbox_app(state: SandboxState) -> FastAPI:
    """A fresh app over ``state``: API routes under ``/open-api``, control under ``/_sandbox``."""
    app = FastAPI(title="Clopos v2 sandbox", docs_url=None, redoc_url=None, openapi_url=None)
    api = SandboxApi(state)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # `clopos-hydrator sandbox` serves this app on the service's own port: a client
        # that hangs up mid-body is no server error (no 500, no ERROR traceback), and the
        # request, never fully received, has changed nothing. 499 is for the access log.
        log.info("sandbox.client_disconnected", path=request.url.path)
        return Response(status_code=499)

    @app.post("/open-api/v2/auth")
    async def auth(request: Request) -> Response:
        return await api.auth(request)

    @app.get("/open-api/v2/orders/{order_id}")
    async def order_detail(request: Request, order_id: str) -> Response:
        return await api.authenticated(request, api.order_detail)

    @app.get("/open-api/v2/orders")
    async def order_list(request: Request) -> Response:
        return await api.authenticated(request, api.order_list)

    @app.api_route("/open-api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(request: Request, rest: str) -> Response:
        return await api.unknown_route(request)

    app.include_router(control_router(state))
    return app
