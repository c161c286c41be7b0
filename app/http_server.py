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

**Two listeners** (``OPS_PORT``): ``/metrics`` and ``/readyz`` name the brands and
``/admin/*`` is the operator's API, so they can be kept off the public listener. With
``OPS_PORT`` set, the public port (``--port``) serves only the webhook routes and
``/healthz`` (everything else is a 404 there), and the whole app is also served on
``OPS_HOST:OPS_PORT`` (default host 127.0.0.1). Both listeners share one app, one runtime
and one event loop; the public one owns the lifespan and the signals, the ops one stops
with it.

``serve`` and ``sandbox`` both build their listeners with :func:`build_listeners`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import httptools
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import ConfigError
from app.logs import get_logger
from app.settings import Settings

log = get_logger("app.http")

Lifespan = Literal["auto", "on", "off"]
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
        if self._reading_head:  # a head still arriving, or nothing at all
            answer = self._head_bytes > 0
        else:  # a body still arriving: unless the app has answered already (a 413, say)
            answer = self.cycle is not None and not self.cycle.response_started
        self._refuse(408, "request not received in time", reason="request_timeout", answer=answer)

    def _refuse(self, status: int, message: str, *, reason: str, answer: bool = True) -> None:
        """Answer ``status`` (if ``answer``) and close the connection. A request the app
        is still reading sees the client hang up."""
        _refusals.note(reason, self.client)
        if answer:
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


def build_server(
    app: Any, *, host: str, port: int, settings: Settings, lifespan: Lifespan = "auto"
) -> uvicorn.Server:
    """One listener, with the limits above."""
    return uvicorn.Server(_config(app, host=host, port=port, settings=settings, lifespan=lifespan))


def _config(
    app: Any, *, host: str, port: int, settings: Settings, lifespan: Lifespan
) -> uvicorn.Config:
    limits = HttpLimits.from_settings(settings)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        lifespan=lifespan,
        log_config=None,  # our logging, configured already
        access_log=False,  # our access line has the request id
        # Connections get a few seconds; the runtime has its own grace after that.
        timeout_graceful_shutdown=5,
        proxy_headers=True,
        # uvicorn answers 503 once connections or requests in progress reach this; it
        # counts the asking connection too, hence the one more than the cap above.
        limit_concurrency=limits.max_connections + 1,
    )


# --- one listener, or a public one and an ops one -------------------------------------------

# What the public listener serves when the ops routes have their own: the webhooks, and
# the liveness probe (it says nothing but "ok").
PUBLIC_PREFIXES = ("/webhooks/",)
PUBLIC_PATHS = frozenset({"/healthz"})


class PublicOnly:
    """The public listener's app when ``OPS_PORT`` is set: the webhook routes (and
    ``/healthz``) pass, every other path is a plain 404 that names nothing."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path not in PUBLIC_PATHS and not path.startswith(self.prefixes):
                response = JSONResponse({"error": "not_found", "message": "Not Found"}, 404)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)  # lifespan, and the public routes


class _OpsServer(uvicorn.Server):
    """The ops listener: the public one handles signals and the lifespan; this one
    stops when that one does."""

    def __init__(self, config: uvicorn.Config, leader: uvicorn.Server) -> None:
        super().__init__(config)
        self.leader = leader

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if self.leader.should_exit:
            return True
        return await super().on_tick(counter)


@dataclass
class Listeners:
    """The public listener (``main``: lifespan, signals, exit) and the optional ops one."""

    main: uvicorn.Server
    ops: uvicorn.Server | None = field(default=None)

    async def serve(self) -> None:
        main = asyncio.create_task(self.main.serve())
        ops = asyncio.create_task(self._serve_ops(main)) if self.ops is not None else None
        try:
            await main
        finally:
            if ops is not None and self.ops is not None:
                self.ops.should_exit = True
                await asyncio.gather(ops, return_exceptions=True)

    async def _serve_ops(self, main: asyncio.Task[None]) -> None:
        assert self.ops is not None
        # Not before the runtime has started (the public listener's lifespan does that).
        while not self.main.started:
            if main.done():
                return
            await asyncio.sleep(0.05)
        await self.ops.serve()
        if not self.ops.started:  # could not bind: stop the service rather than run half
            log.critical("service.ops_listener_failed", port=self.ops.config.port)
            self.main.should_exit = True


def build_listeners(
    app: Any, *, host: str, port: int, settings: Settings, public_prefixes: tuple[str, ...] = ()
) -> Listeners:
    """The listener(s) ``serve`` and ``sandbox`` run: one for everything, or with
    ``OPS_PORT`` a public one for the webhooks and an ops one for the rest."""
    if settings.ops_port is None:
        return Listeners(build_server(app, host=host, port=port, settings=settings))
    if settings.ops_port == port:
        raise ConfigError("OPS_PORT", f"must differ from the public port ({port})")
    public = PublicOnly(app, PUBLIC_PREFIXES + public_prefixes)
    main = build_server(public, host=host, port=port, settings=settings)
    ops_config = _config(
        app, host=settings.ops_host, port=settings.ops_port, settings=settings, lifespan="off"
    )
    return Listeners(main, _OpsServer(ops_config, main))
