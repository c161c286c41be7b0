"""Run the real service as a separate process, for tests of crashes and whole flows.

The service is started with ``python -m app serve`` exactly as in production; tests
kill it with real signals (SIGKILL, SIGTERM) and read its JSON log file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "e2e-webhook-secret"
ADMIN_TOKEN = "e2e-admin-token-0123456789"
SANDBOX_CREDENTIALS = {
    "CLOPOS_CLIENT_ID": "sandbox-client",
    "CLOPOS_CLIENT_SECRET": "sandbox-client-secret",
    "CLOPOS_BRAND": "sandbox",
    "CLOPOS_INTEGRATOR_ID": "sandbox-integrator",
}


def service_env(clopos_url: str, db_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(ROOT),
        "CLOPOS_BASE_URL": clopos_url,
        **SANDBOX_CREDENTIALS,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": f"sqlite:///{db_path}",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "RETRY_BASE_SECONDS": "0.2",
        "RETRY_MAX_SECONDS": "1",
        "SHUTDOWN_GRACE_SECONDS": "5",
        # Off unless a test is about polling: a poll at start would hydrate recent seeded
        # orders and upset tests that count deliveries and calls.
        "POLL_INTERVAL_SECONDS": "0",
    }
    env.update(extra)
    return env


class ServiceProcess:
    """One run of the service; ``log_path`` collects its stderr (JSON lines)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix``: a command the service runs under (``taskset -c 0``, say)."""
        self.env = env
        self.prefix = list(prefix)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        log_file = self.log_path.open("ab")
        serve = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "app", *serve],
            cwd=ROOT,
            env=self.env,
            stdout=log_file,
            stderr=log_file,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"service did not start: {self.tail()}")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def log_events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """Parse a JSON log file; lines that are not JSON (a torn last line after kill -9) skip."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            events.append(record)
    return events


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def notify(service: ServiceProcess, order_id: int) -> None:
    """POST one notification with the shared token; it must be accepted."""
    response = httpx.post(
        f"{service.url}/webhooks/clopos",
        headers={"X-Webhook-Token": WEBHOOK_SECRET},
        json={"data": {"id": order_id}},
    )
    assert response.status_code == 202, response.text


def logged(service: ServiceProcess, order_id: int) -> int:
    """How many times the log sink emitted this order."""
    events = log_events(service.log_path, "sink.log.order")
    return sum(1 for e in events if e["body"]["order_id"] == order_id)
