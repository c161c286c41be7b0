"""From a Clopos order to the body every sink receives, with its stable id.

The id (``webhook-id`` on the wire) is derived from the order's content only, so the
same order state always gets the same id, whatever the time of fetch, the
notifications behind it, or the read that produced it (a detail call or a list page):
sinks use it to drop repeats.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from app.clopos.timestamps import parse_clopos_datetime

EVENT_TYPE = "order.hydrated"
# Which read produced a snapshot: GET /v2/orders/{id} or a page of GET /v2/orders.
HydratedFrom = Literal["order", "order_list"]


def _dumps(value: Any, *, sort_keys: bool) -> bytes:
    """Strict JSON: ASCII-escaped (a lone surrogate from upstream cannot break encoding)
    and no NaN/Infinity, which are not JSON; raises ValueError for those."""
    return json.dumps(value, sort_keys=sort_keys, separators=(",", ":"), allow_nan=False).encode()


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace."""
    return _dumps(value, sort_keys=True)


def snapshot_key(brand: str, order_id: int, order: dict[str, Any]) -> str:
    """Stable id of one order state: ``snap_`` + 32 hex chars of SHA-256."""
    digest = hashlib.sha256()
    digest.update(f"{brand}\x00{order_id}\x00".encode())
    digest.update(canonical_json(order))
    return "snap_" + digest.hexdigest()[:32]


def iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-02-02T17:46:02.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_clopos_time(value: Any) -> float | None:
    """A Clopos timestamp as epoch seconds (for the poller's bookkeeping), or None."""
    parsed = parse_clopos_datetime(value)
    return parsed.timestamp() if parsed is not None else None


def build_body(
    *,
    key: str,
    brand: str,
    order_id: int,
    order: dict[str, Any],
    notification_ids: list[int],
    received_at: float,
    hydrated_at: float,
    hydrated_from: HydratedFrom = "order",
) -> bytes:
    """The exact bytes sinks receive (schema: app/schemas/order_hydrated.json).

    ``hydrated_from`` is not part of the id: the same state read from the list or from
    the detail endpoint is one state, and a sink must be able to drop it as a repeat."""
    body = {
        "id": key,
        "type": EVENT_TYPE,
        "brand": brand,
        "order_id": order_id,
        "order": order,
        "notification_ids": notification_ids,
        "received_at": iso(received_at),
        "hydrated_at": iso(hydrated_at),
        "hydrated_from": hydrated_from,
    }
    return _dumps(body, sort_keys=False)


def render_listed(
    key: str,
    brand: str,
    order_id: int,
    order: dict[str, Any],
    hydrated_at: float,
    notification_ids: tuple[int, ...],
    received_at: float,
) -> bytes:
    """The body of a state read from a list page, once the store knows which notices it
    covers (``ListedState.render``, as a partial of the first five arguments)."""
    return build_body(
        key=key,
        brand=brand,
        order_id=order_id,
        order=order,
        notification_ids=list(notification_ids),
        received_at=received_at,
        hydrated_at=hydrated_at,
        hydrated_from="order_list",
    )
