"""The HTTP client the Clopos client (and anything else talking HTTP upstream) is given.

We keep httpx's API but swap its transport for aiohttp's (package ``httpx-aiohttp``): in a
fetch-and-forward loop at 32 concurrent requests it measured ~4x the default transport (see
``benchmarks/transport.py``). The transport is a detail behind ``httpx.AsyncClient``.

Three things about the upstream ``AiohttpTransport`` (httpx-aiohttp 0.2) are handled here:

- aiohttp's ``yarl`` re-quotes the URL it is given, so ``with%5B0%5D=receipt%3Aid%2C...``
  left as ``receipt:id,...`` on the wire; :class:`_Transport` passes the URL as already
  encoded, so what httpx built is what is sent;
- its exception map reports a refused connection as ``ConnectTimeout`` and lets some
  aiohttp errors escape untranslated; here every ``aiohttp.ClientError`` (and aiohttp's
  timeouts) becomes the matching httpx exception, so callers only see ``httpx`` errors;
- httpx's timeouts map to aiohttp's per-read/per-connect timeouts, which bound each socket
  operation but not the whole exchange; the Clopos client adds its own total deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport

CONNECT_TIMEOUT_SECONDS = 5.0
KEEPALIVE_SECONDS = 30.0


def _httpx_error(exc: BaseException) -> httpx.TransportError:
    """The httpx exception that best describes an aiohttp (or asyncio) failure."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return httpx.ProxyError(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
        return httpx.ReadError(message)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(message)
    return httpx.TransportError(message)


class _Stream(httpx.AsyncByteStream):
    """The aiohttp response body as an httpx stream; read errors become httpx errors."""

    CHUNK_SIZE = 64 * 1024

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(self.CHUNK_SIZE):
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _httpx_error(exc) from exc

    async def aclose(self) -> None:
        # Returns the connection to the pool when the body was read to the end; closes it
        # otherwise (aiohttp knows whether the response is complete).
        self._response.release()
        try:
            await self._response.wait_for_close()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _httpx_error(exc) from exc


class _Transport(AiohttpTransport):
    """``AiohttpTransport`` (its connector and session set-up) with our own request path.

    Two upstream behaviours are replaced: the URL is handed to aiohttp as already encoded
    (``yarl`` would otherwise re-quote it, turning ``receipt%3Aid%2C...`` back into
    ``receipt:id,...``: Clopos documents the encoded form), and every aiohttp failure is
    translated by :func:`_httpx_error`.
    """

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        session: aiohttp.ClientSession = self.client
        timeout = request.extensions.get("timeout", {})
        content = await request.aread()
        try:
            response = await session.request(
                request.method,
                yarl.URL(str(request.url), encoded=True),
                headers=list(request.headers.multi_items()),
                data=content or None,
                allow_redirects=False,
                auto_decompress=False,  # httpx decodes content-encoding itself
                compress=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                    connect=timeout.get("pool"),
                ),
                server_hostname=request.extensions.get("sni_hostname"),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _httpx_error(exc) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Stream(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )


def make_http_client(*, timeout: float, max_connections: int) -> httpx.AsyncClient:
    """A pooled ``httpx.AsyncClient`` over aiohttp.

    ``timeout`` bounds each read and write (and pool waits); connecting is bounded by
    ``min(5 s, timeout)``. Redirects are not followed: an API that redirects is misconfigured.
    The caller owns the client and must ``await client.aclose()``.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    return httpx.AsyncClient(
        transport=_Transport(limits=limits),
        timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT_SECONDS, timeout)),
        follow_redirects=False,
    )
