"""The outgoing HTTP client: the one narrow interface to the network for Clopos and sinks.

One call, :meth:`HttpClient.request`, does one whole exchange (connect, send, wait, read
the body) under one deadline and returns an :class:`HttpAnswer` (status, headers, body
bytes), or raises a subclass of :class:`~app.errors.HttpTransportError`. The callers map
those onto their own outcomes (``app/clopos/client.py``, ``app/sinks/http.py``).

Why aiohttp directly, and no httpx on this path: in the end-to-end capacity profile the
httpx layer above its aiohttp transport (request building, URL merging, cookie
extraction on every response, header objects) cost about as much CPU as the exchange
itself; a fetch-and-forward loop measured 1,667 orders/s through httpx over aiohttp and
3,307 on aiohttp alone (``benchmarks/transport.py``). What httpx did for us is kept:

- URLs given as strings are sent **as written** (already encoded): Clopos documents
  ``with%5B0%5D=receipt%3Aid%2C...`` and ``yarl`` would otherwise re-quote it;
- certificates are verified against the same trust store httpx used (certifi, or
  ``SSL_CERT_FILE``/``SSL_CERT_DIR``); proxies from the environment are not used (they
  were not before either); redirects are never followed;
- every failure is one of our exceptions, never an aiohttp or asyncio one.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
import httpx
import yarl

from app.errors import (
    ConfigError,
    HttpConnectError,
    HttpTimeout,
    HttpTransportError,
    HttpUnsendable,
)

CONNECT_TIMEOUT_SECONDS = 5.0
KEEPALIVE_SECONDS = 30.0
_CHUNK = 64 * 1024
# No answer read whole comes near this (a list page of 200 orders with receipts is well
# under 1 MiB); past it, the answer is broken or hostile (e.g. a gzip bomb).
MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A complete HTTP answer. ``headers`` is case-insensitive."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    url_path: str

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError when it is not JSON)."""
        return json.loads(self.body)


def _translated(exc: BaseException) -> HttpTransportError:
    """Our exception for an aiohttp (or asyncio) failure; the cause is chained by callers."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return HttpTimeout(message)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError | ValueError):
        return HttpUnsendable(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return HttpConnectError(message)
    return HttpTransportError(message)


class HttpClient:
    """A pooled HTTP/1.1 client; safe to share between the tasks of one event loop.

    ``timeout`` is the default deadline of a whole exchange; connecting alone is bounded
    by ``min(5 s, timeout)``. At most ``max_connections`` exchanges are open at once
    (the others wait for a connection within their deadline). The session is made on
    first use, inside the running loop, and serves that loop only. The owner must
    ``await aclose()``.
    """

    def __init__(self, *, timeout: float, max_connections: int) -> None:
        if timeout <= 0 or max_connections < 1:
            raise ValueError("timeout must be > 0 and max_connections >= 1")
        self.timeout = timeout
        self.max_connections = max_connections
        # Read now, so a broken SSL_CERT_FILE stops start-up instead of every request.
        self._ssl = _trust_store()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise HttpUnsendable("the HTTP client is closed")
        loop = asyncio.get_running_loop()
        if self._session is None:
            self._loop = loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.max_connections, keepalive_timeout=KEEPALIVE_SECONDS, ssl=self._ssl
                ),
                trust_env=False,
                # Cookies from Clopos or a sink are neither kept nor sent back: nothing
                # here is a browser session, and parsing them cost CPU on every answer.
                cookie_jar=aiohttp.DummyCookieJar(),
                # The whole-exchange deadline is ours (asyncio.timeout_at), not aiohttp's.
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
            )
        elif loop is not self._loop:
            raise HttpUnsendable("the HTTP client belongs to another event loop")
        return self._session

    async def request(
        self,
        method: str,
        url: str | yarl.URL,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        within: float | None = None,
        body_limit: int | None = None,
    ) -> HttpAnswer:
        """One exchange within ``within`` seconds in all (default: the client's timeout).

        A ``str`` URL is sent exactly as written (already encoded); a ``yarl.URL`` as
        yarl encoded it. ``body_limit=None`` reads the whole answer, and failing to read
        it is an error. With ``body_limit=N`` at most N bytes are read and a failure
        while reading only shortens them: for callers whom the status alone decides.
        """
        seconds = within if within is not None else self.timeout
        try:
            target = url if isinstance(url, yarl.URL) else yarl.URL(url, encoded=True)
        except (ValueError, TypeError) as exc:
            raise HttpUnsendable(f"not a usable URL: {exc}") from exc
        end = asyncio.get_running_loop().time() + seconds
        response = await self._send(method, target, headers, body, end, seconds, body_limit)
        try:
            if body_limit is None:
                content = await _read_all(response, end)
            else:
                content = await _read_at_most(response, body_limit, end)
        finally:
            response.release()  # back to the pool if read to the end, else closed
        return HttpAnswer(
            status=response.status,
            reason=response.reason or "",
            headers=response.headers,
            body=content,
            url_path=target.path,
        )

    async def _send(
        self,
        method: str,
        url: yarl.URL,
        headers: Mapping[str, str],
        body: bytes | None,
        end: float,
        seconds: float,
        body_limit: int | None,
    ) -> aiohttp.ClientResponse:
        """Connect, send, and wait for the status line and headers, by ``end``."""
        session = self._get_session()
        try:
            async with asyncio.timeout_at(end):
                return await session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    # An excerpt is not worth inflating (and a bomb must not be).
                    auto_decompress=body_limit is None,
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=min(CONNECT_TIMEOUT_SECONDS, seconds)
                    ),
                )
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise _translated(exc) from exc

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _read_all(response: aiohttp.ClientResponse, end: float) -> bytes:
    """The whole body by ``end``, at most MAX_BODY_BYTES (decompressed)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(end):
            async for chunk in response.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise HttpTransportError(f"answer larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _translated(exc) from exc
    return b"".join(chunks)


async def _read_at_most(response: aiohttp.ClientResponse, limit: int, end: float) -> bytes:
    """Up to ``limit`` bytes of the body by ``end``; a read failure or the deadline only
    ends the excerpt early (the connection is then closed, not reused)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(end):
            async for chunk in response.content.iter_chunked(_CHUNK):
                chunks.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
    except (TimeoutError, aiohttp.ClientError):
        pass
    return b"".join(chunks)[:limit]


_SSL: ssl.SSLContext | None = None


def _trust_store() -> ssl.SSLContext:
    """The certificate store httpx used: certifi, or SSL_CERT_FILE / SSL_CERT_DIR."""
    # One context per process: building it reads the CA file.
    global _SSL
    if _SSL is None:
        try:
            _SSL = httpx.create_ssl_context(trust_env=True)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "SSL_CERT_FILE", f"cannot load the certificates (or SSL_CERT_DIR): {exc}"
            ) from exc
    return _SSL


def make_http_client(*, timeout: float, max_connections: int) -> HttpClient:
    """The pooled client the service, the CLI and the tests use."""
    return HttpClient(timeout=timeout, max_connections=max_connections)
