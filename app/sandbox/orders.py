"""Orders as the sandbox stores and shows them: defaults, seed data, embeds, list queries.

Pure functions over plain dicts, so the state and the routes stay small. An order is kept
exactly as given (unknown fields included) with its receipt under ``"receipt"``; the receipt
is shown only when the request asks for it with ``with[N]=receipt[:fields]``, as in Clopos.
Timestamps are written like Clopos writes them (``2026-02-02T17:46:02.000000Z``, whole
seconds) and read in both of the formats its documentation shows.
"""

from __future__ import annotations

import copy
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from app.clopos.timestamps import parse_clopos_datetime

MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 50
SORT_FIELDS = ("created_at", "updated_at", "id")
_WITH_KEY = re.compile(r"^with(\[\d*\])?$")
_FILTER_KEY = re.compile(r"^filters\[(\d+)\]\[([01])\]$")
_SEED_NAMESPACE = uuid.UUID("5d1f0c3e-7a52-4f7e-9d0b-3c6a2b1e8f10")
# Seeded orders walk through these; the one without a receipt is still PENDING.
_SEED_STATUSES = ("RECEIVED", "PENDING", "DELIVERED", "RECEIVED", "IGNORE")


def iso(ts: float) -> str:
    """Clopos's timestamp format, truncated to whole seconds as the real API shows."""
    moment = datetime.fromtimestamp(math.floor(ts), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fill_defaults(order: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A copy of ``order`` with every standard Clopos field present (given values win)."""
    result = copy.deepcopy(dict(order))
    order_id = int(result["id"])
    result["id"] = order_id
    result["venue_id"] = int(result.get("venue_id", 1))
    stamp = iso(now)
    defaults: dict[str, Any] = {
        "type": "CALL_CENTER_ORDER",
        "integration": "sandbox",
        "integration_uuid": str(uuid.uuid5(_SEED_NAMESPACE, f"order-{order_id}")),
        "integration_id": f"SBX-{order_id}",
        "customer_ref_id": f"customer-{order_id}",
        "integration_status": "ACCEPTED",
        "status": "PENDING",
        "payload": _payload(order_id),
        "integration_response": None,
        "created_at": stamp,
        "updated_at": stamp,
        "receipt": None,
    }
    for key, value in defaults.items():
        result.setdefault(key, value)
    return result


def _payload(order_id: int) -> dict[str, Any]:
    return {
        "service": {"type": "DELIVERY", "name": "Sandbox delivery"},
        "customer": {"name": f"Sandbox Customer {order_id}", "phone": "+10000000000"},
        "products": [
            {"product_id": 11, "name": "Plov", "count": 2, "price": 7.5},
            {"product_id": 12, "name": "Ayran", "count": 1, "price": 1.5},
        ],
        "meta": {"comment": "sandbox order", "total": 16.5},
    }


def seed(count: int, now: float) -> list[dict[str, Any]]:
    """Orders 1001..1000+count in venue 1, ten minutes apart, ending just before ``now``.

    Each carries the unknown field ``x_extra`` (to test pass-through). 1001 has a receipt;
    1002 has none (``receipt: null`` when embedded).
    """
    orders = []
    for index in range(1, count + 1):
        order_id = 1000 + index
        created = now - (count - index + 1) * 600
        status = _SEED_STATUSES[(index - 1) % len(_SEED_STATUSES)]
        receipt = None
        if index != 2:
            closed = status in ("DELIVERED", "IGNORE")
            receipt = {
                "id": 5000 + index,
                "service_notification_id": 9000 + index,
                "status": 2 if closed else 1,
                "total": 16.5,
            }
        base = {
            "id": order_id,
            "venue_id": 1,
            "status": status,
            "created_at": iso(created),
            "updated_at": iso(created + 60),
            "receipt": receipt,
            "x_extra": {"kept": True},
        }
        orders.append(fill_defaults(base, now))
    return orders


def receipt_fields(params: Iterable[tuple[str, str]]) -> list[str] | None:
    """What ``with[N]`` asks of the receipt: None (not asked), [] (all) or field names."""
    wanted: list[str] | None = None
    for key, value in params:
        if not _WITH_KEY.match(key):
            continue
        for item in value.split(";"):
            relation, _, fields = item.strip().partition(":")
            if relation.strip() != "receipt":
                continue
            wanted = wanted or []
            wanted.extend(f.strip() for f in fields.split(",") if f.strip())
    return wanted


def view(order: Mapping[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """The order as the API shows it: receipt removed, or embedded (object or null)."""
    shown = copy.deepcopy(dict(order))
    receipt = shown.pop("receipt", None)
    if fields is None:
        return shown
    if isinstance(receipt, dict) and fields:
        receipt = {name: receipt[name] for name in fields if name in receipt}
    shown["receipt"] = receipt
    return shown


@dataclass
class ListQuery:
    """``GET /v2/orders`` parameters, validated (``ValueError`` names the bad one)."""

    page: int = 1
    limit: int = DEFAULT_LIST_LIMIT
    sort_field: str = "id"
    sort_direction: int = 1
    statuses: set[str] = field(default_factory=set)
    date_from: date | None = None
    date_to: date | None = None
    filters: dict[str, str] = field(default_factory=dict)
    receipt: list[str] | None = None

    @classmethod
    def parse(cls, params: list[tuple[str, str]]) -> ListQuery:
        raw = dict(params)
        query = cls(
            page=_positive_int(raw, "page", 1),
            limit=min(_positive_int(raw, "limit", DEFAULT_LIST_LIMIT), MAX_LIST_LIMIT),
            receipt=receipt_fields(params),
            date_from=_day(raw, "date[0]"),
            date_to=_day(raw, "date[1]"),
            filters=_filters(params),
        )
        query.sort_field = raw.get("sort[0]", "id") or "id"
        if query.sort_field not in SORT_FIELDS:
            raise ValueError(f"sort[0] must be one of {', '.join(SORT_FIELDS)}")
        direction = raw.get("sort[1]", "1").strip().lower()
        if direction not in ("1", "-1", "asc", "desc"):
            raise ValueError("sort[1] must be 1 or -1")
        query.sort_direction = -1 if direction in ("-1", "desc") else 1
        status = raw.get("status", "")
        query.statuses = {s.strip() for s in status.split(",") if s.strip()}
        return query

    def matches(self, order: Mapping[str, Any]) -> bool:
        if self.statuses and order.get("status") not in self.statuses:
            return False
        if self.date_from or self.date_to:
            created = parse_clopos_datetime(order.get("created_at"))
            if created is None:
                return False
            day = created.astimezone(UTC).date()
            if (self.date_from and day < self.date_from) or (self.date_to and day > self.date_to):
                return False
        return all(str(order.get(name)) == value for name, value in self.filters.items())

    def sort_key(self, order: Mapping[str, Any]) -> tuple[float, int]:
        order_id = int(order["id"])
        if self.sort_field == "id":
            return (float(order_id), order_id)
        moment = parse_clopos_datetime(order.get(self.sort_field))
        return (moment.timestamp() if moment else -math.inf, order_id)

    def apply(self, orders: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """The requested page (as shown to the client) and the total that matched."""
        selected = sorted(
            (o for o in orders if self.matches(o)),
            key=self.sort_key,
            reverse=self.sort_direction < 0,
        )
        start = (self.page - 1) * self.limit
        page = selected[start : start + self.limit]
        return [view(o, self.receipt) for o in page], len(selected)


def _positive_int(raw: Mapping[str, str], name: str, default: int) -> int:
    value = raw.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be a positive integer") from exc
    if number < 1:
        raise ValueError(f"{name} must be a positive integer")
    return number


def _day(raw: Mapping[str, str], name: str) -> date | None:
    value = raw.get(name)
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"{name} must be a date (YYYY-MM-DD)") from exc


def _filters(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``filters[N][0]=field&filters[N][1]=value`` pairs as {field: value}."""
    parts: dict[str, dict[str, str]] = {}
    for key, value in params:
        match = _FILTER_KEY.match(key)
        if match:
            parts.setdefault(match.group(1), {})[match.group(2)] = value
    result = {}
    for index, pair in parts.items():
        if "0" not in pair or "1" not in pair:
            raise ValueError(f"filters[{index}] needs both [0] (field) and [1] (value)")
        result[pair["0"]] = pair["1"]
    return result
