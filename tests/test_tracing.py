"""OpenTelemetry traces of a notification's journey, read from the SDK's in-memory exporter.

The service runs in this test's event loop (uvicorn on a loopback port) with a tracer
provider whose spans land in memory; Clopos is the sandbox and the sink a real receiver,
both on loopback. No tracing code of ours is bypassed or replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app import tracing
from app.runtime import Runtime
from app.sandbox import SandboxState, create_sandbox_app
from app.service import create_app
from app.settings import load_settings
from app.store.base import Notification
from app.store.sqlite import SqliteStore
from tests.e2e.service import SANDBOX_CREDENTIALS
from tests.e2e.test_operations import SinkReceiver, sinks
from tests.servers import ServerThread, free_port

SECRET = "tracing-webhook-secret"
INBOUND_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INBOUND_SPAN = "00f067aa0ba902b7"
INBOUND = f"00-{INBOUND_TRACE}-{INBOUND_SPAN}-01"


@dataclass
class Traced:
    url: str
    exporter: InMemorySpanExporter
    receiver: SinkReceiver
    provider: TracerProvider

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str, trace_id: int | None = None) -> list[ReadableSpan]:
        return [
            s
            for s in self.spans()
            if s.name == name and (trace_id is None or s.context.trace_id == trace_id)
        ]


@pytest.fixture
def sandbox() -> Iterator[str]:
    with ServerThread(create_sandbox_app(SandboxState(seed_orders=50))) as server:
        yield f"{server.url}/open-api"


@pytest.fixture
def receiver() -> Iterator[tuple[SinkReceiver, str]]:
    rx = SinkReceiver()
    with ServerThread(rx.app) as server:
        yield rx, f"{server.url}/hook"


async def wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    assert await wait_for(lambda: server.started or task.done(), timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def traced(
    tmp_path: Path, sandbox: str, receiver: tuple[SinkReceiver, str]
) -> AsyncIterator[Traced]:
    rx, hook = receiver
    config = load_settings(
        clopos_base_url=sandbox,
        clopos_client_id=SANDBOX_CREDENTIALS["CLOPOS_CLIENT_ID"],
        clopos_client_secret=SANDBOX_CREDENTIALS["CLOPOS_CLIENT_SECRET"],
        clopos_brand=SANDBOX_CREDENTIALS["CLOPOS_BRAND"],
        clopos_integrator_id=SANDBOX_CREDENTIALS["CLOPOS_INTEGRATOR_ID"],
        webhook_secret=SECRET,
        database_url=f"sqlite:///{tmp_path / 'traced.db'}",
        poll_interval_seconds=0,
        sinks=json.loads(sinks(hook)),
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Two notifications of order 1003, from two senders' traces, wait in the store
    # before the service starts: its first claim of that job covers (coalesces) both.
    store = SqliteStore(tmp_path / "traced.db")
    await store.open()
    tracer = provider.get_tracer("test-senders")
    for sender in ("first", "second"):
        with tracer.start_as_current_span(f"sender.{sender}"):
            notice = Notification(
                brand="sandbox",
                order_id=1003,
                received_at=time.time(),
                traceparent=tracing.current_traceparent(),
            )
            await store.enqueue(notice)
    await store.close()
    runtime = Runtime(config, tracer_provider=provider)
    async with serve(create_app(config, runtime=runtime)) as url:
        yield Traced(url, exporter, rx, provider)


async def test_one_trace_follows_a_notification_from_ingest_to_each_sink(
    traced: Traced,
) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{traced.url}/webhooks/clopos",
            headers={
                "X-Webhook-Token": SECRET,
                "traceparent": f"00-{INBOUND_TRACE}-{INBOUND_SPAN}-01",
            },
            json={"data": {"id": 1001}},
        )
    assert response.status_code == 202, response.text
    trace_id = int(INBOUND_TRACE, 16)
    assert await wait_for(
        lambda: len(traced.named("delivery", trace_id)) >= 2 and traced.receiver.received(1001)
    ), [s.name for s in traced.spans()]

    (ingest,) = traced.named("webhook.receive", trace_id)
    assert ingest.kind == SpanKind.SERVER
    assert ingest.parent is not None
    assert ingest.parent.span_id == int(INBOUND_SPAN, 16)  # the sender's span continues
    assert ingest.attributes is not None
    assert ingest.attributes["http.response.status_code"] == 202
    assert ingest.attributes["clopos.order_id"] == 1001

    (hydration,) = traced.named("hydration", trace_id)
    assert hydration.parent is not None
    assert hydration.parent.span_id == ingest.context.span_id
    assert hydration.attributes is not None
    assert hydration.attributes["clopos.outcome"] == "stored"
    assert [link.context.span_id for link in hydration.links] == [ingest.context.span_id]

    (call,) = traced.named("GET /v2/orders/{id}", trace_id)
    assert call.kind == SpanKind.CLIENT
    assert call.parent is not None
    assert call.parent.span_id == hydration.context.span_id
    assert call.attributes is not None
    assert call.attributes["http.request.method"] == "GET"
    assert call.attributes["url.template"] == "/v2/orders/{id}"
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["clopos.budget_wait_ms"] >= 0

    deliveries = {s.attributes["clopos.sink"]: s for s in traced.named("delivery", trace_id)}
    assert set(deliveries) == {"hook", "log"}
    for span in deliveries.values():
        assert span.parent is not None
        assert span.parent.span_id == ingest.context.span_id
        assert span.attributes is not None
        assert span.attributes["clopos.attempt"] == 1
        assert span.attributes["clopos.outcome"] == "delivered"
    # The HTTP sink received the delivery span as its parent (W3C traceparent).
    (request,) = traced.receiver.received(1001)
    hook = deliveries["hook"].context
    assert request["headers"]["traceparent"] == (f"00-{hook.trace_id:032x}-{hook.span_id:016x}-01")


async def test_a_job_that_coalesces_notifications_links_to_each_of_their_traces(
    traced: Traced,
) -> None:
    senders = {s.name: s for s in traced.spans() if s.name.startswith("sender.")}
    assert set(senders) == {"sender.first", "sender.second"}
    assert await wait_for(lambda: traced.receiver.received(1003))
    hydrations = [
        s
        for s in traced.named("hydration")
        if s.attributes is not None and s.attributes["clopos.order_id"] == 1003
    ]
    (hydration,) = hydrations
    assert hydration.attributes is not None
    assert hydration.attributes["clopos.notifications"] == 2
    linked = {link.context.trace_id for link in hydration.links}
    assert linked == {s.context.trace_id for s in senders.values()}
    # It lives in the first notification's trace.
    assert hydration.context.trace_id == senders["sender.first"].context.trace_id


async def test_without_a_tracer_nothing_is_recorded_and_no_traceparent_is_sent(
    tmp_path: Path, sandbox: str, receiver: tuple[SinkReceiver, str]
) -> None:
    rx, hook = receiver
    config = load_settings(
        clopos_base_url=sandbox,
        clopos_client_id=SANDBOX_CREDENTIALS["CLOPOS_CLIENT_ID"],
        clopos_client_secret=SANDBOX_CREDENTIALS["CLOPOS_CLIENT_SECRET"],
        clopos_brand=SANDBOX_CREDENTIALS["CLOPOS_BRAND"],
        clopos_integrator_id=SANDBOX_CREDENTIALS["CLOPOS_INTEGRATOR_ID"],
        webhook_secret=SECRET,
        database_url=f"sqlite:///{tmp_path / 'untraced.db'}",
        poll_interval_seconds=0,
        sinks=json.loads(sinks(hook)),
    )
    runtime = Runtime(config)
    assert runtime.tracer is None
    async with serve(create_app(config, runtime=runtime)) as url, httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/clopos",
            headers={
                "X-Webhook-Token": SECRET,
                "traceparent": f"00-{INBOUND_TRACE}-{INBOUND_SPAN}-01",
            },
            json={"data": {"id": 1002}},
        )
        assert response.status_code == 202
        assert await wait_for(lambda: rx.received(1002))
    (request,) = rx.received(1002)
    assert "traceparent" not in request["headers"]


async def test_an_order_the_poller_found_has_one_trace_from_the_poll_to_the_sink(
    tmp_path: Path, sandbox: str, receiver: tuple[SinkReceiver, str]
) -> None:
    rx, hook = receiver
    config = load_settings(
        clopos_base_url=sandbox,
        clopos_client_id=SANDBOX_CREDENTIALS["CLOPOS_CLIENT_ID"],
        clopos_client_secret=SANDBOX_CREDENTIALS["CLOPOS_CLIENT_SECRET"],
        clopos_brand=SANDBOX_CREDENTIALS["CLOPOS_BRAND"],
        clopos_integrator_id=SANDBOX_CREDENTIALS["CLOPOS_INTEGRATOR_ID"],
        webhook_secret=SECRET,
        database_url=f"sqlite:///{tmp_path / 'polled.db'}",
        poll_interval_seconds=30,  # one cycle at start finds the recently changed orders
        # The notice path (a listed change enqueued, then fetched): with list hydration
        # on, the poller delivers straight from its page, with no hydration job to trace.
        hydrate_from_list=False,
        sinks=json.loads(sinks(hook)),
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def hook_deliveries() -> list[ReadableSpan]:
        return [
            s
            for s in exporter.get_finished_spans()
            if s.name == "delivery"
            and s.attributes is not None
            and s.attributes["clopos.sink"] == "hook"
        ]

    runtime = Runtime(config, tracer_provider=provider)
    async with serve(create_app(config, runtime=runtime)):
        assert await wait_for(lambda: hook_deliveries() and rx.received())
    delivery = hook_deliveries()[0]
    trace_id = delivery.context.trace_id
    in_trace = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    (found,) = [s for s in in_trace if s.name == "poller.found"]
    assert found.parent is None  # the journey starts at the poll
    (hydration,) = [s for s in in_trace if s.name == "hydration"]
    assert hydration.parent is not None
    assert hydration.parent.span_id == found.context.span_id
    assert delivery.parent is not None
    assert delivery.parent.span_id == found.context.span_id
    assert found.attributes is not None
    order_id = found.attributes["clopos.order_id"]
    (request, *_) = rx.received(int(str(order_id)))
    assert request["headers"]["traceparent"].split("-")[1] == f"{trace_id:032x}"


def test_tracing_is_off_unless_the_standard_environment_asks_for_it() -> None:
    assert not tracing.tracing_requested({})
    assert tracing.start_tracing({}) is None
    assert tracing.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x/v1/traces"})
    assert tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )
