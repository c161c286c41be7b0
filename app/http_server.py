"""The HTTP listener: uvicorn on httptools, with the limits a public endpoint needs.

uvicorn's httptools protocol (the fast one) has no limit on the size of a request head
and no deadline for receiving a request: five connections each sending 16 MiB of one
header grew the process by 117 MB, and 100 connections trickling a header line every
2 s were all still open after 40 s. h11 caps the head, but is markedly slower on the
202 path. So the httptools protocol is kept and guarded here, at the protocol level,
before any ASGI code runs:

- **Head size** (``HTTP_MAX_HEADER_BYTES``): the request line plus headers. Bytes
  received while the head is incomplete are counted as they arrive (so an unfinished
  header never grows past the cap plus one read), and the parsed head is measured
  exactly. Over the cap: 431 and the connection is closed.
- **Request deadline** (``HTTP_REQUEST_TIMEOUT_SECONDS``): a request (head and body)
  must be fully received within this from its first byte, and a new connection must
  complete its first request within it. Otherwise: 408 (if anything was received and
  no answer has begun) and the connection is closed. The app sees a client that hung
  up. Idle keep-alive connections are closed by uvicorn after 5 s as before.
- **Connections** (``HTTP_MAX_CONNECTIONS``): one more is answered 503 and closed at
  once; uvicorn's ``limit_concurrency`` also bounds requests in progress.

``serve`` and ``sandbox`` both build their server with :func:`build_server`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.logs import get_logger
from app.settings import Settings

log = get_logger("app.http")

# Refusals are logged at most this often (with a count): a flood must not flood the log.
_REFUSAL_LOG_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    request_timeout_seconds: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            request_timeout_seconds=settings.http_request_timeout_seconds,
            max_connections=settings.http_max_connections,
        )


class _HeadTooLarge(Exception):
    """Raised from a parser callback; httptools re-raises it as the context of an
    HttpParserCallbackError, which :meth:`GuardedHttpToolsProtocol.data_received` maps
    to a 431."""


class _RefusalLog:
    """Counts refusals by reason and logs them in batches."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last = 0.0

    def note(self, reason: str, client: Any) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self.last >= _REFUSAL_LOG_INTERVAL_SECONDS:
            log.warning("http.refused", counts=self.counts, last_client=client)
            self.counts = {}
            self.last = now


_refusals = _RefusalLog()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head cap, a request deadline and a
    connection cap. :func:`guarded_protocol` binds the limits."""

    limits: ClassVar[HttpLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # the current request's head is not complete yet
        self._head_bytes = 0  # bytes received while it was not (an upper bound)
        self._deadline: asyncio.TimerHandle | None = None

    # --- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too many connections", reason="max_connections")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own data_received, except that a head over the cap is a 431.
        if self._reading_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse_head()
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self._reading_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head()  # an unfinished head already past the cap

    # --- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._arm()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        # The exact size, once per request (cheaper than a check per header callback);
        # memory was bounded meanwhile by the count of bytes received.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            raise _HeadTooLarge  # before the app is started for this request
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()  # fully received: the app may take its time to answer
        self._reading_head = True
        self._head_bytes = 0

    # --- limits -------------------------------------------------------------------------

    def _refuse_head(self) -> None:
        self._refuse(431, "request header fields too large", reason="header_too_large")

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(
                self.limits.request_timeout_seconds, self._deadline_passed
            )

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        started = self._head_bytes > 0 or cycle is not None
        if started and (cycle is None or cycle.response_complete or not cycle.response_started):
            self._refuse(408, "request not received in time", reason="request_timeout")
        else:
            _refusals.note("request_timeout", self.client)
            self.transport.close()

    def _refuse(self, status: int, message: str, *, reason: str) -> None:
        """Answer ``status`` (when no answer has begun) and close the connection. A
        request the app is still reading sees the client hang up."""
        _refusals.note(reason, self.client)
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = message.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status, _PHRASES[status], len(body), body)
            )
        # connection_lost then tells a running app that the client is gone.
        self.transport.close()


_PHRASES = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def guarded_protocol(limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to ``limits``."""
    bound: type[GuardedHttpToolsProtocol] = type(
        "GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits}
    )
    return bound


def build_server(app: Any, *, host: str, port: int, settings: Settings) -> uvicorn.Server:
    """The one place the listener is configured (``serve`` and ``sandbox``)."""
    limits = HttpLimits.from_settings(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        log_config=None,  # our logging, configured already
        access_log=False,  # our access line has the request id
        # Connections get a few seconds; the runtime has its own grace after that.
        timeout_graceful_shutdown=5,
        proxy_headers=True,
        # uvicorn answers 503 once connections or requests in progress reach this; it
        # counts the asking connection too, hence the one more than the cap above.
        limit_concurrency=limits.max_connections + 1,
    )
    return uvicorn.Server(config)
