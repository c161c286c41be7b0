"""How the serving process runs its event loop (app.cli._run_server), checked in a fresh
interpreter, since what it sets (the loop, the GIL switch interval, the collector) is
process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from app.cli import GC_THRESHOLDS, SWITCH_INTERVAL_SECONDS

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import asyncio, gc, json, sys
from app.cli import _run_server

async def main():
    print(json.dumps({
        "loop": type(asyncio.get_running_loop()).__module__,
        "switch": sys.getswitchinterval(),
        "thresholds": gc.get_threshold(),
        "frozen": gc.get_freeze_count(),
    }))
    return 0

sys.exit(_run_server(main()))
"""


def test_the_server_runs_on_uvloop_with_the_collector_off_the_request_path() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["loop"].startswith("uvloop")
    assert seen["switch"] == SWITCH_INTERVAL_SECONDS
    assert tuple(seen["thresholds"]) == GC_THRESHOLDS
    # What start-up loaded is frozen: a full collection no longer walks it (tens of
    # thousands of objects with FastAPI and pydantic loaded, 35-50 ms per collection).
    assert seen["frozen"] > 10_000
