"""Inbound notifications: ``POST /webhooks/clopos[/{brand}]``.

Order of checks, cheapest and safest first, so hostile input is refused before it
costs anything and never reaches Clopos:

1. brand known (404), body size enforced *while reading* (413);
2. authentication: shared token (header or query, constant time) or a Standard
   Webhooks signature with timestamp tolerance (401);
3. JSON object (400), usable order id and venue (422);
4. commit to the store (503 if it cannot), then 202.

Only a committed notification is acknowledged; a replayed signed message (same id
and timestamp as one already stored) is refused with 409.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.datastructures import Headers, QueryParams
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from app import http_errors, ids, signing, tracing
from app.errors import ApiError, StoreError
from app.logs import get_logger
from app.runtime import Runtime, RuntimeDep
from app.store.base import EnqueueResult, Notification

log = get_logger("app.ingest")
router = APIRouter()

# Printable ASCII, no spaces (always used with fullmatch: "$" would match before a "\n").
_MSG_ID = re.compile(rf"[\x21-\x7e]{{1,{signing.MAX_MSG_ID_LENGTH}}}")
_DEDUP_HEADERS = ("webhook-id", "idempotency-key", "x-webhook-id")
# The only headers the checks read: picked out of the request's list in one pass.
_READ_HEADERS = frozenset(
    name.encode()
    for name in (
        "content-length",
        "x-webhook-token",
        "webhook-signature",
        "webhook-timestamp",
        *_DEDUP_HEADERS,
    )
)
_ACCEPTED = (
    b'{"accepted":true,"brand":%s,"order_id":%d,"notification_id":%s,"duplicate":%s,"coalesced":%s}'
)
_JSON_BOOL = {True: b"true", False: b"false"}
CLIENT_CLOSED_REQUEST = 499  # the access line's status for a sender that hung up mid-body


@dataclass(frozen=True)
class ParsedNotice:
    order_id: int
    venue_id: str | None


# --- pure parsing ---------------------------------------------------------------------


def _lookup(document: dict[str, Any], path: str) -> tuple[dict[str, Any], Any] | None:
    """Follow a dotted path; return (parent object, value) when present and not null."""
    parent: Any = None
    node: Any = document
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        parent, node = node, node[part]
    if node is None or not isinstance(parent, dict):
        return None
    return parent, node


def parse_notice(body: bytes, paths: list[str]) -> ParsedNotice:
    """Find the order id (first present path wins) and the venue beside it."""
    try:
        document = json.loads(body)
    except RecursionError as exc:  # 20,000 levels of nesting: refused, not a crash
        raise ApiError(400, "too_deep", "JSON nesting is too deep") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", "body is not valid JSON") from exc
    if not isinstance(document, dict):
        raise ApiError(400, "not_an_object", "body must be a JSON object")
    for path in paths:
        found = _lookup(document, path)
        if found is None:
            continue
        parent, value = found
        order_id = ids.parse_order_id(value)
        if order_id is None:
            raise ApiError(
                422, "invalid_order_id", f"{path} must be a positive integer or digit string"
            )
        venue_raw = parent.get("venue_id")
        venue_id: str | None = None
        if venue_raw is not None:
            venue_id = ids.parse_venue_id(venue_raw)
            if venue_id is None:
                raise ApiError(422, "invalid_venue_id", "venue_id must be a positive integer")
        return ParsedNotice(order_id, venue_id)
    raise ApiError(422, "no_order_id", "no order id found at any of: " + ", ".join(paths))


# --- request handling -----------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """What the checks read of one webhook request: the headers they use (the first of
    each, by lower-case name), the raw query string, and the channel the body comes on.

    Built from the ASGI scope in one pass over the header list, rather than through a
    Starlette ``Request`` whose every header lookup scans the whole list again.
    ``checked_headers`` holds only the names in ``_READ_HEADERS``: a check that reads
    another header must add its name there."""

    checked_headers: dict[str, str]
    query_string: bytes
    receive: Receive

    @classmethod
    def from_scope(cls, scope: Scope, receive: Receive) -> Inbound:
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _READ_HEADERS:
                headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        return cls(headers, scope.get("query_string", b""), receive)


async def _read_body(inbound: Inbound, limit: int) -> bytes:
    declared = inbound.checked_headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await inbound.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # stop reading: the rest of a hostile body is never buffered
            raise ApiError(413, "too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _dedup_key(inbound: Inbound) -> str | None:
    """The sender's message id, if it gave a usable one. The header is optional: a
    malformed one is ignored (the notification is still accepted), never trusted."""
    for header in _DEDUP_HEADERS:
        value = inbound.checked_headers.get(header)
        if value is not None and _MSG_ID.fullmatch(value):
            return value
    return None


def _authenticate(inbound: Inbound, body: bytes, secret: str | None, tolerance: int) -> int | None:
    """Return the signed timestamp for a signature, None for a token (or no auth)."""
    if secret is None:  # WEBHOOK_ALLOW_UNAUTHENTICATED=true and no secret configured
        return None
    headers = inbound.checked_headers
    token = headers.get("x-webhook-token") or QueryParams(inbound.query_string).get("token")
    if token is not None:
        if not signing.constant_time_equals(token, secret):
            raise ApiError(401, "bad_token", "invalid webhook token")
        return None
    signature = headers.get("webhook-signature")
    if signature is None:
        raise ApiError(
            401, "unauthenticated", "send X-Webhook-Token or a Standard Webhooks signature"
        )
    msg_id = headers.get("webhook-id", "")
    try:
        signed_at = signing.verify(
            secret,
            msg_id=msg_id,
            timestamp=headers.get("webhook-timestamp", ""),
            signature_header=signature,
            body=body,
            now=time.time(),
            tolerance_seconds=tolerance,
        )
    except signing.SignatureError as exc:
        raise ApiError(401, exc.reason, "webhook signature rejected: " + exc.reason) from exc
    # The replay guard is keyed on the signed message's id: one it cannot use (a space,
    # a control character, non-ASCII) would let the same signed message in again and
    # again, so a signed request must carry a usable one.
    if not _MSG_ID.fullmatch(msg_id):
        raise ApiError(
            400, "invalid_webhook_id", "webhook-id must be printable ASCII without spaces"
        )
    return signed_at


async def _accept(runtime: Runtime, inbound: Inbound, brand: str) -> Response:
    config = runtime.config
    settings = config.settings
    body = await _read_body(inbound, settings.webhook_max_body_bytes)
    tolerance = settings.webhook_timestamp_tolerance_seconds
    if brand not in config.brands:
        # Say "no such brand" only to a caller holding the shared secret: to anyone else
        # it is a 401, so brand names cannot be probed.
        shared = config.webhook_secret_for(brand)
        if shared is None and not settings.webhook_allow_unauthenticated:
            raise ApiError(401, "unauthenticated", "invalid webhook credentials")
        _authenticate(inbound, body, shared, tolerance)
        raise ApiError(404, "unknown_brand", "no such brand is configured")
    signed_at = _authenticate(inbound, body, config.webhook_secret_for(brand), tolerance)
    dedup_key = _dedup_key(inbound)
    notice = parse_notice(body, settings.webhook_order_id_paths)
    notification = Notification(
        brand=brand,
        order_id=notice.order_id,
        venue_id=notice.venue_id,
        received_at=time.time(),
        dedup_key=dedup_key,
        signed_at=signed_at,
        # Stored so that hydration and delivery join this request's trace.
        traceparent=(
            tracing.note_order(brand, notice.order_id) if runtime.tracer is not None else None
        ),
    )
    try:  # a store that does not answer in time raises StoreError too (Store.enqueue)
        result = await runtime.store.enqueue(notification)
    except StoreError as exc:
        log.error(
            "webhook.store_unavailable", brand=brand, order_id=notice.order_id, error=repr(exc)
        )
        raise http_errors.store_unavailable() from exc  # counted and logged as rejected
    if result.duplicate and signed_at is not None and result.previous_signed_at == signed_at:
        raise ApiError(409, "replayed", "this signed message was already received")
    outcome = "duplicate" if result.duplicate else "coalesced" if result.coalesced else "new"
    runtime.metrics.count_accepted(brand, outcome)
    if not result.duplicate:
        runtime.wake_hydration()
    log.info(
        "webhook.accepted",
        brand=brand,
        order_id=notice.order_id,
        venue_id=notice.venue_id,
        notification_id=result.notification_id,
        job_id=result.job_id,
        outcome=outcome,
    )
    body = accepted_body(brand, notice.order_id, result)
    return Response(body, 202, media_type="application/json")


def accepted_body(brand: str, order_id: int, result: EnqueueResult) -> bytes:
    """The 202 body (the :class:`Accepted` model) from a template: JSON-encoding this
    six-key object built an encoder per request, 2% of the event loop's time."""
    notification_id = result.notification_id
    return _ACCEPTED % (
        json.dumps(brand).encode(),
        order_id,
        b"null" if notification_id is None else b"%d" % notification_id,
        _JSON_BOOL[result.duplicate],
        _JSON_BOOL[result.coalesced],
    )


