"""What the benchmarks share: server processes on loopback ports, the service's
environment, a verifying sink, percentiles, and one row format for ``make bench``.

Every figure a benchmark reports is a ratio to a baseline measured in the same run
(the machines are shared and noisy), with the absolute numbers beside it.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]
WEBHOOK_SECRET = "bench-webhook-secret"
ADMIN_TOKEN = "bench-admin-token-0123456789"
SANDBOX_CREDENTIALS = {
    "CLOPOS_CLIENT_ID": "sandbox-client",
    "CLOPOS_CLIENT_SECRET": "sandbox-client-secret",
    "CLOPOS_BRAND": "sandbox",
    "CLOPOS_INTEGRATOR_ID": "sandbox-integrator",
}


@dataclass(frozen=True)
class Row:
    """One line of the ``make bench`` table."""

    benchmark: str
    figure: str
    value: str
    baseline: str
    ratio: str
    goal: str
    verdict: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Server:
    """A server in its own process on a loopback port; its output goes to a log file
    (printed if it fails to start, so a broken benchmark says why)."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        logs: Path | None = None,
        health: str = "/healthz",
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = (logs or scratch("logs")) / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(cwd), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait(health)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait(self, health: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                httpx.get(self.url + health, timeout=0.5)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{self.name} did not start on {self.port}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def uvicorn_cmd(app: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]


def service_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]


def service_env(sandbox: Server, database_url: str, **extra: str) -> dict[str, str]:
    """The service against the sandbox, logging at warning (a per-request info line is
    an operator's choice, not the path's cost), Clopos budget out of the way."""
    return {
        "CLOPOS_BASE_URL": f"{sandbox.url}/open-api",
        **SANDBOX_CREDENTIALS,
        "CLOPOS_RATE_LIMIT_PER_MINUTE": "100000",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
        "POLL_INTERVAL_SECONDS": "0",
        **extra,
    }


def sandbox_server(logs: Path, *, seed_orders: int = 300, limit: int = 1_000_000) -> Server:
    port = free_port()
    return Server(
        "sandbox",
        uvicorn_cmd("benchmarks.servers:sandbox_app", port),
        port,
        env={"BENCH_SANDBOX_SEED": str(seed_orders), "BENCH_SANDBOX_LIMIT": str(limit)},
        logs=logs,
        health="/open-api/none",
    )


def sink_server(logs: Path) -> Server:
    port = free_port()
    return Server(
        "sink", uvicorn_cmd("benchmarks.servers:sink_app", port), port, logs=logs, health="/count"
    )


def own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
