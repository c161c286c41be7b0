"""Request ids and one access line per request, in the same structured format as the rest.

A pure ASGI middleware (cheaper than BaseHTTPMiddleware on the ingest hot path). The
request id comes from a sane ``X-Request-ID`` or is generated, is bound to the log
context for everything the request logs, and is echoed in the response. The query
string is never logged: it may carry the webhook token.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import get_logger

log = get_logger("app.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path: str = scope.get("path", "")
            quiet = path in _QUIET_PATHS and status < 400
            # The line's fields are computed only when it will be written (a webhook
            # request at LOG_LEVEL=warning writes none).
            if log.enabled_for(logging.DEBUG if quiet else logging.INFO):
                (log.debug if quiet else log.info)(
                    "http.request",
                    method=scope.get("method"),
                    path=path,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    client=_client(scope),
                )
            # Under uvicorn each request's task context ends with it, but a caller that
            # runs the app in its own context (httpx's ASGITransport, an embedding test)
            # must not keep this request's id, nor the trace ids the handler bound.
            structlog.contextvars.clear_contextvars()


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if _SANE_ID.match(text):
                return text
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


# Generated ids: 32 random bits per process, then a counter (16 hex digits in all). No
# system call per request: on the ingest hot path every syscall is a chance for another
# thread to take the GIL (os.urandom showed up at 7% in a profile, when the store's
# writer was a thread).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def _client(scope: Scope) -> Any:
    client = scope.get("client")
    return client[0] if client else None
