"""Operator routes: ``/healthz`` (liveness), ``/readyz`` (named checks), ``/metrics``.

/healthz does no I/O: it says the event loop answers. /readyz says *why* when it is
not ready: every check has a name, ok, and a detail an on-call engineer can act on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import StoreError
from app.runtime import Runtime, RuntimeDep

router = APIRouter()


@dataclass
class Check:
    ok: bool
    detail: str
    warning: bool = False


async def _store_check(runtime: Runtime) -> Check:
    try:
        await runtime.store.ping()
    except StoreError as exc:
        return Check(False, f"store cannot commit: {exc}")
    return Check(True, "writable")


def _backlog_check(runtime: Runtime) -> Check:
    stats = runtime.last_stats
    if stats is None:
        return Check(False, f"stats unavailable: {runtime.last_store_error}")
    settings = runtime.config.settings
    problems = []
    for name, queue in stats.queues().items():
        if queue.pending > settings.ready_max_backlog:
            problems.append(f"{name} has {queue.pending} waiting (> {settings.ready_max_backlog})")
        age = queue.oldest_pending_age or 0.0
        if age > settings.ready_max_oldest_seconds:
            problems.append(
                f"{name} oldest waiting {age:.0f}s (> {settings.ready_max_oldest_seconds:.0f}s)"
            )
    if problems:
        return Check(False, "; ".join(problems))
    return Check(True, f"hydration waiting {stats.hydration.pending}")


def readiness_checks(runtime: Runtime, store_check: Check) -> dict[str, Check]:
    checks: dict[str, Check] = {"store": store_check}
    dead = [name for name, alive in runtime.loops_alive().items() if not alive]
    checks["workers"] = Check(not dead, f"not running: {', '.join(dead)}" if dead else "running")
    for brand in runtime.config.brands:
        pause = runtime.paused.get(brand)
        checks[f"credentials:{brand}"] = (
            Check(
                False,
                f"paused since {time.strftime('%H:%M:%S', time.gmtime(pause.since))}Z: "
                f"{pause.reason}",
            )
            if pause is not None
            else Check(True, "accepted")
        )
    for name, deliverer in runtime.deliverers.items():
        state = deliverer.breaker.state
        checks[f"sink:{name}"] = Check(
            state == "closed",
            "circuit closed" if state == "closed" else f"circuit {state} after repeated failures",
        )
    if runtime.poller is not None:
        for brand in runtime.config.brands:
            ok, detail = runtime.poller.readiness(brand)
            checks[f"poller:{brand}"] = Check(ok, detail)
    if runtime.orphaned_sinks:
        checks["unconfigured_sinks"] = Check(
            False,
            "deliveries wait for sinks not in SINKS: "
            + ", ".join(runtime.orphaned_sinks)
            + " (restore their names in SINKS: renaming a sink strands its queue)",
        )
    checks["backlog"] = _backlog_check(runtime)
    if runtime.config.settings.webhook_secret is None and (
        runtime.config.settings.webhook_allow_unauthenticated
    ):
        checks["webhook_auth"] = Check(
            True, "WEBHOOK_ALLOW_UNAUTHENTICATED=true: anyone can post notifications", warning=True
        )
    return checks


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    store_check = await _store_check(runtime)
    await runtime.refresh_state()
    checks = readiness_checks(runtime, store_check)
    ready = all(check.ok for check in checks.values())
    return JSONResponse(
        {"ready": ready, "checks": {name: asdict(check) for name, check in checks.items()}},
        status_code=200 if ready else 503,
    )


@router.get("/metrics")
async def metrics(runtime: RuntimeDep) -> Response:
    await runtime.refresh_state()
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
