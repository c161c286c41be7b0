"""Traces reach a real OTLP/HTTP receiver, and the sink gets a matching traceparent.

The real service process, configured only by the standard OTel environment
(OTEL_EXPORTER_OTLP_ENDPOINT), exports to a small receiver on loopback that decodes the
protobuf export requests with opentelemetry-proto, as a collector would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.e2e.service import WEBHOOK_SECRET, ServiceProcess, log_events, wait_until
from tests.e2e.test_operations import SinkReceiver, sinks
from tests.servers import ServerThread

INBOUND_TRACE = "0af7651916cd43dd8448eb211c80319c"
INBOUND = f"00-{INBOUND_TRACE}-b7ad6b7169203331-01"


class OtlpReceiver:
    """POST /v1/traces: keeps every span it is sent, with its resource's service.name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/traces", self._export, methods=["POST"])])

    async def _export(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.body())
        with self._lock:
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "service": resource.get("service.name"),
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "attributes": {
                                    a.key: a.value.string_value or a.value.int_value
                                    for a in span.attributes
                                },
                            }
                        )
        return Response(
            ExportTraceServiceResponse().SerializeToString(),
            media_type="application/x-protobuf",
        )

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


@pytest.fixture
def otlp() -> Iterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    with ServerThread(receiver.app) as server:
        yield receiver, server.url


@pytest.fixture
def sink() -> Iterator[tuple[SinkReceiver, str]]:
    rx = SinkReceiver()
    with ServerThread(rx.app) as server:
        yield rx, f"{server.url}/hook"


def test_the_spans_of_one_order_reach_an_otlp_receiver_and_the_sink_gets_the_traceparent(
    make_service: Any, otlp: tuple[OtlpReceiver, str], sink: tuple[SinkReceiver, str]
) -> None:
    collector, endpoint = otlp
    rx, hook = sink
    service: ServiceProcess = make_service(
        SINKS=sinks(hook),
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    response = httpx.post(
        f"{service.url}/webhooks/clopos",
        headers={"X-Webhook-Token": WEBHOOK_SECRET, "traceparent": INBOUND},
        json={"data": {"id": 1001}},
    )
    assert response.status_code == 202, response.text

    def names() -> list[str]:
        return sorted(s["name"] for s in collector.of_trace(INBOUND_TRACE))

    expected = ["GET /v2/orders/{id}", "delivery", "delivery", "hydration", "webhook.receive"]
    assert wait_until(lambda: names() == expected, timeout=20), (names(), service.tail())
    spans = {
        (s["name"], s["attributes"].get("clopos.sink")): s
        for s in collector.of_trace(INBOUND_TRACE)
    }
    ingest = spans[("webhook.receive", None)]
    assert ingest["service"] == "clopos-hydrator"
    assert ingest["parent_span_id"] == "b7ad6b7169203331"  # the sender's span
    hydration = spans[("hydration", None)]
    assert hydration["parent_span_id"] == ingest["span_id"]
    call = spans[("GET /v2/orders/{id}", None)]
    assert call["parent_span_id"] == hydration["span_id"]
    assert call["attributes"]["http.response.status_code"] == 200
    hook_delivery = spans[("delivery", "hook")]
    assert spans[("delivery", "log")]["parent_span_id"] == ingest["span_id"]

    (request,) = rx.received(1001)
    assert request["headers"]["traceparent"] == (
        f"00-{INBOUND_TRACE}-{hook_delivery['span_id']}-01"
    )
    # The log lines of that work carry the trace and span they were written in.
    (finished,) = [e for e in log_events(service.log_path, "hydration.finished")]
    assert (finished["trace_id"], finished["span_id"]) == (INBOUND_TRACE, hydration["span_id"])
    accepted = log_events(service.log_path, "webhook.accepted")
    assert [(e["trace_id"], e["span_id"]) for e in accepted] == [(INBOUND_TRACE, ingest["span_id"])]
    # The access line is written after the request's span ended; it names that span too.
    webhook_lines = [
        e
        for e in log_events(service.log_path, "http.request")
        if e.get("path", "").startswith("/webhooks/")
    ]
    assert [(e.get("trace_id"), e.get("span_id")) for e in webhook_lines] == [
        (INBOUND_TRACE, ingest["span_id"])
    ], webhook_lines
