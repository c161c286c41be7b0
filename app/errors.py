"""The project's exception tree, in one place.

Callers decide what to do by class identity (``isinstance``), never by parsing
messages::

    HydratorError
    ├── ConfigError                    settings that cannot work; start-up stops
    ├── StoreError                     the durable store could not read or commit
    │   └── StoreInUseError            another process holds the SQLite file (its lock)
    ├── CloposError                    anything the Clopos client raises
    │   ├── CloposTransientError       5xx, 504, timeouts, connection errors: retry
    │   ├── CloposRateLimited          429: wait ``retry_after`` s; not a failed attempt
    │   ├── CloposNotFound             404: the order is not (yet) readable
    │   ├── CloposUnauthorized         401 on an API call even after one re-auth
    │   │   └── CloposCredentialsRejected
    │   │                              /v2/auth refused the credentials (401, or 200
    │   │                              with success:false): pause the brand
    │   └── CloposPermanentError       other 4xx, or a response we cannot use
    ├── ApiError                       an HTTP request refused: status, error, message,
    │                                  headers; rendered by app/http_errors.py
    ├── HttpTransportError             an outgoing exchange got no whole answer
    │   │                              (app/http_client.py); its callers map it
    │   ├── HttpTimeout                no answer within the exchange's deadline
    │   ├── HttpConnectError           could not connect (refused, DNS, TLS)
    │   └── HttpUnsendable             cannot be sent as given (URL, header, closed)
    └── SinkError                      a delivery to a sink failed
        ├── SinkRetryableError         408/425/429/5xx/network: retry, maybe after
        │                              ``retry_after`` s
        └── SinkPermanentError         other 4xx: dead-letter the delivery

Foreign exceptions (aiohttp, sqlite3, psycopg...) are translated into these at the
boundary of the module that talks to the foreign library, with ``raise ... from``.
"""

from __future__ import annotations


class HydratorError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(HydratorError):
    """A setting is missing or unsafe; carries the variable name for a one-line message."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable
        self.reason = reason


class ApiError(HydratorError):
    """A request refused with ``status``; the body is ``{"error", "message"}``.

    Raised by the route layer only (ingest, admin); app/http_errors.py renders it, and a
    :class:`StoreError` reaching a route becomes 503 ``store_unavailable`` there.
    """

    def __init__(
        self, status: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers


class StoreError(HydratorError):
    """The store could not complete an operation (I/O error, locked, unreachable)."""


class StoreInUseError(StoreError):
    """Another process holds the one-process lock of this SQLite file."""


# --- Clopos ---------------------------------------------------------------------------


class CloposError(HydratorError):
    """Base for everything the Clopos client raises.

    ``status`` is the HTTP status when there was a response; ``error`` and
    ``message`` are Clopos's envelope fields, kept for logs and dead letters.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message

    def describe(self) -> str:
        """A short, secret-free description for logs and dead letters."""
        parts = [type(self).__name__]
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.error:
            parts.append(f"error={self.error}")
        parts.append(self.message[:300])
        return " ".join(parts)


class CloposTransientError(CloposError):
    """Worth retrying: 5xx, 504 gateway timeout, our own timeout, connection failure."""


class CloposRateLimited(CloposError):
    """Clopos answered 429. Not a failed attempt: wait ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float, status: int | None = 429) -> None:
        super().__init__(message, status=status, error="rate_limited")
        self.retry_after = retry_after


class CloposNotFound(CloposError):
    """404: the order is not in the targeted brand/venue, or not readable yet."""


class CloposUnauthorized(CloposError):
    """401 on an API call that survived one token refresh."""


class CloposCredentialsRejected(CloposUnauthorized):
    """``/v2/auth`` refused the credentials: the brand must be paused, not retried hot."""


class CloposPermanentError(CloposError):
    """Another 4xx, or a response that cannot be used (not JSON, no ``data``)."""


# --- Outgoing HTTP (app/http_client.py) ---------------------------------------------------


class HttpTransportError(HydratorError):
    """An outgoing HTTP exchange ended without a whole answer (read, reset, protocol)."""


class HttpTimeout(HttpTransportError):
    """No whole answer within the exchange's deadline (connecting included)."""


class HttpConnectError(HttpTransportError):
    """The connection could not be made: refused, unresolvable, TLS refused."""


class HttpUnsendable(HttpTransportError):
    """The request cannot be sent as given: retrying the same request cannot help."""


# --- Sinks ----------------------------------------------------------------------------


class SinkError(HydratorError):
    """A delivery failed. ``detail`` is a bounded, secret-free description."""

    def __init__(self, detail: str, *, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class SinkRetryableError(SinkError):
    """Retry later; ``retry_after`` seconds when the sink said (Retry-After)."""

    def __init__(
        self, detail: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(detail, status=status)
        self.retry_after = retry_after


class SinkPermanentError(SinkError):
    """The sink refused the delivery for good (a 4xx other than 408/425/429)."""
