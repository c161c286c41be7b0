"""Everything the Clopos sandbox remembers: clients, tokens, orders, faults, limits, calls.

One :class:`SandboxState` per sandbox app, created by the caller (never at import). Tests
hold it to arrange orders, inject faults and read counters while the server answers from
another thread, so every method takes the state's lock; nothing under the lock awaits.
Time is ``clock()`` (injectable): token expiry and the rate-limit windows use it, and a
test that controls the clock controls both.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.sandbox import orders as order_data
from app.sandbox.notify import Notifier
from app.sandbox.ratelimit import Quota, SlidingWindow

DEFAULT_CLIENT_ID = "sandbox-client"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret"  # noqa: S105 - a public demo credential
DEFAULT_BRAND = "sandbox"
DEFAULT_INTEGRATOR_ID = "sandbox-integrator"
DEFAULT_VENUE_ID = 1
AUTH_PATH = "/open-api/v2/auth"
FAULT_KINDS = frozenset({"500", "504", "429", "success_false", "401", "404", "hang"})
FAULT_ROUTES = frozenset({"orders", "auth"})


@dataclass(frozen=True)
class CallRecord:
    """One request the API routes answered (control routes are not recorded)."""

    time: float
    method: str
    path: str  # relative to the sandbox root, e.g. /open-api/v2/orders/1001
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    status: int


@dataclass
class Client:
    """Registered credentials; ``test_mode`` is a test integrator on a production brand."""

    client_id: str
    client_secret: str
    brand: str
    integrator_id: str
    test_mode: bool = False
    venue_id: int = DEFAULT_VENUE_ID
    rejected: bool = False


@dataclass(frozen=True)
class TokenInfo:
    """What an issued token stands for."""

    client_id: str
    brand: str
    integrator_id: str
    venue_id: int
    expires_at: float

    @property
    def tenant(self) -> str:
        """The tier-3 key, as Clopos enforces it."""
        return f"{self.integrator_id}:{self.brand}"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class SandboxState:
    """The sandbox's memory. Thread-safe; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        token_ttl_seconds: float = 3600,
        tenant_limit_per_minute: int = 300,
        auth_limit_per_minute: int = 60,
        failed_limit_per_minute: int = 600,
        seed_orders: int = 5,
    ) -> None:
        self.clock = clock
        self.token_ttl_seconds = token_ttl_seconds
        self.latency_seconds = 0.0
        self.hang_seconds = 30.0
        self.gateway_delay_seconds = 0.0
        self.notify_url: str | None = None
        self.notify_token: str | None = None
        self.notifier = Notifier()
        self._lock = threading.RLock()
        self._signing_key = secrets.token_bytes(32)
        self._clients: dict[str, Client] = {}
        self._tokens: dict[str, TokenInfo] = {}
        self._orders: dict[int, dict[str, Any]] = {}
        self._faults: dict[str, deque[str]] = {route: deque() for route in FAULT_ROUTES}
        self._calls: list[CallRecord] = []
        self._seed_orders = seed_orders
        self.auth_window = SlidingWindow(auth_limit_per_minute)  # tier 1, per IP
        self.failed_window = SlidingWindow(failed_limit_per_minute)  # tier 2, per IP
        self.tenant_window = SlidingWindow(tenant_limit_per_minute)  # tier 3, per tenant
        self.add_client(
            DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_BRAND, DEFAULT_INTEGRATOR_ID
        )
        self._seed()

    # --- clients and tokens -----------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        client_secret: str,
        brand: str,
        integrator_id: str,
        *,
        test_mode: bool = False,
        venue_id: int = DEFAULT_VENUE_ID,
    ) -> None:
        """Register credentials (replacing any with the same ``client_id``)."""
        client = Client(client_id, client_secret, brand, integrator_id, test_mode, venue_id)
        with self._lock:
            self._clients[client_id] = client

    def reject_credentials(self, client_id: str, on: bool = True) -> None:
        """While on, ``/v2/auth`` answers 401 for this client (as if disabled)."""
        with self._lock:
            self._clients[client_id].rejected = on

    def client(self, client_id: str) -> Client | None:
        with self._lock:
            found = self._clients.get(client_id)
            return copy.copy(found) if found else None

    def known_integrator(self, integrator_id: str) -> bool:
        with self._lock:
            return any(c.integrator_id == integrator_id for c in self._clients.values())

    def issue_token(self, client_id: str) -> tuple[str, TokenInfo]:
        """A new JWT-shaped token for a registered client; its ``exp`` is ``expires_at``."""
        with self._lock:
            client = self._clients[client_id]
            now = self.clock()
            expires_at = float(int(now + self.token_ttl_seconds))
            info = TokenInfo(
                client.client_id, client.brand, client.integrator_id, client.venue_id, expires_at
            )
            token = self._sign(info, now)
            self._tokens[token] = info
            return token, info

    def _sign(self, info: TokenInfo, now: float) -> str:
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {
            "iss": "clopos-sandbox",
            "sub": info.client_id,
            "brand": info.brand,
            "integrator_id": info.integrator_id,
            "venue_id": info.venue_id,
            "iat": int(now),
            "exp": int(info.expires_at),
            "jti": secrets.token_hex(8),
        }
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signature = hmac.new(self._signing_key, signing_input.encode(), hashlib.sha256)
        return f"{signing_input}.{_b64url(signature.digest())}"

    def token_info(self, token: str) -> TokenInfo | None:
        """The token's facts if this sandbox issued it (expired or not); else None."""
        with self._lock:
            return self._tokens.get(token)

    def expire_tokens(self) -> None:
        """Every token issued so far is expired from now on (API calls get "Token expired")."""
        with self._lock:
            now = self.clock()
            for token, info in self._tokens.items():
                if info.expires_at > now:
                    self._tokens[token] = TokenInfo(
                        info.client_id, info.brand, info.integrator_id, info.venue_id, now
                    )

    def tokens_issued(self) -> int:
        with self._lock:
            return len(self._tokens)

    # --- orders -----------------------------------------------------------------------

    def _seed(self) -> None:
        for order in order_data.seed(self._seed_orders, self.clock()):
            self._orders[order["id"]] = order

    def put_order(self, order: dict[str, Any]) -> None:
        """Create or replace an order; missing standard fields are filled in."""
        filled = order_data.fill_defaults(order, self.clock())
        with self._lock:
            self._orders[filled["id"]] = filled

    def update_order(
        self, order_id: int, /, *, notify: bool = False, **fields: Any
    ) -> dict[str, Any]:
        """Set ``fields``, bump ``updated_at`` (unless given), return the new order.

        Raises ``KeyError`` for an unknown order. With ``notify`` and a ``notify_url``,
        sends the "order.updated" notification in the background.
        """
        with self._lock:
            order = self._orders[order_id]
            order.update(copy.deepcopy(fields))
            order["id"] = order_id  # the key of the store; not renamed by an update
            if "updated_at" not in fields:
                order["updated_at"] = order_data.iso(self.clock())
            result = copy.deepcopy(order)
        if notify:
            self.notify(order_id, int(result["venue_id"]))
        return result

    def get_order(self, order_id: int) -> dict[str, Any] | None:
        with self._lock:
            order = self._orders.get(order_id)
            return copy.deepcopy(order) if order is not None else None

    def orders_in_venue(self, venue_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._orders.values() if o["venue_id"] == venue_id]

    def notify(self, order_id: int, venue_id: int) -> bool:
        """Send "order.updated" for one order if ``notify_url`` is set; True if scheduled."""
        url = self.notify_url
        if not url:
            return False
        body = {"event": "order.updated", "data": {"id": order_id, "venue_id": venue_id}}
        self.notifier.send(url, self.notify_token, body)
        return True

    # --- faults -----------------------------------------------------------------------

    def inject(self, kind: str, count: int = 1, *, route: str = "orders") -> None:
        """Make the next ``count`` calls to ``route`` ("orders" or "auth") fail as ``kind``."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        if route not in FAULT_ROUTES:
            raise ValueError(f"unknown fault route {route!r}; one of {sorted(FAULT_ROUTES)}")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults[route].extend([kind] * count)

    def take_fault(self, route: str) -> str | None:
        """The next pending fault for ``route`` (consumed), or None."""
        with self._lock:
            pending = self._faults[route]
            return pending.popleft() if pending else None

    def pending_faults(self) -> dict[str, list[str]]:
        with self._lock:
            return {route: list(kinds) for route, kinds in self._faults.items()}

    def clear_faults(self) -> None:
        with self._lock:
            for kinds in self._faults.values():
                kinds.clear()

    # --- rate limits ------------------------------------------------------------------

    def take_auth_slot(self, ip: str) -> tuple[bool, Quota]:
        """Tier 1: count an auth call from ``ip`` unless its window is full."""
        with self._lock:
            now = self.clock()
            if self.auth_window.full(ip, now):
                return False, self.auth_window.quota(ip, now)
            self.auth_window.hit(ip, now)
            return True, self.auth_window.quota(ip, now)

    def failed_limit_reached(self, ip: str) -> Quota | None:
        """Tier 2: the quota when ``ip`` has used up its failed calls, else None."""
        with self._lock:
            now = self.clock()
            if self.failed_window.full(ip, now):
                return self.failed_window.quota(ip, now)
            return None

    def record_failure(self, ip: str) -> None:
        with self._lock:
            self.failed_window.hit(ip, self.clock())

    def take_tenant_slot(self, tenant: str) -> tuple[bool, Quota]:
        """Tier 3: count an authenticated call for ``tenant`` unless its window is full."""
        with self._lock:
            now = self.clock()
            if self.tenant_window.full(tenant, now):
                return False, self.tenant_window.quota(tenant, now)
            self.tenant_window.hit(tenant, now)
            return True, self.tenant_window.quota(tenant, now)

    def api_quota(self, ip: str, tenant: str | None) -> Quota:
        """The most constrained of tier 2 (``ip``) and tier 3 (``tenant``, when known)."""
        with self._lock:
            now = self.clock()
            failed = self.failed_window.quota(ip, now)
            if tenant is None:
                return failed
            own = self.tenant_window.quota(tenant, now)
            return failed if failed.remaining < own.remaining else own

    # --- counters ---------------------------------------------------------------------

    def record_call(self, record: CallRecord) -> None:
        with self._lock:
            self._calls.append(record)

    @property
    def calls(self) -> list[CallRecord]:
        """A snapshot of every API call answered so far, oldest first."""
        with self._lock:
            return list(self._calls)

    def count(self, path_prefix: str = "", status: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for call in self._calls
                if call.path.startswith(path_prefix) and (status is None or call.status == status)
            )

    def auth_calls(self) -> int:
        return self.count(AUTH_PATH)

    def rate_limited(self) -> int:
        """How many 429s were answered (limits and injected faults alike)."""
        return self.count(status=429)

    def reset_counters(self) -> None:
        with self._lock:
            self._calls.clear()

    def reset(self, *, orders: bool = False) -> None:
        """Back to a clean slate: counters, faults, windows, delays, rejections.

        Tokens stay valid. With ``orders``, the order store is re-seeded too.
        """
        with self._lock:
            self._calls.clear()
            self.clear_faults()
            for window in (self.auth_window, self.failed_window, self.tenant_window):
                window.clear()
            for client in self._clients.values():
                client.rejected = False
            self.latency_seconds = 0.0
            self.hang_seconds = 30.0
            self.gateway_delay_seconds = 0.0
            if orders:
                self._orders.clear()
                self._seed()

    def stats(self) -> dict[str, Any]:
        """Counters and settings for ``GET /_sandbox/stats``."""
        with self._lock:
            by_status: dict[str, int] = {}
            for call in self._calls:
                by_status[str(call.status)] = by_status.get(str(call.status), 0) + 1
            return {
                "calls": len(self._calls),
                "auth_calls": self.auth_calls(),
                "order_calls": self.count("/open-api/v2/orders/"),
                "list_calls": sum(1 for c in self._calls if c.path == "/open-api/v2/orders"),
                "rate_limited": self.rate_limited(),
                "by_status": by_status,
                "orders": len(self._orders),
                "tokens_issued": len(self._tokens),
                "faults": self.pending_faults(),
                "latency_seconds": self.latency_seconds,
                "hang_seconds": self.hang_seconds,
                "gateway_delay_seconds": self.gateway_delay_seconds,
                "limits": {
                    "auth_per_minute": self.auth_window.limit,
                    "failed_per_minute": self.failed_window.limit,
                    "tenant_per_minute": self.tenant_window.limit,
                },
            }
