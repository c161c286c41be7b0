"""app/http_client.py against a real server on loopback: what goes on the wire, and how
every failure comes back as one of our exceptions.

The sink and Clopos behaviours built on it (deadlines, excerpts, error mapping) are
tested in test_http_sink.py and test_clopos_client.py.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import http_client, signing
from app.errors import ConfigError, HttpTransportError, HttpUnsendable
from app.http_client import make_http_client
from app.settings import HttpSinkConfig
from app.sinks.http import HttpSink
from app.store.base import Delivery
from tests.servers import ServerThread


class Wire:
    """Records each request's raw target (path and query as sent) and answers with
    what the path asks for: ``/big`` a body of ``BIG`` bytes, ``/gzip`` a gzipped
    503, anything else 200 ``{}``."""

    BIG = 4096

    def __init__(self) -> None:
        self.targets: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        query = scope["query_string"]
        self.targets.append(scope["raw_path"] + (b"?" + query if query else b""))
        status, headers, body = 200, [(b"content-type", b"application/json")], b"{}"
        if scope["path"] == "/big":
            body = b"x" * self.BIG
        elif scope["path"] == "/gzip":
            status, body = 503, gzip.compress(b"upstream says: " + b"z" * 200_000)
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def wire() -> Iterator[tuple[Wire, str]]:
    app = Wire()
    with ServerThread(app) as server:
        yield app, server.url


def delivery() -> Delivery:
    return Delivery(
        id=1,
        sink="hook",
        snapshot_id=1,
        snapshot_key="snap_1",
        brand="acme",
        order_id=1001,
        version=1,
        body=b"{}",
        attempts=0,
        lease_token="t",
        created_at=0.0,
        first_received_at=0.0,
    )


async def test_a_sink_url_goes_on_the_wire_as_configured(wire: tuple[Wire, str]) -> None:
    """Percent-encodings the operator wrote stay as written (a receiver may sign its
    raw URL); what was not encoded is encoded once."""
    app, url = wire
    configured = f"{url}/a%2fb/%7e/c%3a?x=%41&z=%7e&s=a%2Fb&raw=[x]"
    config = HttpSinkConfig.model_validate(
        {"type": "http", "url": configured, "secret": signing.new_secret()}
    )
    sink = HttpSink("hook", config)
    try:
        await sink.deliver(delivery())
    finally:
        await sink.aclose()
    assert app.targets == [b"/a%2fb/%7e/c%3a?x=%41&z=%7e&s=a%2Fb&raw=[x]"]


async def test_a_clopos_url_goes_on_the_wire_byte_for_byte(wire: tuple[Wire, str]) -> None:
    app, url = wire
    target = "/v2/orders/7?with%5B0%5D=receipt%3Aid%2Cstatus"
    async with make_http_client(timeout=5.0, max_connections=2) as http:
        answer = await http.request("GET", url + target, headers={})
    assert (answer.status, answer.json()) == (200, {})
    assert app.targets == [target.encode()]


async def test_an_answer_over_the_size_cap_is_a_transport_error(
    wire: tuple[Wire, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = wire
    monkeypatch.setattr(http_client, "MAX_BODY_BYTES", Wire.BIG - 1)
    async with make_http_client(timeout=5.0, max_connections=2) as http:
        with pytest.raises(HttpTransportError, match="larger than"):
            await http.request("GET", f"{url}/big", headers={})
        excerpt = await http.request("GET", f"{url}/big", headers={}, body_limit=100)
        assert excerpt.body == b"x" * 100  # an excerpt is cut, not refused
        monkeypatch.setattr(http_client, "MAX_BODY_BYTES", Wire.BIG)
        assert len((await http.request("GET", f"{url}/big", headers={})).body) == Wire.BIG


async def test_an_excerpt_is_not_inflated(wire: tuple[Wire, str]) -> None:
    _, url = wire
    async with make_http_client(timeout=5.0, max_connections=2) as http:
        answer = await http.request("GET", f"{url}/gzip", headers={}, body_limit=64 * 1024)
    assert answer.status == 503
    assert len(answer.body) < 2000  # the compressed bytes, not 200 KB inflated


async def test_an_unusable_url_is_unsendable_not_a_value_error() -> None:
    async with make_http_client(timeout=1.0, max_connections=1) as http:
        with pytest.raises(HttpUnsendable):
            await http.request("GET", "http://[::1/open-api", headers={})
        with pytest.raises(HttpUnsendable):
            await http.request("GET", "ftp://127.0.0.1/x", headers={})


async def test_a_client_serves_the_loop_it_started_on_only(wire: tuple[Wire, str]) -> None:
    _, url = wire
    async with make_http_client(timeout=5.0, max_connections=2) as http:
        assert (await http.request("GET", url, headers={})).status == 200

        def from_another_loop() -> None:
            with pytest.raises(HttpUnsendable, match="another event loop"):
                asyncio.run(http.request("GET", url, headers={}))

        await asyncio.to_thread(from_another_loop)


def test_a_broken_certificate_file_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_client, "_SSL", None)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="SSL_CERT_FILE"):
        make_http_client(timeout=1.0, max_connections=1)
