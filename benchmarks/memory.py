"""Memory: the service's peak RSS with 100,000 notifications queued.

    .venv/bin/python benchmarks/memory.py [--queued 100000]

``--queued`` notifications, one per distinct order, are written to a fresh SQLite
store through the store's own enqueue (the same rows the webhook writes, far faster
than 100,000 HTTP requests), then the service starts on that store against the
sandbox at the documented budget (300 calls a minute), so the backlog stays queued
while its workers, readiness checks and metrics walk it. It takes 2,000 more
notifications over HTTP, answers /readyz and /metrics, runs 10 s, and its peak RSS
(VmHWM) is read. Baseline, in the same run: the same service, same steps, on an empty
store. The backlog lives on disk, so the difference should be small.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store.base import Notification
from app.store.sqlite import SqliteStore
from benchmarks.common import (
    Row,
    Server,
    free_port,
    notify,
    sandbox_server,
    scratch,
    service_cmd,
    service_env,
)

GOAL_MB = 150.0
RUN_SECONDS = 10.0


async def _prefill(path: Path, queued: int) -> None:
    store = SqliteStore(path)
    await store.open()
    try:
        now = time.time()
        for start in range(0, queued, 1000):
            await asyncio.gather(
                *(
                    store.enqueue(Notification(brand="sandbox", order_id=i, received_at=now))
                    for i in range(1_000_000 + start, 1_000_000 + min(start + 1000, queued))
                )
            )
    finally:
        await store.close()


def _peak_rss(sandbox: Server, db: Path, logs: Path) -> float:
    port = free_port()
    env = service_env(sandbox, f"sqlite:///{db}", CLOPOS_RATE_LIMIT_PER_MINUTE="300")
    with Server(f"service-{db.stem}", service_cmd(port), port, env=env, logs=logs) as service:
        asyncio.run(notify(f"{service.url}/webhooks/clopos", list(range(2001, 4001))))
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline:
            httpx.get(f"{service.url}/readyz", timeout=30)
            httpx.get(f"{service.url}/metrics", timeout=30)
            time.sleep(1.0)
        return service.peak_rss_mb()


def run(args: argparse.Namespace) -> list[Row]:
    logs = scratch("memory")
    full, empty = logs / "full.db", logs / "empty.db"
    started = time.monotonic()
    asyncio.run(_prefill(full, args.queued))
    print(f"memory: {args.queued} notifications queued in {time.monotonic() - started:.0f} s")
    with sandbox_server(logs, seed_orders=10, limit=300) as sandbox:
        baseline = _peak_rss(sandbox, empty, logs)
        peak = _peak_rss(sandbox, full, logs)
    print(f"  peak RSS {peak:.0f} MB with {args.queued} queued, {baseline:.0f} MB with none")
    return [
        Row(
            "5. memory",
            f"peak RSS, {args.queued:,} notifications queued",
            f"{peak:.0f} MB",
            f"empty queue {baseline:.0f} MB",
            f"{peak / baseline:.2f}x",
            f"<= {GOAL_MB:.0f} MB",
            "met" if peak <= GOAL_MB else "NOT met",
        )
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queued", type=int, default=100_000)
    return p


if __name__ == "__main__":
    run(parser().parse_args())
