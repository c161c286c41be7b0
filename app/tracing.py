"""Optional OpenTelemetry tracing: one trace per notification's journey.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_TRACES_EXPORTER`` is set (and ``OTEL_SDK_DISABLED`` is not ``true``); everything
else is the SDK's standard environment (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_BSP_*``...). When off, no SDK is loaded and the components hold ``tracer=None``:
the only cost on the hot path is that ``None`` check.

The journey: ``webhook.receive`` (ingest; continues an inbound ``traceparent``), stored
with the notification; ``hydration`` (a child of the first notification's trace, linked
to every notification it covers) with ``clopos GET`` calls as children; ``delivery``, one
per sink and attempt, whose ``traceparent`` the HTTP sink sends on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from app.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACER_NAME = "clopos_hydrator"
DEFAULT_SERVICE_NAME = "clopos-hydrator"
_PROPAGATOR = TraceContextTextMapPropagator()


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the standard OTel environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return bool(exporters) or any(environ.get(name, "").strip() for name in endpoints)


def start_tracing(environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """A tracer provider exporting as the environment says, or None when tracing is off."""
    if not tracing_requested(environ):
        return None
    # Imported only when on: with tracing off the SDK and exporter are never loaded.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    for name in (n.strip() for n in names.split(",") if n.strip()):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, environ)))
    return provider


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "otlp":
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if protocol != "http/protobuf":
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL", f"only http/protobuf is supported, not {protocol!r}"
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout: from the OTLP environment
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ConfigError("OTEL_TRACES_EXPORTER", f"unsupported exporter {name!r} (otlp, console)")


def get_tracer(provider: TracerProvider | None) -> Tracer | None:
    return provider.get_tracer(TRACER_NAME) if provider is not None else None


# --- W3C Trace Context ------------------------------------------------------------------


def extract(headers: Mapping[str, str]) -> Context | None:
    """The remote parent named by a valid ``traceparent`` header, else None."""
    if "traceparent" not in headers:
        return None
    context = _PROPAGATOR.extract({"traceparent": headers["traceparent"]})
    span = trace.get_current_span(context)
    return context if span.get_span_context().is_valid else None


def context_of(traceparent: str | None) -> Context | None:
    return None if traceparent is None else extract({"traceparent": traceparent})


def current_traceparent() -> str | None:
    """The current span as a ``traceparent`` value (None without a recording span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def bind_span_ids(span: Span) -> None:
    """Bind the span's ids to the log context of this request, so lines logged after the
    span ended (the access line) still name it; lines inside it get them anyway."""
    context = span.get_span_context()
    if context.is_valid:
        structlog.contextvars.bind_contextvars(
            trace_id=format(context.trace_id, "032x"), span_id=format(context.span_id, "016x")
        )


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` (and ``tracestate``) to outgoing headers."""
    _PROPAGATOR.inject(headers)


def links_to(traceparents: Iterable[str]) -> list[Link]:
    """Links to each notification's trace (a job may cover several)."""
    links = []
    for traceparent in traceparents:
        context = context_of(traceparent)
        if context is not None:
            links.append(Link(trace.get_current_span(context).get_span_context()))
    return links


# --- spans ------------------------------------------------------------------------------

_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()
Attributes = Mapping[str, AttributeValue]


def job_span(
    tracer: Tracer | None, name: str, traceparents: tuple[str, ...], attributes: Attributes
) -> contextlib.AbstractContextManager[Span | None]:
    """A span for work done for stored notifications: in the first one's trace, linked to
    each of them (a fetch may cover several). Without a tracer: nothing at all."""
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(
        name,
        context=context_of(traceparents[0]) if traceparents else None,
        links=links_to(traceparents),
        kind=SpanKind.INTERNAL,
        attributes=attributes,
    )


def request_span(
    tracer: Tracer | None, name: str, headers: Mapping[str, str], attributes: Attributes
) -> contextlib.AbstractContextManager[Span | None]:
    """A SERVER span continuing the caller's ``traceparent`` (if it sent a valid one)."""
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(
        name, context=extract(headers), kind=SpanKind.SERVER, attributes=attributes
    )


@contextlib.contextmanager
def client_span(tracer: Tracer | None, name: str, attributes: Attributes) -> Iterator[Span | None]:
    """A CLIENT span (a call to Clopos) under the current span."""
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
        yield span


FAILED_OUTCOMES = frozenset({"dead_letter", "retry", "lost_lease", "rejected"})


def finish(span: Span | None, outcome: str, detail: str = "") -> None:
    """Record an attempt's outcome on its span; failures mark the span as an error."""
    if span is None:
        return
    span.set_attribute("clopos.outcome", outcome)
    if detail:
        span.set_attribute("clopos.detail", detail[:500])
    if outcome in FAILED_OUTCOMES:
        span.set_status(Status(StatusCode.ERROR, detail[:200] or outcome))


def found_by_poller(tracer: Tracer | None, brand: str, order_ids: list[int]) -> list[str | None]:
    """A root span per order the poller found (its journey starts there, not at a
    webhook); their traceparents, to store with the notices. Nones when tracing is off."""
    if tracer is None:
        return [None] * len(order_ids)
    traceparents = []
    for order_id in order_ids:
        attributes: Attributes = {"clopos.brand": brand, "clopos.order_id": order_id}
        with tracer.start_as_current_span("poller.found", context=Context(), attributes=attributes):
            traceparents.append(current_traceparent())
    return traceparents


def note_order(brand: str, order_id: int) -> str | None:
    """Name the order on the current (ingest) span; its traceparent, to store with it."""
    span = trace.get_current_span()
    span.set_attribute("clopos.brand", brand)
    span.set_attribute("clopos.order_id", order_id)
    return current_traceparent()
