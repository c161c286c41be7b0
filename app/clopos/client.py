"""The async Clopos Open API v2 client of one brand.

What it does for its callers (the hydration workers, the poller, the CLI):

- **Token**: ``POST /v2/auth``, cached until shortly before it expires (60 s, or 10 % of
  a short lifetime); one caller refreshes while the others wait on a lock. Sent as
  ``x-token``. A 401 (or a ``success: false`` that names an auth error) on an API call
  refreshes once and retries once.
- **Auth floor**: Clopos allows 60 auth calls per minute per IP, for every brand on it, so
  a brand may make at most ``auth_burst`` attempts per ``auth_window_seconds`` whatever
  happens (beyond that: :class:`~app.errors.CloposRateLimited`, no call), and rejected
  credentials are remembered for ``rejected_cooldown_seconds`` (callers get
  :class:`~app.errors.CloposCredentialsRejected` again without a new call).
- **Budget**: ``budget.acquire(tenant)`` before every API call and ``budget.observe`` after
  every response, 429s included. Auth is tier 1 (per IP), not the tenant's tier 3, so it
  does not draw on the tenant budget; the auth floor bounds it instead.
- **Errors**: every outcome is mapped in one place (:func:`_error_for`) onto the tree of
  ``app.errors``; transport failures are translated where the request is sent (:meth:`_send`).
- **Retries**: none for transient errors. The durable retry layer (the worker, with backoff,
  jitter and a dead letter) owns them; a retry here would only spend budget twice and hide
  the failure from its metrics. The single exception is the 401 refresh-and-retry, which is
  not a retry of a failure but the token protocol.
- **Deadline**: each HTTP exchange (connect, send, wait, read the whole body) is bounded by
  ``timeout`` seconds in total, on top of the per-operation timeouts of the http client.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

from opentelemetry.trace import Tracer

from app import __version__, ids, tracing
from app.clopos.budget import RateBudget, retry_after_seconds
from app.errors import (
    CloposCredentialsRejected,
    CloposError,
    CloposNotFound,
    CloposPermanentError,
    CloposRateLimited,
    CloposTransientError,
    CloposUnauthorized,
    HttpConnectError,
    HttpTimeout,
    HttpTransportError,
    HttpUnsendable,
)
from app.http_client import HttpAnswer, HttpClient
from app.logs import REDACTOR, get_logger
from app.settings import BrandConfig

log = get_logger("app.clopos")

# The receipt embed, as the docs write it and as they encode it on the wire.
RECEIPT_WITH = "receipt:id,service_notification_id,status"
RECEIPT_QUERY = "with%5B0%5D=" + quote(RECEIPT_WITH, safe="")
# Which read a route is, for counting calls (and orders per call) by read.
READS = {"/v2/orders/{id}": "order", "/v2/orders": "order_list"}

# ``error`` ids of a 200 ``success: false`` answer that mean "your token is not good".
_AUTH_ERROR_IDS = frozenset(
    {
        "unauthorized",
        "unauthenticated",
        "invalid_token",
        "token_invalid",
        "token_expired",
        "expired_token",
        "headers_missing",
    }
)
_HEADERS = {"accept": "application/json", "user-agent": f"clopos-hydrator/{__version__}"}
# Lifetime assumed when an auth answer gives no usable expiry (docs: 3600; be cautious).
_FALLBACK_TOKEN_LIFETIME = 300.0
_MAX_REFRESH_MARGIN = 60.0
_MESSAGE_MAX = 200


@dataclass(frozen=True)
class OrdersPage:
    """One page of ``GET /v2/orders``; orders are Clopos's objects verbatim."""

    orders: list[dict[str, Any]]
    total: int | None
    page: int
    limit: int
    # When the request that read this page was sent (our clock, after the budget wait):
    # every change notified before then is on the page, or older than what it lists.
    requested_at: float = 0.0


@dataclass(frozen=True)
class _Rejection:
    """Remembered credential rejection, replayed to callers during the cool-down."""

    until: float
    message: str
    status: int | None
    error: str | None


def _json_object(response: HttpAnswer) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        body = response.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return body if isinstance(body, dict) else None


def _envelope_fields(body: dict[str, Any] | None) -> tuple[str | None, str]:
    """Clopos's ``error`` id and ``message``, bounded, for errors and logs."""
    if body is None:
        return None, ""
    error = body.get("error")
    message = body.get("message")
    return (
        str(error)[:_MESSAGE_MAX] if error is not None else None,
        str(message)[:_MESSAGE_MAX] if message is not None else "",
    )


