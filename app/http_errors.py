"""Every error response, rendered in one place: ``{"error": <id>, "message": <text>}``.

- :class:`~app.errors.ApiError` raised by a route: its status, body and headers;
- :class:`~app.errors.StoreError` reaching a route: 503 ``store_unavailable`` with
  ``Retry-After`` (the sender retries; nothing was changed);
- the framework's 404 and 405 (with an ``Allow`` listing every method of the path) and
  request validation (422 ``invalid_request``).

Routes declare the statuses they answer with :func:`error_responses`, so the OpenAPI
document lists what each route really does (a schema fuzzer checks it in the tests).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ApiError, StoreError

STORE_RETRY_AFTER_SECONDS = 5

_DESCRIPTIONS = {
    400: "The request is malformed (e.g. the body is not a JSON object).",
    401: "Missing or invalid credentials.",
    404: "No such resource (e.g. an unknown brand or dead letter).",
    409: "A conflict (e.g. a replayed signed message).",
    413: "The body is larger than allowed.",
    422: "A parameter or the body's content is invalid.",
    503: "The store is unavailable; retry after Retry-After seconds.",
}


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str  # a stable identifier, e.g. "unknown_brand", "store_unavailable"
    message: str  # for a human


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route answers."""
    entries: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer"},
                }
            }
        entries[status] = entry
    return entries


def store_unavailable() -> ApiError:
    """What a :class:`StoreError` means to a client (the one place this is decided)."""
    return ApiError(
        503,
        "store_unavailable",
        "the store is unavailable; nothing was changed, retry later",
        {"Retry-After": str(STORE_RETRY_AFTER_SECONDS)},
    )


def render(exc: ApiError) -> JSONResponse:
    """The one renderer of an error body (also called by the webhook fast path, which
    runs ahead of FastAPI's exception handlers)."""
    return JSONResponse(
        {"error": exc.error, "message": exc.message}, status_code=exc.status, headers=exc.headers
    )


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI document gives the resource at ``path`` (a literal path
    wins over a template that happens to match it: /admin/dead-letters/replay is the
    replay resource, not a dead letter whose id is "replay")."""
    templated: list[str] = []
    for template, operations in app.openapi()["paths"].items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods = sorted(m.upper() for m in operations if m.upper() in _METHODS)
            if pattern == re.escape(template):
                return methods
            templated = templated or methods
    return templated


def _route_path(request: Request) -> str:
    """The path below root_path, as the router matched it."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def install(app: FastAPI) -> None:
    """Register the handlers; the only place an error body is built."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return render(store_unavailable())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette's Allow names only the first route's methods (routes are one per
            # method); say every method of the resource, as the document does.
            allowed = _allowed_methods(app, _route_path(request))
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        reasons = {404: "not_found", 405: "method_not_allowed"}
        error = reasons.get(exc.status_code, "http_error")
        return render(ApiError(exc.status_code, error, str(exc.detail), headers or None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return render(ApiError(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}"))
