"""The log redactor: secrets never reach a log line, whichever way they travel."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
import structlog

from app.logs import MASK, configure_logging, get_logger

SECRETS = ["client-secret-value-1", "webhook-secret-value", "admin-token-0123456789"]
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXZhbHVl"


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt="json", level="debug", secrets=SECRETS, stream=stream)
    yield stream
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_known_secrets_are_masked_everywhere(captured: io.StringIO) -> None:
    log = get_logger("test")
    structlog.contextvars.bind_contextvars(request_id="r1")
    log.info("event.one", detail=f"auth failed for {SECRETS[0]}", nested={"x": [SECRETS[1]]})
    log.info("event.two", url=f"http://h/webhooks/clopos?token={SECRETS[1]}&a=1")
    log.info("event.three", header=f"Bearer {SECRETS[2]}", token_value="anything")
    log.info("event.four", note=f"got {JWT} back", sink_secret="whsec_c2VjcmV0c2VjcmV0")
    try:
        raise ValueError(f"boom {SECRETS[0]}")
    except ValueError:
        log.exception("event.five")
    logging.getLogger("uvicorn.error").warning("stdlib says %s", SECRETS[2])
    text = captured.getvalue()
    for secret in [*SECRETS, JWT, "whsec_c2VjcmV0c2VjcmV0"]:
        assert secret not in text
    assert text.count(MASK) >= 8
    events = lines(captured)
    assert [e["event"] for e in events][:5] == [
        "event.one",
        "event.two",
        "event.three",
        "event.four",
        "event.five",
    ]
    assert events[0]["request_id"] == "r1"  # context survives redaction
    assert events[1]["url"] == f"http://h/webhooks/clopos?token={MASK}&a=1"
    assert events[2]["token_value"] == MASK  # secret-looking key, unknown value


def test_harmless_values_are_left_alone(captured: io.StringIO) -> None:
    get_logger("test").info("hydration.finished", order_id=1001, attempt=2, outcome="stored")
    (event,) = lines(captured)
    assert (event["order_id"], event["attempt"], event["outcome"]) == (1001, 2, "stored")
    assert event["level"] == "info"
    assert event["logger"] == "test"


def test_console_format_is_also_redacted() -> None:
    stream = io.StringIO()
    configure_logging(fmt="console", level="info", secrets=SECRETS, stream=stream)
    get_logger("test").info("event", detail=SECRETS[0])
    assert SECRETS[0] not in stream.getvalue()
    assert "event" in stream.getvalue()


def test_console_tracebacks_are_redacted() -> None:
    stream = io.StringIO()
    configure_logging(fmt="console", level="info", secrets=SECRETS, stream=stream)
    try:
        raise RuntimeError(f"failed with {SECRETS[1]}")
    except RuntimeError:
        get_logger("test").exception("event.crashed")
    text = stream.getvalue()
    assert "RuntimeError" in text
    assert SECRETS[1] not in text


def test_the_log_sink_writes_even_above_info_and_keeps_order_keys() -> None:
    from app.sinks.log import LogSink
    from app.store.base import Delivery

    stream = io.StringIO()
    configure_logging(fmt="json", level="warning", secrets=SECRETS, stream=stream)
    order = {"id": 1, "integration_token": "clopos-data", "note": f"x {SECRETS[0]}"}
    body = json.dumps({"id": "snap_1", "order": order}).encode()
    delivery = Delivery(1, "log", 1, "snap_1", "b", 1, 1, body, 0, "lease", 0.0, 0.0)
    get_logger("app.other").info("filtered.out")  # below LOG_LEVEL=warning

    import asyncio

    asyncio.run(LogSink("log").deliver(delivery))
    (event,) = lines(stream)
    assert event["event"] == "sink.log.order"
    logged = event["body"]["order"]  # type: ignore[index]
    assert logged["integration_token"] == "clopos-data"  # Clopos's field, verbatim
    assert SECRETS[0] not in stream.getvalue()  # a known secret still never appears


def test_lines_below_the_level_are_dropped_and_unconfigured_logging_writes_all(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The level check in front of structlog (app.logs.Logger) drops exactly what
    LOG_LEVEL drops; before configure_logging (a script, a test) every line is written,
    as structlog's defaults do."""
    stream = io.StringIO()
    configure_logging(fmt="json", level="warning", stream=stream)
    log = get_logger("app.levels")
    log.debug("dropped.debug")
    log.info("dropped.info")
    log.warning("kept.warning")
    log.error("kept.error")
    assert [line["event"] for line in lines(stream)] == ["kept.warning", "kept.error"]
    assert not log.enabled_for(logging.INFO)
    assert log.enabled_for(logging.WARNING)

    structlog.reset_defaults()
    try:
        log.info("unconfigured.info")
        assert "unconfigured.info" in capsys.readouterr().out
    finally:
        logging.getLogger().handlers[:] = []


async def test_the_access_log_leaves_nothing_in_its_callers_context() -> None:
    """Run in the caller's own context (httpx's ASGITransport does), the middleware must
    not leave its request id, nor what the app bound, behind."""
    from app.access_log import AccessLogMiddleware

    async def app(scope: dict[str, object], receive: object, send: Any) -> None:
        structlog.contextvars.bind_contextvars(trace_id="t1")
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/webhooks/clopos", "headers": []}
    structlog.contextvars.clear_contextvars()
    await AccessLogMiddleware(app)(scope, None, send)  # type: ignore[arg-type]
    assert structlog.contextvars.get_contextvars() == {}
    headers = dict(sent[0]["headers"])  # type: ignore[call-overload]
    assert b"x-request-id" in headers
