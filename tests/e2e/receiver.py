"""A sink receiver for end-to-end tests: a real HTTP server on loopback.

Every POST is verified with the reference ``standardwebhooks`` package (never with our
own signing code), against the one secret its path knows, and recorded with its arrival
time (``time.monotonic()``, comparable with the test's own clock), headers, body, the
verification result and the status it was answered with.

What each path answers can be changed while the service is delivering: a default reply
(``answer``), optionally preceded by scripted one-off replies (``answer_next``), e.g. a
429 with ``Retry-After`` once, then 200s.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.servers import ServerThread


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() when the request arrived
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    verified: bool
    status: int  # what the receiver answered

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class Receiver:
    """``with Receiver({"/a": secret_a}) as rec: rec.url("/a")``; paths are one segment."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._verifiers = {path: Webhook(secret) for path, secret in secrets.items()}
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._default: dict[str, Reply] = {path: Reply() for path in secrets}
        self._scripted: dict[str, deque[Reply]] = {path: deque() for path in secrets}
        app = Starlette(routes=[Route("/{name}", self._handle, methods=["POST"])])
        self._server = ServerThread(app)

    def url(self, path: str) -> str:
        return f"{self._server.url}{path}"

    def answer(self, path: str, status: int = 200, **kwargs: Any) -> None:
        """From now on, answer ``path`` this way (after any scripted replies)."""
        with self._lock:
            self._default[path] = Reply(status, **kwargs)

    def answer_next(self, path: str, *replies: Reply) -> None:
        """Answer the next requests to ``path`` with these replies, once each, in order."""
        with self._lock:
            self._scripted[path].extend(replies)

    def received(self, path: str | None = None, *, accepted: bool = False) -> list[Received]:
        """What arrived (oldest first), for one path or all; only 2xx-answered if asked."""
        with self._lock:
            items = list(self._received)
        return [
            r for r in items if (path is None or r.path == path) and (r.accepted or not accepted)
        ]

    async def _handle(self, request: Request) -> Response:
        arrived = time.monotonic()
        path = "/" + request.path_params["name"]
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verifier = self._verifiers.get(path)
        verified = False
        if verifier is not None:
            try:
                verifier.verify(body, headers)
                verified = True
            except (WebhookVerificationError, ValueError):  # binascii.Error is a ValueError
                verified = False
        with self._lock:
            scripted = self._scripted.get(path)
            reply = scripted.popleft() if scripted else self._default.get(path, Reply(404))
            self._received.append(Received(arrived, path, headers, body, verified, reply.status))
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return Response(
            json.dumps({"status": reply.status}),
            status_code=reply.status,
            headers=reply.headers,
            media_type="application/json",
        )

    def __enter__(self) -> Receiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