class Accepted(BaseModel):
    """The 202 body: the notification is durably stored."""

    accepted: bool
    brand: str
    order_id: int
    notification_id: int | None  # None for an exact repeat (duplicate)
    duplicate: bool
    coalesced: bool


_ORDER_ID = {
    "oneOf": [
        {"type": "integer", "minimum": ids.MIN_ID, "maximum": ids.MAX_ID},
        {"type": "string", "pattern": "^0*[1-9][0-9]*$", "maxLength": ids.MAX_ID_DIGITS},
    ]
}
# The documented shape is the default WEBHOOK_ORDER_ID_PATHS' first: {"data": {"id": ...}}
# (the others, and any extra keys, are accepted too).
_NOTICE_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": _ORDER_ID,
                "venue_id": {"oneOf": [*_ORDER_ID["oneOf"], {"type": "null"}]},
            },
        }
    },
}
WEBHOOK_DOCS: dict[str, Any] = {
    "responses": {
        202: {"model": Accepted, "description": "Stored; hydration and delivery follow."},
        **http_errors.error_responses(400, 401, 404, 409, 413, 422, 503),
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _NOTICE_SCHEMA}},
        }
    },
}


async def handle(runtime: Runtime, scope: Scope, receive: Receive, brand: str | None) -> Response:
    """Answer one webhook request; traced as ``webhook.receive`` when tracing is on."""
    inbound = Inbound.from_scope(scope, receive)
    if runtime.tracer is None:
        return await _respond(runtime, inbound, brand)
    route = "/webhooks/clopos" if brand is None else "/webhooks/clopos/{brand}"
    attributes = {"http.request.method": "POST", "http.route": route}
    headers = Headers(scope=scope)  # all of them: the propagator reads what it needs
    with tracing.request_span(runtime.tracer, "webhook.receive", headers, attributes) as span:
        if span is not None:
            tracing.bind_span_ids(span)
        response = await _respond(runtime, inbound, brand)
        if span is not None:
            span.set_attribute("http.response.status_code", response.status_code)
        return response


