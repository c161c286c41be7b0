"""structlog, set up once: JSON by default, console on request, stdlib routed through it.

Event names are stable and dotted (``hydration.done``, ``delivery.failed``); context
(``request_id``, ``brand``, ``order_id``, ``job_id``, ``attempt``) is bound with
``structlog.contextvars`` per unit of work, so one order's story is one filter away.

The :class:`Redactor` is the last processor before rendering: any known secret value
(client secrets, webhook secrets, admin token, sink secrets, Clopos tokens seen at
runtime) is replaced wherever it appears, and values of secret-looking keys are masked.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

MASK = "[REDACTED]"
_SECRET_KEYS = re.compile(
    r"(secret|token|password|passwd|authorization|signature|api[_-]?key|cookie)", re.I
)
# A JWT anywhere in a string (Clopos tokens are JWTs): header.payload.signature.
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}")
# Standard Webhooks secrets and signatures.
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/=]+")
_V1SIG = re.compile(r"v1,[A-Za-z0-9+/=]{20,}")
# ?token=... in a logged URL (the inbound webhook accepts the secret as a query parameter).
_QUERY_TOKEN = re.compile(r"([?&](?:token|x-token|secret)=)[^&\s\"']+", re.I)


# Event fields holding third-party data logged as is: no key-based masking inside them
# (an order field named like "token" is Clopos's data), but known secrets still go.
VERBATIM_KEYS = frozenset({"body"})


class Redactor:
    """A structlog processor that removes secrets from every event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add(self, *values: str | None) -> None:
        """Register secret values (only ones long enough to be unambiguous)."""
        with self._lock:
            known = set(self._values)
            known.update(v for v in values if v and len(v) >= 6)
            # Longest first so a secret containing another is masked whole.
            self._values = tuple(sorted(known, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        text = _JWT.sub(MASK, text)
        text = _WHSEC.sub(MASK, text)
        text = _V1SIG.sub(MASK, text)
        return _QUERY_TOKEN.sub(lambda m: m.group(1) + MASK, text)

    def _scrub_values(self, value: Any) -> Any:
        """Mask known secret values only, keeping keys and structure (for data, such as a
        delivered order, whose keys belong to Clopos and must be logged verbatim)."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._scrub_values(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub_values(v) for v in value]
        return value

    def _clean(self, key: str | None, value: Any, depth: int = 0) -> Any:
        if key in VERBATIM_KEYS:
            return self._scrub_values(value)
        secret_key = key is not None and _SECRET_KEYS.search(key) is not None
        if secret_key and value not in (None, "") and not isinstance(value, bool | int | float):
            return MASK
        if isinstance(value, str):
            return self.scrub(value)
        if depth > 8:
            return value
        if isinstance(value, dict):
            return {k: self._clean(str(k), v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(None, v, depth + 1) for v in value]
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict.keys()):
            if key in ("exc_info", "stack_info"):
                continue
            event_dict[key] = self._clean(None if key == "event" else key, event_dict[key])
        return event_dict


class _ScrubRenderedTraceback:
    """Tracebacks are rendered into ``exception``; scrub that string too."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in ("exception", "stack"):
            value = event_dict.get(key)
            if isinstance(value, str):
                event_dict[key] = self._redactor.scrub(value)
        return event_dict


LOG_SINK_LOGGER = "app.sinks.log"


def add_trace_ids(logger: Any, method: str, event: Any) -> Any:
    """structlog processor: the current span's ``trace_id`` and ``span_id`` (hex, as
    tracing backends show them) on every line logged inside a span. The current span
    wins over ids bound to the log context (app.tracing.bind_span_ids), which only
    name a request's span for the lines written after it ended."""
    from opentelemetry import trace  # only configured when tracing is on

    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event["trace_id"] = format(span_context.trace_id, "032x")
        event["span_id"] = format(span_context.span_id, "016x")
    return event


REDACTOR = Redactor()
"""Process-wide: secrets are process-wide too, and stdlib logging is global anyway."""


def configure_logging(
    *,
    fmt: str = "json",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: Any = None,
    trace_ids: bool = False,
) -> None:
    """Configure structlog and the stdlib root logger (uvicorn's logs included).

    ``trace_ids`` (when tracing is on) adds the current span's trace_id and span_id to
    every line logged inside a span."""
    REDACTOR.add(*secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([add_trace_ids] if trace_ids else []),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        REDACTOR,
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    # Tracebacks are rendered to text *before* the renderer, then scrubbed: a renderer
    # that formats exc_info itself would print a secret in an exception message.
    tail: list[Any] = [structlog.processors.format_exc_info, _ScrubRenderedTraceback(REDACTOR)]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
    # We write our own access line (with request_id); uvicorn's would be a duplicate.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request URL at INFO; ours are logged with context instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The log sink *is* a delivery: its events must pass whatever LOG_LEVEL says, or a
    # delivery would be marked done with nothing written.
    logging.getLogger(LOG_SINK_LOGGER).setLevel(logging.INFO)


class Logger:
    """A named structlog logger that asks the stdlib logger's level first.

    structlog's lazy logger binds a new logger per call and only then drops a line below
    the level (``filter_by_level``): about 6 us for a line nobody sees, twice per
    webhook request at ``LOG_LEVEL=warning`` (docs/performance.md). The check here is
    the one ``filter_by_level`` makes, taken before any of that work, and only once
    :func:`configure_logging` has put that filter in place: before it (a script, a
    test), structlog's defaults write every line, as they always did."""

    __slots__ = ("_proxy", "_std")

    def __init__(self, name: str) -> None:
        self._std = logging.getLogger(name)
        self._proxy: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)

    def enabled_for(self, level: int) -> bool:
        """Whether a line at ``level`` would be written: for a caller whose fields cost
        something to compute."""
        return self._std.isEnabledFor(level) or not structlog.is_configured()

    def debug(self, event: str, **kw: Any) -> None:
        if self.enabled_for(logging.DEBUG):
            self._proxy.debug(event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        if self.enabled_for(logging.INFO):
            self._proxy.info(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        if self.enabled_for(logging.WARNING):
            self._proxy.warning(event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        if self.enabled_for(logging.ERROR):
            self._proxy.error(event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        if self.enabled_for(logging.ERROR):
            self._proxy.exception(event, **kw)

    def critical(self, event: str, **kw: Any) -> None:
        if self.enabled_for(logging.CRITICAL):
            self._proxy.critical(event, **kw)


def get_logger(name: str) -> Logger:
    return Logger(name)
