"""OPS_PORT: /metrics, /readyz and /admin/* off the public listener, with the real process.

/metrics and /readyz name the brands (and /admin/* is the operator's API), so an operator
can serve them on a second, private listener: the public port then answers only the
webhook routes and /healthz.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Clopos
from tests.e2e.service import (
    ADMIN_TOKEN,
    ROOT,
    WEBHOOK_SECRET,
    ServiceProcess,
    logged,
    service_env,
    wait_until,
)
from tests.servers import free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OPS_ONLY = ["/metrics", "/readyz", "/admin/status", "/admin/dead-letters"]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_ops_routes_are_served_only_on_the_ops_port(make_service: Any) -> None:
    ops_port = free_port()
    service: ServiceProcess = make_service(OPS_PORT=str(ops_port))
    ops = f"http://127.0.0.1:{ops_port}"
    # The public listener: the webhook and the liveness probe, nothing that names a brand.
    accepted = httpx.post(
        f"{service.url}/webhooks/clopos",
        headers={"X-Webhook-Token": WEBHOOK_SECRET},
        json={"data": {"id": 1001}},
    )
    assert accepted.status_code == 202, accepted.text
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    for path in OPS_ONLY:
        response = httpx.get(service.url + path, headers=ADMIN)
        assert response.status_code == 404, (path, response.text)
        assert "sandbox" not in response.text
    # The ops listener: everything, with the same runtime behind it.
    metrics = httpx.get(f"{ops}/metrics")
    assert metrics.status_code == 200
    assert 'brand="sandbox"' in metrics.text
    readyz = httpx.get(f"{ops}/readyz")
    assert "credentials:sandbox" in readyz.text
    status = httpx.get(f"{ops}/admin/status", headers=ADMIN)
    assert status.status_code == 200
    assert "sandbox" in status.json()["brands"]
    assert wait_until(lambda: logged(service, 1001) == 1, timeout=15), service.tail()
    # SIGTERM stops both listeners, and the exit is the usual one.
    assert service.kill(signal.SIGTERM) == -signal.SIGTERM
    assert refused(service.port)
    assert refused(ops_port)


def test_without_ops_port_everything_is_on_one_listener(make_service: Any) -> None:
    service: ServiceProcess = make_service()
    for path in OPS_ONLY:
        assert httpx.get(service.url + path, headers=ADMIN).status_code in (200, 503), path


def test_ops_port_equal_to_the_public_port_is_refused(clopos: Clopos, tmp_path: Path) -> None:
    port = free_port()
    env = service_env(clopos.url, tmp_path / "hydrator.db", OPS_PORT=str(port))
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert b"OPS_PORT" in done.stderr