async def _respond(runtime: Runtime, inbound: Inbound, brand: str | None) -> Response:
    runtime.metrics.count_received("default" if brand is None else "brand")
    try:
        if brand is None:
            if runtime.config.default_brand is None:
                raise ApiError(404, "unknown_brand", "no default brand is configured")
            brand = runtime.config.default_brand
        return await _accept(runtime, inbound, brand)
    except ClientDisconnect:
        # The sender hung up before its body was complete: nothing was stored, nobody
        # is left to answer, and it is not our error. The access line shows 499 (the
        # "client closed request" of nginx), not a 500.
        runtime.metrics.rejected.labels("client_disconnected").inc()
        log.info("webhook.client_disconnected", brand=brand)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except ApiError as exc:
        runtime.metrics.rejected.labels(exc.error).inc()
        log.info("webhook.rejected", brand=brand, status=exc.status, reason=exc.error)
        return http_errors.render(exc)


@router.post("/webhooks/clopos", status_code=202, **WEBHOOK_DOCS)
async def webhook_default(request: Request, runtime: RuntimeDep) -> Response:
    return await handle(runtime, request.scope, request.receive, None)


@router.post("/webhooks/clopos/{brand}", status_code=202, **WEBHOOK_DOCS)
async def webhook_brand(brand: str, request: Request, runtime: RuntimeDep) -> Response:
    return await handle(runtime, request.scope, request.receive, brand)
