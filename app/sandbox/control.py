"""Control routes under ``/_sandbox``: arrange the sandbox over HTTP, without auth.

For demos and for tests in another process than the sandbox. They are never recorded in
``state.calls``, never rate-limited and never faulted, so arranging a scenario does not
disturb what it measures.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.logs import get_logger
from app.sandbox.state import SandboxState

log = get_logger("app.sandbox.control")

# Fields of POST /_sandbox/faults that set a delay on the state.
_DELAY_FIELDS = ("latency_seconds", "hang_seconds", "gateway_delay_seconds")


class _BadRequest(ValueError):
    """A control request that cannot be applied; answered 400 with its message."""


def _bad(message: str) -> JSONResponse:
    return JSONResponse(
        {"success": False, "error": "invalid_parameter", "message": message}, status_code=400
    )


async def _object(request: Request, *, required: bool) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise _BadRequest("a JSON object body is required")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest("the body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _order_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _BadRequest("id must be a positive integer")
    try:
        order_id = int(value)
    except ValueError as exc:
        raise _BadRequest("id must be a positive integer") from exc
    if order_id < 1:
        raise _BadRequest("id must be a positive integer")
    return order_id


def _apply_faults(state: SandboxState, body: dict[str, Any]) -> None:
    if body.get("clear"):
        state.clear_faults()
    for name in _DELAY_FIELDS:
        if name in body:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise _BadRequest(f"{name} must be a non-negative number")
            setattr(state, name, float(value))
    if "kind" in body:
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int):
            raise _BadRequest("count must be an integer")
        try:
            state.inject(str(body["kind"]), count, route=str(body.get("route", "orders")))
        except ValueError as exc:
            raise _BadRequest(str(exc)) from exc
    if body.get("expire_tokens"):
        state.expire_tokens()


def control_router(state: SandboxState) -> APIRouter:
    """The ``/_sandbox`` routes over ``state``."""
    router = APIRouter(prefix="/_sandbox")

    @router.get("/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(state.stats())

    @router.post("/orders")
    async def put_order(request: Request) -> JSONResponse:
        """Create or replace an order from a JSON object (``id`` required)."""
        try:
            body = await _object(request, required=True)
            body["id"] = _order_id(body.get("id"))
            if "venue_id" in body:
                body["venue_id"] = _order_id(body["venue_id"])
        except _BadRequest as exc:
            return _bad(str(exc))
        state.put_order(body)
        return JSONResponse({"success": True, "data": state.get_order(body["id"])})

    @router.post("/orders/{order_id}/touch")
    async def touch(request: Request, order_id: int) -> JSONResponse:
        """Set the given fields (e.g. ``status``), bump ``updated_at``, notify by default."""
        try:
            body = await _object(request, required=False)
        except _BadRequest as exc:
            return _bad(str(exc))
        notify = bool(body.pop("notify", True))
        body.pop("id", None)
        state.notifier.bind(asyncio.get_running_loop())
        try:
            order = state.update_order(order_id, **body)
        except KeyError:
            return JSONResponse(
                {"success": False, "error": "resource_not_found", "message": "Order not found"},
                status_code=404,
            )
        notified = notify and state.notify(order_id, int(order["venue_id"]))
        log.info("sandbox.order.touched", order_id=order_id, notified=notified)
        return JSONResponse({"success": True, "data": order, "notified": notified})

    @router.post("/faults")
    async def faults(request: Request) -> JSONResponse:
        """Inject ``{kind, count, route}``; set delays; ``clear``; ``expire_tokens``."""
        try:
            _apply_faults(state, await _object(request, required=True))
        except _BadRequest as exc:
            return _bad(str(exc))
        return JSONResponse({"success": True, "faults": state.pending_faults()})

    @router.post("/reset")
    async def reset(request: Request) -> JSONResponse:
        """Counters, faults, windows, delays; ``{"orders": true}`` re-seeds the orders."""
        try:
            body = await _object(request, required=False)
        except _BadRequest as exc:
            return _bad(str(exc))
        state.reset(orders=bool(body.get("orders", False)))
        return JSONResponse({"success": True})

    return router
