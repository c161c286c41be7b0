"""``/admin/*``: dead letters, forced hydration and a status summary, for operators.

Mounted only when ``ADMIN_TOKEN`` is set (without it these routes do not exist, so a
misconfigured deployment cannot expose them). Every route needs
``Authorization: Bearer <ADMIN_TOKEN>``, compared in constant time.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BeforeValidator

from app import ids, signing
from app.errors import ApiError
from app.http_errors import error_responses
from app.logs import get_logger
from app.poller import PollStatus
from app.runtime import Runtime, RuntimeDep
from app.status import BrandStatus, ServiceStatus, budget_used_share
from app.store.base import DeadLetter, DeadLetterFilter, Notification

log = get_logger("app.admin")


async def require_admin(request: Request, runtime: RuntimeDep) -> None:
    expected = runtime.config.settings.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if (
        expected is None
        or scheme.lower() != "bearer"
        or not signing.constant_time_equals(token.strip(), expected.get_secret_value())
    ):
        raise ApiError(
            401,
            "unauthorized",
            "send Authorization: Bearer <ADMIN_TOKEN>",
            {"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(
    prefix="/admin",
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 422),
)

Mode = Literal["auto", "hydrate", "deliver"]
# Every integer an admin route takes is checked here, before any store call: a value the
# store cannot hold (31 digits overflow SQLite's 64-bit integer) is the caller's mistake,
# a 422, never a 503 "store unavailable".
ROW_ID_MAX = 2**63 - 1  # SQLite/PostgreSQL 64-bit row ids and cursors
_DIGITS = re.compile(r"[0-9]{1,19}")


def _digits(value: object) -> object:
    """Only plain ASCII digits are a number in a path or query (pydantic alone would
    also take " 1", "1\n", "1_0", "+1" and "1.0")."""
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be a whole number, in digits")
    return value


def _order_id(value: object) -> int:
    order_id = ids.parse_order_id(value)
    if order_id is None:
        raise ValueError(f"must be an order id: 1 to {ids.MAX_ID_DIGITS} digits, not 0")
    return order_id


Digits = BeforeValidator(_digits)
LetterId = Annotated[int, Path(ge=1, le=ROW_ID_MAX), Digits]
# ge/le repeat what _order_id enforces, so the OpenAPI document states the range.
OrderId = Annotated[int, Path(ge=ids.MIN_ID, le=ids.MAX_ID), BeforeValidator(_order_id)]
VenueId = Annotated[int | None, Query(ge=ids.MIN_ID, le=ids.MAX_ID), BeforeValidator(_order_id)]
Kind = Literal["hydration", "delivery"]


def _filter(
    brand: Annotated[str | None, Query(max_length=200)] = None,
    sink: Annotated[str | None, Query(max_length=200)] = None,
    reason: Annotated[str | None, Query(max_length=200)] = None,
    kind: Kind | None = None,
) -> DeadLetterFilter:
    return DeadLetterFilter(brand=brand, sink=sink, reason=reason, kind=kind)


FilterDep = Annotated[DeadLetterFilter, Depends(_filter)]


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    data = asdict(letter)
    data["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.created_at))
    return data


@router.get("/dead-letters", responses=error_responses(503))
async def list_dead_letters(
    runtime: RuntimeDep,
    filt: FilterDep,
    limit: Annotated[int, Query(ge=1, le=500), Digits] = 50,
    after_id: Annotated[int | None, Query(ge=0, le=ROW_ID_MAX), Digits] = None,
) -> dict[str, Any]:
    page = await runtime.store.list_dead_letters(filt, limit=limit, after_id=after_id)
    return {
        "items": [dead_letter_json(item) for item in page.items],
        "total": page.total,
        "next_cursor": page.next_cursor,
    }


@router.get("/dead-letters/{dead_letter_id}", responses=error_responses(404, 503))
async def show_dead_letter(dead_letter_id: LetterId, runtime: RuntimeDep) -> dict[str, Any]:
    letter = await runtime.store.get_dead_letter(dead_letter_id)
    if letter is None:
        raise ApiError(404, "not_found", f"no dead letter {dead_letter_id}")
    return dead_letter_json(letter)


@router.post("/dead-letters/replay", status_code=202, responses=error_responses(503))
async def replay_many(
    runtime: RuntimeDep,
    filt: FilterDep,
    mode: Mode = "auto",
    limit: Annotated[int, Query(ge=1, le=10_000), Digits] = 1000,
) -> JSONResponse:
    count = await runtime.store.replay_dead_letters(filt, mode=mode, now=time.time(), limit=limit)
    _wake(runtime)
    log.info("admin.replayed", count=count, mode=mode, **_filter_fields(filt))
    return JSONResponse({"replayed": count}, status_code=202)


@router.post(
    "/dead-letters/{dead_letter_id}/replay",
    status_code=202,
    responses=error_responses(404, 503),
)
async def replay_one(
    dead_letter_id: LetterId, runtime: RuntimeDep, mode: Mode = "auto"
) -> JSONResponse:
    done = await runtime.store.replay_dead_letter(dead_letter_id, mode=mode, now=time.time())
    if not done:
        raise ApiError(404, "not_found", f"no dead letter {dead_letter_id}")
    _wake(runtime)
    log.info("admin.replayed", dead_letter_id=dead_letter_id, mode=mode)
    return JSONResponse({"replayed": 1}, status_code=202)


@router.delete(
    "/dead-letters/{dead_letter_id}", status_code=204, responses=error_responses(404, 503)
)
async def purge_one(dead_letter_id: LetterId, runtime: RuntimeDep) -> Response:
    if not await runtime.store.purge_dead_letter(dead_letter_id):
        raise ApiError(404, "not_found", f"no dead letter {dead_letter_id}")
    log.info("admin.purged", dead_letter_id=dead_letter_id)
    return Response(status_code=204)


@router.delete("/dead-letters", responses=error_responses(400, 503))
async def purge_many(runtime: RuntimeDep, filt: FilterDep, all: bool = False) -> dict[str, int]:
    if not all and filt == DeadLetterFilter():
        raise ApiError(400, "filter_required", "give a filter, or all=true to purge everything")
    count = await runtime.store.purge_dead_letters(filt)
    log.info("admin.purged", count=count, **_filter_fields(filt))
    return {"purged": count}


@router.post("/orders/{order_id}/hydrate", status_code=202, responses=error_responses(404, 503))
async def hydrate_order(
    runtime: RuntimeDep,
    order_id: OrderId,
    brand: Annotated[str | None, Query(max_length=200)] = None,
    venue_id: VenueId = None,
) -> JSONResponse:
    name = brand or runtime.config.default_brand
    if name is None or name not in runtime.config.brands:
        raise ApiError(404, "unknown_brand", "no such brand is configured")
    result = await runtime.store.enqueue(
        Notification(
            brand=name,
            order_id=order_id,
            received_at=time.time(),
            venue_id=str(venue_id) if venue_id is not None else None,
            source="admin",
            force=True,
        )
    )
    runtime.wake_hydration()
    log.info("admin.hydrate", brand=name, order_id=order_id, job_id=result.job_id)
    return JSONResponse(
        {"accepted": True, "brand": name, "order_id": order_id, "job_id": result.job_id},
        status_code=202,
    )


@router.get("/status")
async def status(runtime: RuntimeDep) -> dict[str, Any]:
    """Everything `clopos-hydrator status` shows, as JSON: one ``Runtime.status()``."""
    return status_json(await runtime.status())


def status_json(status: ServiceStatus) -> dict[str, Any]:
    stats = status.store
    queues = {name: asdict(q) for name, q in stats.queues().items()} if stats else {}
    dead: dict[str, int] = {}
    for (kind, reason, sink), count in (stats.dead_letters if stats else {}).items():
        key = f"{kind}/{reason}" + (f"/{sink}" if sink else "")
        dead[key] = count
    brands = {
        name: {
            "tenant": brand.tenant,
            "credentials": "paused" if brand.paused else "accepted",
            "paused_reason": brand.paused_reason,
            "budget": asdict(brand.budget) if brand.budget is not None else None,
            "shared_budget": (
                asdict(brand.shared_budget) if brand.shared_budget is not None else None
            ),
            "poll": _poll_json(brand.poll),
            "reads": _reads_json(brand),
        }
        for name, brand in status.brands.items()
    }
    sinks = {
        name: {"kind": sink.kind, "circuit": sink.circuit, "in_flight": sink.in_flight}
        for name, sink in status.sinks.items()
    }
    return {
        "uptime_seconds": round(status.uptime_seconds, 1),
        "ready": status.ready,
        "failing_checks": {n: c.detail for n, c in status.checks.items() if not c.ok},
        "store_error": status.store_error,
        "queues": queues,
        "dead_letters": dead,
        "brands": brands,
        "sinks": sinks,
    }


def _iso(moment: float | None) -> str | None:
    return None if moment is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def _poll_json(poll: PollStatus | None) -> dict[str, Any] | None:
    """The brand's reconciliation poller position; None when polling is off."""
    if poll is None:
        return None
    return {
        "watermark": _iso(poll.watermark),
        "last_success_at": _iso(poll.last_success_at),
        "last_outcome": poll.last_outcome,
        "last_error": poll.last_error,
        "backlog_page": poll.backlog_page,
        "holder": poll.holder,
        "leading": poll.leading,
    }


def _reads_json(brand: BrandStatus) -> dict[str, Any] | None:
    """Orders hydrated per Clopos call (list and detail) and the share of the budget used."""
    reads = brand.reads
    if reads is None:
        return None
    return {
        "from_list": reads.from_list,
        "calls": dict(reads.calls),
        "orders": dict(reads.orders),
        "orders_per_call": reads.orders_per_call(),
        "budget_used_share": budget_used_share(brand.budget),
        "backlog": asdict(reads.backlog) if reads.backlog is not None else None,
    }


def _wake(runtime: Runtime) -> None:
    runtime.wake_hydration()
    runtime.wake_deliveries()


def _filter_fields(filt: DeadLetterFilter) -> dict[str, Any]:
    return {k: v for k, v in asdict(filt).items() if v is not None}