def _looks_like_auth(body: dict[str, Any] | None) -> bool:
    """A 2xx ``success: false`` whose ``error`` id says the token was refused."""
    if body is None or body.get("success") is not False:
        return False
    error = str(body.get("error") or "").lower()
    return error in _AUTH_ERROR_IDS


def _error_for(response: HttpAnswer, body: dict[str, Any] | None) -> CloposError | None:
    """THE mapping of an API answer onto ``app.errors``; None when it is a usable success."""
    status = response.status
    error, message = _envelope_fields(body)
    text = message or response.reason or f"HTTP {status}"
    if 200 <= status < 300:
        if body is None:
            return CloposPermanentError("response is not a JSON object", status=status)
        if body.get("success") is False:
            if _looks_like_auth(body):
                return CloposUnauthorized(text, status=status, error=error)
            # The documented 200-with-success:false is an auth quirk; on an API route
            # its meaning is undocumented. Treated as an error worth retrying with
            # backoff (it ends in a dead letter if it persists), never as data.
            return CloposTransientError(text, status=status, error=error)
        return None
    if status == 429:
        return CloposRateLimited(text, retry_after=retry_after_seconds(response.headers))
    if status == 404:
        return CloposNotFound(text, status=status, error=error)
    if status == 401:
        return CloposUnauthorized(text, status=status, error=error)
    # 408 is a timeout some proxy gave up on: as retryable as our own timeout.
    if status >= 500 or status == 408:
        return CloposTransientError(text, status=status, error=error)
    return CloposPermanentError(text, status=status, error=error)


def _positive_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _token_lifetime(body: dict[str, Any], now: float) -> float:
    """Seconds the token is good for, from ``expires_in`` and ``expires_at``, skew-safe.

    Both are used when present and the shorter wins, so a server clock ahead of ours does
    not make us keep a dead token; an ``expires_at`` already past on our clock (our clock
    ahead) is ignored rather than causing an auth call per request.
    """
    candidates: list[float] = []
    expires_in = _positive_number(body.get("expires_in"))
    if expires_in is not None:
        candidates.append(expires_in)
    expires_at = _positive_number(body.get("expires_at"))
    if expires_at is not None and expires_at > now:
        candidates.append(expires_at - now)
    return min(candidates) if candidates else _FALLBACK_TOKEN_LIFETIME


def _replay(error: CloposError) -> CloposError:
    """A fresh exception like ``error``, for callers that share the outcome of one attempt."""
    if isinstance(error, CloposRateLimited):
        return CloposRateLimited(error.message, retry_after=error.retry_after, status=error.status)
    return type(error)(error.message, status=error.status, error=error.error)


def _check_venue(venue_id: str | None) -> None:
    """A venue goes out as the x-venue header: only its canonical id string may."""
    if venue_id is not None and ids.parse_venue_id(venue_id) != venue_id:
        raise ValueError(f"not a venue id: {venue_id!r}")


def _day(value: date | str) -> str:
    return value.isoformat() if isinstance(value, date) else value


def _orders_total(body: dict[str, Any]) -> int | None:
    """The list's total, wherever this page of the docs put it."""
    for holder in (body, body.get("meta"), body.get("pagination")):
        if isinstance(holder, dict):
            total = holder.get("total")
            if isinstance(total, int) and not isinstance(total, bool):
                return total
    return None


