"""The webhook paths served as a plain ASGI handler, ahead of FastAPI's stack.

``POST /webhooks/clopos[/{brand}]`` is the one route whose speed the service alone
decides. Through FastAPI (its middleware stack, route matching, dependency solving,
the endpoint wrapper) it spent about half of the event loop's time per notification
under load on the framework (docs/benchmarks.md). :class:`WebhookRoute` answers
exactly those two paths by calling the same handler the FastAPI routes call
(:func:`app.ingest.handle`), so every check, answer and log line is the same; the
service app (:mod:`app.service`) sends it those requests, wrapped in the same access
log, and everything else to FastAPI. The routes stay declared on the router, so a
request that does not match here exactly (a trailing slash, another method) is
answered by FastAPI as before.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from app import ingest
from app.runtime import Runtime

_DEFAULT_PATH = "/webhooks/clopos"
_BRAND_PREFIX = _DEFAULT_PATH + "/"


class _NotWebhook:
    """Marker: the request is not for a webhook route (None means the default brand)."""


NOT_WEBHOOK = _NotWebhook()


def webhook_brand(path: str) -> str | _NotWebhook | None:
    """The brand a webhook path names, None for the default path, else ``NOT_WEBHOOK``.

    Matches what the router would: ``{brand}`` is one non-empty path segment.
    """
    if path == _DEFAULT_PATH:
        return None
    if path.startswith(_BRAND_PREFIX):
        brand = path[len(_BRAND_PREFIX) :]
        if brand and "/" not in brand:
            return brand
    return NOT_WEBHOOK


def match(scope: Scope) -> str | _NotWebhook | None:
    """The brand of a webhook request, None for the default brand, else ``NOT_WEBHOOK``."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return NOT_WEBHOOK
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):  # the router matches the path below root_path
        path = path[len(root) :]
    return webhook_brand(path)


class WebhookRoute:
    """The ASGI app of the webhook paths (only ever given a request :func:`match` took)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        brand = match(scope)
        if isinstance(brand, _NotWebhook):  # a caller's bug: say so rather than guess
            raise RuntimeError(f"not a webhook request: {scope.get('path')!r}")
        response = await ingest.handle(self.runtime, scope, receive, brand)
        await response(scope, receive, send)
