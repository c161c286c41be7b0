"""Ingest throughput: POST /webhooks/clopos of the real service vs a bare FastAPI endpoint.

Run on demand: ``.venv/bin/python benchmarks/ingest.py [--requests N] [--concurrency C]``.
Both servers run as separate uvicorn processes with the same settings and are loaded
by the same client in the same run, alternating rounds, so the ratio is fair on a
noisy machine. The service commits every notification durably (SQLite WAL,
synchronous=FULL, group commit) before its 202; the bare endpoint stores nothing.
The service's workers run too, hydrating against the sandbox, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import free_port  # noqa: E402

SECRET = "bench-webhook-secret"


def start(cmd: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Start a server process and wait until its port answers HTTP (any status)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server on {port} did not start")


async def load(
    url: str, requests: int, concurrency: int, first_id: int
) -> tuple[float, list[float]]:
    """Send ``requests`` notifications over ``concurrency`` connections; return (rps, latencies)."""
    latencies: list[float] = []
    counter = iter(range(first_id, first_id + requests))
    headers = {"X-Webhook-Token": SECRET, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for order_id in counter:
                body = b'{"event":"order.updated","data":{"id":%d}}' % (order_id % 250 + 1001)
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 202:
                        raise SystemExit(f"unexpected {response.status} from {url}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    service_port, bare_port, sandbox_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CLOPOS_BASE_URL": f"http://127.0.0.1:{sandbox_port}/open-api",
        "CLOPOS_CLIENT_ID": "sandbox-client",
        "CLOPOS_CLIENT_SECRET": "sandbox-client-secret",
        "CLOPOS_BRAND": "sandbox",
        "CLOPOS_INTEGRATOR_ID": "sandbox-integrator",
        "CLOPOS_RATE_LIMIT_PER_MINUTE": "100000",
        "WEBHOOK_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
        "LOG_LEVEL": "warning",
    }
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--log-level", "warning"]
    # The sandbox gets its own process: in the load generator's it would steal its CPU
    # during the service's rounds only (the service hydrates; the bare endpoint does not).
    sandbox = start(
        [*uvicorn, "benchmarks.sandbox_app:app", "--port", str(sandbox_port)], env, sandbox_port
    )
    service = start(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(service_port)],
        env,
        service_port,
    )
    bare = start(
        [*uvicorn, "benchmarks.bare_app:app", "--port", str(bare_port), "--no-access-log"],
        env,
        bare_port,
    )
    try:
        results: dict[str, list[float]] = {"service": [], "bare": []}
        p50: dict[str, list[float]] = {"service": [], "bare": []}
        first_id = 0
        for _ in range(args.rounds):
            for name, port in (("bare", bare_port), ("service", service_port)):
                url = f"http://127.0.0.1:{port}/webhooks/clopos"
                rps, latencies = asyncio.run(load(url, args.requests, args.concurrency, first_id))
                first_id += args.requests
                results[name].append(rps)
                p50[name].append(statistics.median(latencies) * 1000)
        print(
            f"ingest benchmark: {args.requests} requests x {args.rounds} rounds, "
            f"concurrency {args.concurrency}"
        )
        for name in ("bare", "service"):
            print(
                f"  {name:8s} median {statistics.median(results[name]):8.0f} req/s   "
                f"(rounds: {', '.join(f'{r:.0f}' for r in results[name])})   "
                f"p50 latency {statistics.median(p50[name]):.1f} ms"
            )
        ratio = statistics.median(results["service"]) / statistics.median(results["bare"])
        print(f"  service / bare throughput ratio: {ratio:.2f}")
    finally:
        for proc in (service, bare, sandbox):
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
