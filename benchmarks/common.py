"""What the benchmarks share: server processes on loopback ports, the service's
environment, a verifying sink, percentiles, and one row format for ``make bench``.

Every figure a benchmark reports is a ratio to a baseline measured in the same run
(the machines are shared and noisy), with the absolute numbers beside it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
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
from typing import IO, Any

import aiohttp
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
# The same, as the body of the sandbox's POST /v2/auth (for clients other than the service).
SANDBOX_AUTH = {key.removeprefix("CLOPOS_").lower(): v for key, v in SANDBOX_CREDENTIALS.items()}


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


def _stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU time from a /proc ``stat`` file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _family(pid: int) -> list[int]:
    """``pid`` and its living descendants: the service's store writer is a child
    process (app/store/sqlite_writer.py), and its work is the service's."""
    family = [pid]
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in tasks.read_text().split():
                family += _family(int(child))
    return family


def _status_kb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return float(line.split()[1])
    return float("nan")


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
        """User + system CPU time of the process and its living children so far (Linux
        /proc)."""
        total = 0.0
        for pid in _family(self.pid):
            with contextlib.suppress(OSError):  # a child that has just exited
                total += _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
        return total

    def main_thread_cpu_seconds(self) -> float:
        """The same for its main thread alone (its thread id is the process id)."""
        return _stat_cpu_seconds(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))

    def rss_mb(self) -> float:
        """Resident memory of the process and its children."""
        return sum(_status_kb(pid, "VmRSS:") for pid in _family(self.pid)) / 1024

    def peak_rss_mb(self) -> float:
        """The sum of each one's peak: at least the peak of the two together."""
        return sum(_status_kb(pid, "VmHWM:") for pid in _family(self.pid)) / 1024

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


SINK_SECRET = "whsec_" + base64.b64encode(b"bench-sink-secret-0123456789abcdef").decode()


def http_sink_setting(sink: Server, concurrency: int = 4) -> str:
    """SINKS for one HTTP sink at the counting sink (defaults otherwise)."""
    setting = {"type": "http", "name": "bench", "url": f"{sink.url}/hook", "secret": SINK_SECRET}
    return json.dumps([{**setting, "concurrency": concurrency}])


async def notify(url: str, order_ids: list[int], concurrency: int = 32) -> dict[int, int]:
    """POST one notification per order id (in order, ``concurrency`` at a time); the
    count of each status answered. A refused connection counts as status 0."""
    statuses: dict[int, int] = {}
    headers = {"X-Webhook-Token": WEBHOOK_SECRET, "Content-Type": "application/json"}
    ids = iter(order_ids)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for order_id in ids:
                body = b'{"event":"order.updated","data":{"id":%d}}' % order_id
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = 0
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def sink_count(sink: Server) -> dict[str, Any]:
    count: dict[str, Any] = httpx.get(f"{sink.url}/count", timeout=60).json()
    return count


def sink_orders(sink: Server) -> dict[int, float]:
    """Order id -> when the sink first received it (epoch seconds)."""
    return {int(k): v for k, v in httpx.get(f"{sink.url}/orders", timeout=60).json().items()}


def reset_sink(sink: Server) -> None:
    httpx.post(f"{sink.url}/reset", timeout=60).raise_for_status()


def wait_delivered(sink: Server, orders: int, *, timeout: float, idle: float = 10.0) -> float:
    """Wait until the sink holds ``orders`` distinct orders, or nothing new arrived for
    ``idle`` seconds, or ``timeout``; return when the last one arrived (epoch seconds)."""
    deadline = time.monotonic() + timeout
    seen, progress_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sink_count(sink)
        if count["orders"] >= orders:
            break
        if count["orders"] != seen:
            seen, progress_at = count["orders"], time.monotonic()
        elif time.monotonic() - progress_at > idle:
            break
        time.sleep(0.2)
    last_at: float = sink_count(sink)["last_at"]
    return last_at


def sandbox_stats(sandbox: Server) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{sandbox.url}/_sandbox/stats", timeout=60).json()
    return stats


def reset_sandbox_counters(sandbox: Server) -> None:
    httpx.post(f"{sandbox.url}/_sandbox/reset", json={}, timeout=60).raise_for_status()
