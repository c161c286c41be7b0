"""The stand-ins the benchmarks run, each as a module-level ASGI app for its own
``uvicorn`` process (off the load generator's interpreter):

* ``sandbox_app``: the Clopos sandbox, its budget lifted (``BENCH_SANDBOX_SEED`` orders,
  ``BENCH_SANDBOX_LIMIT`` calls per minute);
* ``sink_app``: a counting sink. ``POST`` anywhere records the delivered ``order_id``
  and when it arrived; ``GET /count`` answers ``{"deliveries", "orders", "last_at"}``
  (distinct orders, epoch seconds); ``GET /orders`` answers ``{order_id: first delivery
  at}``; ``POST /outage?seconds=S`` answers 503 to every
  delivery for S seconds; ``POST /reset`` forgets everything;
* ``naive_app``: the design the service replaces: FastAPI ``BackgroundTasks`` that fetch
  the order and forward it in-process, no store (``NAIVE_CLOPOS_URL``, ``NAIVE_SINK_URL``);
* ``relay_app``: the raw fetch-and-forward loop fed by webhooks: a plain ASGI handler
  answers 202 and queues the order id in memory, ``RELAY_CONCURRENCY`` aiohttp workers
  fetch and forward, with the raw loop's client settings (aiohttp, 64 connections). No
  store, no retries, no signing: what a webhook-driven design costs on these cores
  before it keeps anything. ``GET`` anywhere answers ``{"lost", "last_error"}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from app.clopos.client import RECEIPT_QUERY
from app.sandbox import SandboxState, create_sandbox_app
from benchmarks.common import SANDBOX_AUTH

sandbox_app = create_sandbox_app(
    SandboxState(
        seed_orders=int(os.environ.get("BENCH_SANDBOX_SEED", "300")),
        tenant_limit_per_minute=int(os.environ.get("BENCH_SANDBOX_LIMIT", "1000000")),
        auth_limit_per_minute=1_000_000,
        failed_limit_per_minute=1_000_000_000,
    )
)


class _Sink:
    def __init__(self) -> None:
        self.deliveries = 0
        self.orders: dict[int, float] = {}  # order id -> first delivery (epoch seconds)
        self.last_at = 0.0
        self.outage_until = 0.0

    def snapshot(self) -> bytes:
        return json.dumps(
            {"deliveries": self.deliveries, "orders": len(self.orders), "last_at": self.last_at}
        ).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        body = await _read_body(receive)
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/count":
            await _answer(send, 200, self.snapshot())
        elif method == "GET" and path == "/orders":
            await _answer(send, 200, json.dumps(self.orders).encode())
        elif method == "POST" and path == "/outage":
            query = dict(
                item.split("=", 1) for item in scope["query_string"].decode().split("&") if item
            )
            self.outage_until = time.time() + float(query.get("seconds", "0"))
            await _answer(send, 200, b"{}")
        elif method == "POST" and path == "/reset":
            self.__init__()  # type: ignore[misc]
            await _answer(send, 200, b"{}")
        elif time.time() < self.outage_until:
            await _answer(send, 503, b'{"error":"outage"}')
        else:
            self.deliveries += 1
            self.last_at = time.time()
            self.orders.setdefault(int(json.loads(body)["order_id"]), self.last_at)
            await _answer(send, 200, b"{}")


async def _read_body(receive: Receive) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


sink_app = _Sink()


# --- the naive design ---------------------------------------------------------------------

_naive: dict[str, Any] = {}


@asynccontextmanager
async def _naive_lifespan(app: FastAPI) -> AsyncIterator[None]:
    # httpx's defaults (100 connections, 5 s pool timeout): what the naive design used.
    async with httpx.AsyncClient(timeout=10) as client:
        _naive["client"] = client
        # One token for the process, fetched before any notification is taken.
        _naive["token"] = await _naive_token(client, os.environ["NAIVE_CLOPOS_URL"])
        yield


naive_app = FastAPI(lifespan=_naive_lifespan)


async def _naive_token(client: httpx.AsyncClient, base: str) -> str:
    response = await client.post(f"{base}/v2/auth", json=SANDBOX_AUTH)
    response.raise_for_status()
    token: str = response.json()["token"]
    return token


async def _fetch_and_forward(order_id: int) -> None:
    """What a background task of the naive design does; a failure loses the order."""
    client: httpx.AsyncClient = _naive["client"]
    base, sink = os.environ["NAIVE_CLOPOS_URL"], os.environ["NAIVE_SINK_URL"]
    try:
        response = await client.get(
            f"{base}/v2/orders/{order_id}?{RECEIPT_QUERY}", headers={"x-token": _naive["token"]}
        )
        response.raise_for_status()
        order = response.json()["data"]
        posted = await client.post(sink, json={"order_id": order_id, "order": order})
        posted.raise_for_status()
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        _naive["lost"] = _naive.get("lost", 0) + 1
        _naive["last_error"] = repr(exc)


@naive_app.get("/healthz")
async def _naive_health() -> JSONResponse:
    return JSONResponse({"lost": _naive.get("lost", 0), "last_error": _naive.get("last_error")})


@naive_app.post("/webhooks/clopos")
async def _naive_webhook(request: Request, tasks: BackgroundTasks) -> JSONResponse:
    document = json.loads(await request.body())
    order_id = int(document["data"]["id"])
    tasks.add_task(_fetch_and_forward, order_id)
    return JSONResponse({"accepted": True, "order_id": order_id}, status_code=202, background=tasks)


# --- the raw relay: webhooks in, fetch and forward, nothing kept ------------------------------


class _Relay:
    def __init__(self) -> None:
        self.lost = 0
        self.last_error: str | None = None
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._token = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = await _read_body(receive)
        if scope["method"] == "GET":
            health = {"lost": self.lost, "last_error": self.last_error}
            await _answer(send, 200, json.dumps(health).encode())
            return
        order_id = int(json.loads(body)["data"]["id"])
        self._queue.put_nowait(order_id)
        await _answer(send, 202, b'{"accepted":true,"order_id":%d}' % order_id)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:
                    # Said, not swallowed: uvicorn would otherwise serve 202s with no
                    # workers behind them, and every order would be lost unexplained.
                    if self._session is not None:
                        await self._session.close()
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for worker in self._workers:
                    worker.cancel()
                await asyncio.gather(*self._workers, return_exceptions=True)
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        base = os.environ["NAIVE_CLOPOS_URL"]
        async with self._session.post(f"{base}/v2/auth", json=SANDBOX_AUTH) as answer:
            self._token = (await answer.json())["token"]
        concurrency = int(os.environ.get("RELAY_CONCURRENCY", "32"))
        self._workers = [asyncio.create_task(self._work()) for _ in range(concurrency)]

    async def _work(self) -> None:
        assert self._session is not None
        base, sink = os.environ["NAIVE_CLOPOS_URL"], os.environ["NAIVE_SINK_URL"]
        while True:
            order_id = await self._queue.get()
            try:
                url = f"{base}/v2/orders/{order_id}?{RECEIPT_QUERY}"
                async with self._session.get(url, headers={"x-token": self._token}) as response:
                    order = (await response.json())["data"]
                body = {"order_id": order_id, "order": order}
                async with self._session.post(sink, json=body) as posted:
                    posted.raise_for_status()
            except Exception as exc:  # a lost order is counted, and the worker goes on
                self.lost += 1
                self.last_error = repr(exc)


relay_app = _Relay()
