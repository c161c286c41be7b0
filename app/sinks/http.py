"""The ``http`` sink: POST each snapshot, signed per Standard Webhooks.

Wire format (the contract of ``shared/product.md``)::

    POST <url>
    content-type: application/json
    user-agent: clopos-hydrator/<version>
    webhook-id: <snapshot key>        same order state -> same id, so receivers dedupe
    webhook-timestamp: <unix seconds>
    webhook-signature: v1,<b64> [v1,<b64> ...]   one per configured secret (rotation)
    <configured extra headers>        never replacing the ones above

Outcome, as the delivery worker needs it:

* 2xx: delivered.
* 408, 425, 429, 5xx, timeouts and network errors: :class:`SinkRetryableError`, with
  ``retry_after`` from ``Retry-After`` (seconds or an HTTP-date, capped at an hour).
* 3xx (redirects are not followed: a signed POST must not wander to another host)
  and other 4xx: :class:`SinkPermanentError`, dead-lettered.

The whole exchange has one deadline (``timeout_seconds``), not only per socket
operation, so a receiver dripping bytes cannot hold a worker (or outlive its lease).
At most 64 KiB of any answer is read, and error details are bounded and scrubbed
of the secrets and extra header values this sink knows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

import httpx
import yarl

from app import __version__, tracing
from app.errors import (
    ConfigError,
    HttpTimeout,
    HttpTransportError,
    HttpUnsendable,
    SinkPermanentError,
    SinkRetryableError,
)
from app.http_client import HttpAnswer, HttpClient, make_http_client
from app.logs import get_logger
from app.settings import HttpSinkConfig
from app.signing import secret_key, sign
from app.store.base import Delivery

log = get_logger("app.sinks.http")

MAX_RESPONSE_BYTES = 64 * 1024
MAX_DETAIL_CHARS = 500  # a dead letter's last_error, status line included
MAX_RETRY_AFTER_SECONDS = 3600.0
RETRYABLE_STATUSES = frozenset({408, 425, 429})
# Headers this sink owns; configured extra headers never replace them.
RESERVED_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "transfer-encoding",
        "host",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]{0,8192}")  # printable ASCII: no header injection
_DELTA_SECONDS = re.compile(r"[0-9]{1,12}")
_MASK = "[REDACTED]"


def _extra_headers(sink: str, configured: Mapping[str, str]) -> dict[str, str]:
    """The configured headers that may be sent; bad ones stop start-up, not deliveries."""
    extra: dict[str, str] = {}
    for name, value in configured.items():
        if not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            raise ConfigError("SINKS", f"sink {sink!r}: header {name[:50]!r} is not a valid header")
        if name.lower() in RESERVED_HEADERS:
            log.warning("sink.http.header_ignored", sink=sink, header=name.lower())
            continue
        extra[name] = value
    return extra


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or HTTP-date).

    None when absent or unreadable; never negative; capped at an hour so a sink cannot
    park a delivery for days.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" dates parse naive; HTTP-dates are GMT
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


class HttpSink:
    kind = "http"

    def __init__(
        self,
        name: str,
        config: HttpSinkConfig,
        *,
        client: HttpClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.concurrency = config.concurrency
        self.timeout_seconds = config.timeout_seconds
        self._clock = clock
        self._secrets = [s.get_secret_value() for s in config.secrets]
        for index, secret in enumerate(self._secrets):
            try:
                secret_key(secret)
            except ValueError as exc:
                raise ConfigError("SINKS", f"sink {name!r}: secret #{index}: {exc}") from exc
        self._url = _sink_url(name, config.url)
        _check_credentials(name, self._url, config.headers)
        self._headers = {
            "user-agent": f"clopos-hydrator/{__version__}",
            # Read raw bytes for excerpts; a compressed error page is not worth inflating.
            "accept-encoding": "identity",
            **_extra_headers(name, config.headers),
        }
        # Values that must never reach a dead letter or a log through an echoed body.
        known = [
            *self._secrets,
            *config.headers.values(),
            self._url.raw_query_string,
            self._url.query_string,
            self._url.password or "",
            # Some receivers put their secret in the path (chat-style webhook URLs), and
            # a network error's message may quote the URL.
            self._url.raw_path,
            self._url.path,
        ]
        self._scrub_values = sorted({v for v in known if len(v) >= 6}, key=len, reverse=True)
        self._owns_client = client is None
        # The same HTTP client as the Clopos client's (app/http_client.py): redirects are
        # not followed, certificates are verified, one deadline per exchange.
        self._client = client or make_http_client(
            timeout=config.timeout_seconds, max_connections=config.concurrency
        )

    def __repr__(self) -> str:
        return f"HttpSink(name={self.name!r}, host={self._url.host!r})"

    async def deliver(self, delivery: Delivery) -> None:
        """POST the body; return on 2xx, else raise a SinkError subclass."""
        response = await self._send(delivery)
        self._classify(response)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # --- internals -------------------------------------------------------------------

    def _signed_headers(self, delivery: Delivery) -> dict[str, str]:
        timestamp = int(self._clock())
        headers = {
            **self._headers,
            "content-type": "application/json",
            "webhook-id": delivery.snapshot_key,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(
                self._secrets, delivery.snapshot_key, timestamp, delivery.body
            ),
        }
        tracing.inject(headers)  # W3C traceparent of the delivery span, when tracing is on
        return headers

    async def _send(self, delivery: Delivery) -> HttpAnswer:
        """POST within the deadline, reading at most MAX_RESPONSE_BYTES of the answer (the
        status decides; the body is only an excerpt). Transport failures are translated
        at this boundary."""
        try:
            return await self._client.request(
                "POST",
                self._url,
                headers=self._signed_headers(delivery),
                body=delivery.body,
                within=self.timeout_seconds,
                body_limit=MAX_RESPONSE_BYTES,
            )
        except HttpTimeout as exc:
            raise SinkRetryableError(f"no answer within {self.timeout_seconds:g}s") from exc
        except HttpUnsendable as exc:
            # Our request cannot be sent as configured: retrying will not change that.
            raise SinkPermanentError(self._scrub(f"cannot send: {exc}")) from exc
        except HttpTransportError as exc:
            raise SinkRetryableError(
                self._scrub(f"network error: {type(exc).__name__}: {exc}")
            ) from exc

    def _classify(self, response: HttpAnswer) -> None:
        status = response.status
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            target = location.split("?", 1)[0][:200]  # a query may carry tokens
            detail = f"HTTP {status}: redirects are not followed (location: {target})"
            raise SinkPermanentError(self._scrub(detail), status=status)
        detail = self._describe(status, response.body)
        if status in RETRYABLE_STATUSES or not 400 <= status < 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock())
            raise SinkRetryableError(detail, status=status, retry_after=retry_after)
        raise SinkPermanentError(detail, status=status)

    def _describe(self, status: int, body: bytes) -> str:
        """``HTTP <status>: <excerpt>``, at most MAX_DETAIL_CHARS, secrets masked.

        The whole (bounded) body is scrubbed before it is cut, so a secret echoed
        across the cut cannot leak half of itself.
        """
        prefix = f"HTTP {status}"
        text = " ".join(self._scrub(body.decode("utf-8", errors="replace")).split())
        if not text:
            return prefix
        room = MAX_DETAIL_CHARS - len(prefix) - 2
        if len(text) > room:
            text = text[: room - 3] + "..."
        return f"{prefix}: {text}"

    def _scrub(self, text: str) -> str:
        for value in self._scrub_values:
            text = text.replace(value, _MASK)
        return text


def _sink_url(sink: str, url: str) -> yarl.URL:
    """The configured URL as it goes on the wire: what is already percent-encoded stays
    as written (a receiver may check a signature over its raw URL); what is not is
    encoded once, by httpx's rules (WHATWG), as before. Only absolute http(s) URLs."""
    try:
        parsed = yarl.URL(str(httpx.URL(url)), encoded=True)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ConfigError("SINKS", f"sink {sink!r}: url is not valid") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError("SINKS", f"sink {sink!r}: url is not valid")
    return parsed


def _check_credentials(sink: str, url: yarl.URL, headers: Mapping[str, str]) -> None:
    """Credentials in the URL go out as Basic auth: refuse, at start-up, what would fail
    on every delivery (two Authorization sources; a password Basic auth cannot encode)."""
    if url.user is None and url.password is None:
        return
    if any(name.lower() == "authorization" for name in headers):
        raise ConfigError(
            "SINKS",
            f"sink {sink!r}: the url carries credentials and an Authorization header is "
            "configured; keep one of them",
        )
    try:
        f"{url.user or ''}:{url.password or ''}".encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            "SINKS", f"sink {sink!r}: the url's user or password is not Latin-1 (Basic auth)"
        ) from exc
