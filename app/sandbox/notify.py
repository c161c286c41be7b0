"""Best-effort "order changed" notifications from the sandbox to a webhook receiver.

Clopos does not publish webhooks yet; the sandbox sends the thin shape the hydrator accepts
(``{"event": "order.updated", "data": {"id", "venue_id"}}`` with ``X-Webhook-Token``) so a
demo shows the whole flow. Sending never blocks the caller and never raises: a failure is a
log line. The caller may be a route on the server's loop, or a test thread with no loop, so
the coroutine goes to the running loop, else to the server loop seen last, else to a
short-lived thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import httpx

from app.logs import get_logger

log = get_logger("app.sandbox.notify")
NOTIFY_TIMEOUT_SECONDS = 5.0


async def post_notification(url: str, token: str | None, body: dict[str, Any]) -> bool:
    """POST one notification; True on a 2xx. Failures are logged, never raised."""
    headers = {"X-Webhook-Token": token} if token else {}
    order_id = body.get("data", {}).get("id")
    try:
        async with httpx.AsyncClient(timeout=NOTIFY_TIMEOUT_SECONDS) as client:
            response = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("sandbox.notify.failed", order_id=order_id, error=type(exc).__name__)
        return False
    if response.is_success:
        log.info("sandbox.notify.sent", order_id=order_id, status=response.status_code)
        return True
    log.warning("sandbox.notify.refused", order_id=order_id, status=response.status_code)
    return False


class Notifier:
    """Schedules :func:`post_notification` without blocking, from any thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        # Strong references: the loop keeps only weak ones to running tasks.
        self._pending: set[asyncio.Future[bool] | concurrent.futures.Future[bool]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the server's loop, so other threads can schedule onto it."""
        self._loop = loop

    def send(self, url: str, token: str | None, body: dict[str, Any]) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            self._keep(running.create_task(post_notification(url, token, body)))
            return
        loop = self._loop
        if loop is not None and loop.is_running():
            coro = post_notification(url, token, body)
            self._keep(asyncio.run_coroutine_threadsafe(coro, loop))
            return
        # No server loop (e.g. state used before the server started): a thread of its own.
        thread = threading.Thread(
            target=asyncio.run, args=(post_notification(url, token, body),), daemon=True
        )
        thread.start()

    def _keep(self, future: asyncio.Future[bool] | concurrent.futures.Future[bool]) -> None:
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