class CloposClient:
    """Clopos v2 for one brand. Safe to share between tasks of one event loop."""

    def __init__(
        self,
        brand: BrandConfig,
        *,
        base_url: str,
        http: HttpClient,
        budget: RateBudget,
        clock: Callable[[], float] = time.time,
        timeout: float | None = None,
        auth_burst: int = 10,
        auth_window_seconds: float = 60.0,
        rejected_cooldown_seconds: float = 60.0,
        budget_wait_limit: float = 30.0,
        tracer: Tracer | None = None,
    ) -> None:
        self.brand = brand
        self._base = base_url.rstrip("/")
        self._http = http
        self._budget = budget
        self._clock = clock
        # Total deadline of one exchange; by default the http client's own (always > 0).
        self._timeout = timeout or http.timeout
        self._auth_burst = auth_burst
        self._auth_window = auth_window_seconds
        self._rejected_cooldown = rejected_cooldown_seconds
        self._budget_wait_limit = budget_wait_limit
        self._tracer = tracer  # None unless tracing is on: a span per API call

        self.auth_calls = 0
        self.calls_by_status: dict[str, int] = {}
        # API requests sent, by read: "order" (GET /v2/orders/{id}), "order_list".
        self.calls_by_read: dict[str, int] = {"order": 0, "order_list": 0}

        self._token: str | None = None
        self._expires_at: float | None = None
        self._refresh_at = -math.inf
        self._auth_lock = asyncio.Lock()
        self._auth_attempts: deque[float] = deque()
        self._auth_not_before = -math.inf
        self._rejection: _Rejection | None = None
        # Attempts finished, and the error of the last one: shared with callers that waited.
        self._auth_finished = 0
        self._last_auth_error: CloposError | None = None

    @property
    def token_expires_at(self) -> float | None:
        """When the cached token expires (on ``clock``), None before the first auth."""
        return self._expires_at

    # --- public API ------------------------------------------------------------------

    async def authenticate(self) -> None:
        """Make sure a valid token is cached (authenticating if needed).

        Raises CloposCredentialsRejected when Clopos refuses the credentials (also during
        the cool-down after a refusal, without a call): the probe for a paused brand.
        """
        await self._ensure_token()

    async def get_order(self, order_id: int, venue_id: str | None = None) -> dict[str, Any]:
        """``GET /v2/orders/{id}`` with the receipt embedded; Clopos's ``data`` verbatim."""
        if not ids.is_order_id(order_id):
            raise ValueError(
                f"order_id must be a positive integer of at most 18 digits: {order_id!r}"
            )
        _check_venue(venue_id)
        url = f"{self._base}/v2/orders/{order_id}?{RECEIPT_QUERY}"
        body, _ = await self._api_get(url, venue_id, route="/v2/orders/{id}")
        data = body.get("data")
        if not isinstance(data, dict):
            raise CloposPermanentError("response has no 'data' object", status=200)
        return data

    async def list_orders(
        self,
        *,
        page: int = 1,
        limit: int = 50,
        sort_by: str = "updated_at",
        descending: bool = True,
        status: str | None = None,
        date_from: date | str | None = None,
        date_to: date | str | None = None,
        with_receipt: bool = True,
        venue_id: str | None = None,
    ) -> OrdersPage:
        """``GET /v2/orders``: one page, sorted; dates are inclusive ``YYYY-MM-DD``.

        Orders come with their receipt embedded unless ``with_receipt`` is false; without
        ``venue_id`` the token's default venue is listed.
        """
        if page < 1 or not 1 <= limit <= 200:
            raise ValueError("page must be >= 1 and limit within 1..200")
        _check_venue(venue_id)
        pairs = [
            ("page", str(page)),
            ("limit", str(limit)),
            ("sort[0]", sort_by),
            ("sort[1]", "-1" if descending else "1"),
        ]
        if status is not None:
            pairs.append(("status", status))
        if date_from is not None:
            pairs.append(("date[0]", _day(date_from)))
        if date_to is not None:
            pairs.append(("date[1]", _day(date_to)))
        if with_receipt:
            pairs.append(("with[0]", RECEIPT_WITH))
        url = f"{self._base}/v2/orders?{urlencode(pairs, quote_via=quote)}"
        body, sent_at = await self._api_get(url, venue_id, route="/v2/orders")
        data = body.get("data")
        if not isinstance(data, list) or not all(isinstance(o, dict) for o in data):
            raise CloposPermanentError("response has no 'data' list of orders", status=200)
        return OrdersPage(
            orders=data, total=_orders_total(body), page=page, limit=limit, requested_at=sent_at
        )

    # --- authenticated calls ------------------------------------------------------------

    async def _api_get(
        self, url: str, venue_id: str | None, *, route: str
    ) -> tuple[dict[str, Any], float]:
        """GET an API route; refresh the token and retry once on an auth refusal.
        Returns the body and when the request that answered was sent."""
        response, token, sent_at = await self._authenticated_get(url, venue_id, route)
        body = _json_object(response)
        if response.status == 401 or _looks_like_auth(body):
            response, token, sent_at = await self._authenticated_get(
                url, venue_id, route, stale=token
            )
            body = _json_object(response)
        error = _error_for(response, body)
        if error is not None:
            raise error
        if body is None:  # _error_for() already refuses this; keeps the type exact
            raise CloposPermanentError("response is not a JSON object")
        return body, sent_at

    async def _authenticated_get(
        self, url: str, venue_id: str | None, route: str, *, stale: str | None = None
    ) -> tuple[HttpAnswer, str, float]:
        """One budgeted call, and when it was sent. The budget is waited for *before* the
        token is taken, so a wait for the budget (up to a minute) never sends a token
        that expired meanwhile.

        Traced (when on) as a CLIENT span named for the route template (``route``), with
        the status and how long the budget made the call wait."""
        attributes = {"http.request.method": "GET", "url.template": route}
        with tracing.client_span(self._tracer, f"GET {route}", attributes) as span:
            tenant = self.brand.tenant
            waited = time.perf_counter()
            await self._acquire_budget(tenant)
            budget_wait = time.perf_counter() - waited
            token = await self._ensure_token(stale)
            headers = {**_HEADERS, "x-token": token}
            if venue_id is not None:
                headers["x-venue"] = str(venue_id)
            started = time.perf_counter()
            sent_at = self._clock()
            read = READS.get(route, route)
            self.calls_by_read[read] = self.calls_by_read.get(read, 0) + 1
            response = await self._send("GET", url, headers=headers, count=True)
            self._budget.observe(tenant, status=response.status, headers=response.headers)
            if span is not None:
                span.set_attribute("http.response.status_code", response.status)
                span.set_attribute("clopos.budget_wait_ms", round(budget_wait * 1000, 1))
        log.debug(
            "clopos.request",
            brand=self.brand.brand,
            method="GET",
            path=response.url_path,
            status=response.status,
            venue_id=venue_id,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return response, token, sent_at

    async def _acquire_budget(self, tenant: str) -> None:
        """Wait for the tenant budget, but not longer than ``budget_wait_limit``: a caller
        holding a lease must not outlive it in a queue. Past the limit this is a
        rate-limit outcome (not a failed attempt), to be tried again later."""
        try:
            async with asyncio.timeout(self._budget_wait_limit):
                await self._budget.acquire(tenant)
        except TimeoutError as exc:
            raise CloposRateLimited(
                f"tenant budget busy for over {self._budget_wait_limit:g} s",
                retry_after=self._budget_wait_limit,
                status=None,
            ) from exc

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        body: bytes | None = None,
        count: bool,
    ) -> HttpAnswer:
        """One HTTP exchange under the total deadline; transport failures become Clopos
        errors."""
        try:
            response = await self._http.request(
                method, url, headers=headers, body=body, within=self._timeout
            )
        except HttpTimeout as exc:
            self._count(count, "timeout")
            raise CloposTransientError(f"no answer within {self._timeout:g} s") from exc
        except HttpUnsendable as exc:
            self._count(count, "transport_error")
            raise CloposPermanentError(f"cannot call {method} {url}: {exc}") from exc
        except HttpConnectError as exc:
            self._count(count, "connect_error")
            raise CloposTransientError(f"connection failed: {exc}") from exc
        except HttpTransportError as exc:
            self._count(count, "transport_error")
            raise CloposTransientError(str(exc)) from exc
        self._count(count, str(response.status))
        return response

    def _count(self, enabled: bool, key: str) -> None:
        if enabled:
            self.calls_by_status[key] = self.calls_by_status.get(key, 0) + 1

    # --- token ----------------------------------------------------------------------

    def _usable(self, stale: str | None) -> str | None:
        """The cached token if it is not the refused one and not due for refresh."""
        if self._token is None or self._token == stale:
            return None
        return self._token if self._clock() < self._refresh_at else None

    async def _ensure_token(self, stale: str | None = None) -> str:
        """A valid token; single flight: one caller authenticates, the others wait.

        Callers that waited for an attempt which failed get its error too, instead of each
        making an attempt of their own (40 waiters must not become 40 auth calls).
        """
        token = self._usable(stale)
        if token is not None:
            return token
        finished_seen = self._auth_finished
        async with self._auth_lock:
            token = self._usable(stale)
            if token is not None:
                return token  # someone refreshed while we waited
            try:
                failed = self._last_auth_error
                if self._auth_finished != finished_seen and failed is not None:
                    raise _replay(failed)
                return await self._auth_call()
            except (CloposTransientError, CloposRateLimited):
                # A refresh-ahead that failed: the old token still works until it expires.
                previous = self._token
                expires_at = self._expires_at
                still_valid = expires_at is not None and self._clock() < expires_at - 1.0
                if previous is not None and previous != stale and still_valid:
                    return previous
                raise

    def _check_auth_allowed(self, now: float) -> None:
        """The floor: remembered refusal, then Clopos's 429 wait, then our own cap."""
        rejection = self._rejection
        if rejection is not None and now < rejection.until:
            raise CloposCredentialsRejected(
                rejection.message, status=rejection.status, error=rejection.error
            )
        if now < self._auth_not_before:
            raise CloposRateLimited(
                "auth is rate limited by Clopos", retry_after=self._auth_not_before - now
            )
        while self._auth_attempts and self._auth_attempts[0] <= now - self._auth_window:
            self._auth_attempts.popleft()
        if len(self._auth_attempts) >= self._auth_burst:
            wait = self._auth_attempts[0] + self._auth_window - now
            log.warning("clopos.auth.throttled", brand=self.brand.brand, retry_after=wait)
            raise CloposRateLimited(
                f"auth floor: at most {self._auth_burst} auth calls per {self._auth_window:g} s",
                retry_after=max(wait, 1.0),
                status=None,
            )

    async def _auth_call(self) -> str:
        """``POST /v2/auth`` (caller holds the lock); caches and returns the token."""
        now = self._clock()
        self._check_auth_allowed(now)
        self._auth_attempts.append(now)
        self.auth_calls += 1
        self._last_auth_error = None
        try:
            return await self._auth_exchange(now)
        except CloposError as exc:
            self._last_auth_error = exc
            raise
        finally:
            self._auth_finished += 1

    async def _auth_exchange(self, now: float) -> str:
        """The auth request itself and the caching of its token."""
        brand = self.brand
        payload = {
            "client_id": brand.client_id,
            "client_secret": brand.client_secret.get_secret_value(),
            "brand": brand.brand,
            "integrator_id": brand.integrator_id,
        }
        started = time.perf_counter()
        try:
            response = await self._send(
                "POST",
                f"{self._base}/v2/auth",
                headers={**_HEADERS, "content-type": "application/json"},
                body=json.dumps(payload).encode(),
                count=False,
            )
        except CloposError as exc:
            log.warning("clopos.auth.failed", brand=brand.brand, error=exc.describe())
            raise
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        body = _json_object(response)
        token = self._accept_auth(response, body)
        lifetime = _token_lifetime(body or {}, now)
        margin = min(_MAX_REFRESH_MARGIN, lifetime * 0.1)
        # Counted from before the request: the token cannot have been issued earlier.
        self._token = token
        self._expires_at = now + lifetime
        self._refresh_at = now + lifetime - margin
        self._rejection = None
        REDACTOR.add(token)
        log.info(
            "clopos.auth.ok",
            brand=brand.brand,
            status=response.status,
            expires_in=round(lifetime),
            duration_ms=duration_ms,
        )
        return token

    def _accept_auth(self, response: HttpAnswer, body: dict[str, Any] | None) -> str:
        """The token of a successful auth answer, or the right error for the others."""
        status = response.status
        error, message = _envelope_fields(body)
        if status in (400, 401, 403) or (
            200 <= status < 300 and body is not None and body.get("success") is False
        ):
            self._reject(status, error, message or f"credentials rejected (HTTP {status})")
        if status == 429:
            retry_after = retry_after_seconds(response.headers)
            self._auth_not_before = self._clock() + retry_after
            log.warning("clopos.auth.failed", brand=self.brand.brand, status=status)
            raise CloposRateLimited(message or "auth rate limited", retry_after=retry_after)
        token = body.get("token") if body is not None else None
        if 200 <= status < 300 and isinstance(token, str) and token:
            return token
        log.warning("clopos.auth.failed", brand=self.brand.brand, status=status, error=error)
        if status >= 500 or status == 408 or 200 <= status < 300:
            # Includes a 2xx without a token: a gateway hiccup, not a verdict on credentials.
            raise CloposTransientError(
                message or f"unusable auth answer (HTTP {status})", status=status, error=error
            )
        raise CloposPermanentError(
            message or f"auth failed (HTTP {status}); check CLOPOS_BASE_URL",
            status=status,
            error=error,
        )

    def _reject(self, status: int, error: str | None, message: str) -> NoReturn:
        """Remember and raise a credentials refusal; drop the cached token."""
        self._token = None
        self._expires_at = None
        self._refresh_at = -math.inf
        self._rejection = _Rejection(
            until=self._clock() + self._rejected_cooldown,
            message=message,
            status=status,
            error=error,
        )
        log.warning(
            "clopos.auth.rejected",
            brand=self.brand.brand,
            status=status,
            error=error,
            message=message,
        )
        raise CloposCredentialsRejected(message, status=status, error=error)
