"""Operator routes: ``/healthz`` (liveness), ``/readyz`` (named checks), ``/metrics``.

/healthz does no I/O: it says the event loop answers. /readyz says *why* when it is
not ready: every check has a name, ok, and a detail an on-call engineer can act on.
Both /readyz and /metrics render one ``Runtime.status()`` read for the request
(app/status.py), so neither can show what the other does not.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from app.runtime import RuntimeDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, dict[str, Any]]  # name -> {ok, detail, warning}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: the failing checks say why."}},
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    status = await runtime.status()
    checks = {name: asdict(check) for name, check in status.checks.items()}
    return JSONResponse(
        {"ready": status.ready, "checks": checks}, status_code=200 if status.ready else 503
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text exposition format."}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    status = await runtime.status()
    return Response(runtime.metrics.render(status), media_type=CONTENT_TYPE_LATEST)
