"""The ASGI application: routes, middleware, JSON errors, and the runtime's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__, admin, http_errors, ingest, ops
from app.access_log import AccessLogMiddleware
from app.runtime import Runtime
from app.settings import Config
from app.webhook_route import NOT_WEBHOOK, WebhookRoute, match


class ServiceApp(FastAPI):
    """FastAPI, except that webhook requests go straight to their own handler (wrapped in
    the same access log), ahead of FastAPI's middleware stack: see app/webhook_route.py."""

    webhook_app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.webhook_app is not None and match(scope) is not NOT_WEBHOOK:
            await self.webhook_app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(config: Config, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the service. The runtime starts with the app's lifespan and stops with it."""
    rt = runtime or Runtime(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await rt.start()
        try:
            yield
        finally:
            await rt.stop()

    app = ServiceApp(
        title="clopos-hydrator",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # No "/path/ -> /path" redirects: a redirect repeats the query string in its
        # Location, and a webhook's query may carry ?token=. A wrong path is a plain 404.
        redirect_slashes=False,
    )
    app.state.runtime = rt
    app.webhook_app = AccessLogMiddleware(WebhookRoute(rt))
    app.include_router(ingest.router)
    app.include_router(ops.router)
    if config.settings.admin_token is not None:
        app.include_router(admin.router)
    http_errors.install(app)
    app.add_middleware(AccessLogMiddleware)
    return app
