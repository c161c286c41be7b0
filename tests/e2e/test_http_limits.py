"""The listener's own limits, against the real service process with raw sockets.

A client that never finishes its request must not cost memory without bound nor hold a
connection forever: the header is capped (HTTP_MAX_HEADER_BYTES), a request not fully
received within HTTP_REQUEST_TIMEOUT_SECONDS is dropped (headers and body), and open
connections are capped (HTTP_MAX_CONNECTIONS). Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.service import WEBHOOK_SECRET, ServiceProcess, log_events, wait_until

MIB = 1024 * 1024


def rss_bytes(service: ServiceProcess) -> int:
    assert service.proc is not None
    for line in Path(f"/proc/{service.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(service: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket, said: bytearray | None = None) -> bool:
    """True once the server has closed the connection; what it said first goes to ``said``."""
    try:
        while select.select([sock], [], [], 0)[0]:
            data = sock.recv(65536)
            if not data:
                return True
            if said is not None:
                said += data
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send what the socket takes; False once the server has gone."""
    try:
        sock.setblocking(True)
        sock.settimeout(5)
        sock.sendall(data)
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(False)


def healthy(service: ServiceProcess) -> bool:
    return httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200


def test_unfinished_huge_headers_do_not_grow_memory(make_service: Any) -> None:
    service: ServiceProcess = make_service()
    assert healthy(service)
    before = rss_bytes(service)
    sockets = [connect(service) for _ in range(5)]
    try:
        chunk = b"a" * MIB
        for sock in sockets:
            if send_quietly(sock, b"POST /webhooks/clopos HTTP/1.1\r\nhost: x\r\nx-pad: "):
                for _ in range(16):  # 16 MiB of one header value, never finished
                    if not send_quietly(sock, chunk):
                        break
        time.sleep(0.5)  # let the server read what was sent
        growth = rss_bytes(service) - before
        refused = wait_until(lambda: all(closed_by_server(s) for s in sockets), timeout=5)
        print(f"\nRSS growth after 5 x 16 MiB unfinished headers: {growth / MIB:.1f} MiB")
        assert growth < 16 * MIB, f"RSS grew by {growth / MIB:.1f} MiB"
        assert refused, "connections sending an oversized header were left open"
    finally:
        for sock in sockets:
            sock.close()
    assert healthy(service)


def test_an_oversized_header_is_refused_with_431(make_service: Any) -> None:
    service: ServiceProcess = make_service(HTTP_MAX_HEADER_BYTES="8192")
    big = httpx.post(
        f"{service.url}/webhooks/clopos",
        headers={"X-Webhook-Token": WEBHOOK_SECRET, "x-pad": "a" * 9000},
        json={"data": {"id": 1001}},
    )
    assert big.status_code == 431, big.text
    fits = httpx.post(
        f"{service.url}/webhooks/clopos",
        headers={"X-Webhook-Token": WEBHOOK_SECRET, "x-pad": "a" * 4000},
        json={"data": {"id": 1001}},
    )
    assert fits.status_code == 202, fits.text


def test_slow_requests_are_dropped_at_the_deadline(make_service: Any) -> None:
    service: ServiceProcess = make_service(HTTP_REQUEST_TIMEOUT_SECONDS="2")
    # 100 connections trickle a header line every 0.5 s (slowloris), 10 send half a body
    # and stop, 10 connect and say nothing, and 5 declare a body too large (answered 413
    # at once) and then trickle it.
    trickle = [connect(service) for _ in range(100)]
    half_body = [connect(service) for _ in range(10)]
    silent = [connect(service) for _ in range(10)]
    answered_early = [connect(service) for _ in range(5)]
    head = (
        "POST /webhooks/clopos HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"x-webhook-token: {WEBHOOK_SECRET}\r\ncontent-length: 100\r\n\r\n"
    ).encode()
    for sock in half_body:
        send_quietly(sock, head + b'{"data": {"id": 10')
    for sock in answered_early:
        send_quietly(sock, head.replace(b"content-length: 100", b"content-length: 9000000"))
    started = time.monotonic()
    open_at: dict[int, int] = {}
    everyone = trickle + half_body + silent + answered_early
    early = range(len(everyone) - len(answered_early), len(everyone))
    said = [bytearray() for _ in everyone]
    try:
        for sock in trickle:
            send_quietly(sock, b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        gone: set[int] = set()
        while time.monotonic() - started < 12 and len(gone) < len(everyone):
            for index, sock in enumerate(everyone):
                if index in gone:
                    continue
                if (
                    closed_by_server(sock, said[index])
                    or (index < len(trickle) and not send_quietly(sock, b"x-slow: 1\r\n"))
                    or (index in early and not send_quietly(sock, b"x" * 10))
                ):
                    gone.add(index)
            elapsed = int(time.monotonic() - started)
            open_at.setdefault(elapsed, len(everyone) - len(gone))
            time.sleep(0.5)
        still_open = len(everyone) - len(gone)
        print(f"\nconnections still open, by second: {open_at}; after the loop: {still_open}")
        assert still_open == 0, f"{still_open} of {len(everyone)} still open after 12 s"
        assert open_at.get(0, 0) > 0  # they were open at first: the deadline closed them
        # A request that had begun is told why; a silent connection is just closed.
        answers = [bytes(s[:12]) for s in said]
        assert set(answers[:110]) <= {b"HTTP/1.1 408", b""}, set(answers)
        assert answers.count(b"HTTP/1.1 408") >= 100
        # A request answered before its body was read gets that one answer, then is closed.
        for index in early:
            assert bytes(said[index]).count(b"HTTP/1.1 ") == 1, bytes(said[index])
            assert said[index].startswith(b"HTTP/1.1 413"), bytes(said[index])
    finally:
        for sock in everyone:
            sock.close()
    assert healthy(service)
    # The half-sent bodies were not stored: nothing was accepted.
    status = httpx.get(
        f"{service.url}/admin/status",
        headers={"Authorization": "Bearer e2e-admin-token-0123456789"},
    ).json()
    assert status["queues"]["hydration"].get("pending", 0) == 0
    # A half-sent body reads as a client that hung up: info, never an error or a 500.
    disconnected = log_events(service.log_path, "webhook.client_disconnected")
    assert len(disconnected) == len(half_body)
    assert not [e for e in log_events(service.log_path) if e.get("level") in ("error", "critical")]
    assert not [e for e in log_events(service.log_path, "http.request") if e["status"] == 500]


def test_connections_beyond_the_cap_are_refused_at_once(make_service: Any) -> None:
    service: ServiceProcess = make_service(
        HTTP_MAX_CONNECTIONS="20", HTTP_REQUEST_TIMEOUT_SECONDS="60"
    )
    held = [connect(service) for _ in range(30)]
    try:
        assert wait_until(lambda: sum(closed_by_server(s) for s in held) >= 10, timeout=5)
        still = sum(not closed_by_server(s) for s in held)
        print(f"\n30 idle connections against a cap of 20: {still} held open")
        assert still <= 20
    finally:
        for sock in held:
            sock.close()
    # Once the holders are gone, the service answers again.
    assert wait_until(lambda: healthy(service), timeout=5)
    response = httpx.post(
        f"{service.url}/webhooks/clopos",
        headers={"X-Webhook-Token": WEBHOOK_SECRET},
        json={"data": {"id": 1001}},
    )
    assert response.status_code == 202, response.text
