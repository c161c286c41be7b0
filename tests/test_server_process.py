"""How the serving process runs (app.cli): its event loop, the GIL switch interval and
the garbage collector, checked in a fresh interpreter through the real ``sandbox``
command, since what it sets is process-wide. The listeners' ``serve`` is replaced by a
probe, so nothing listens: the probe reports, then the command returns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from app.cli import GC_THRESHOLDS, SWITCH_INTERVAL_SECONDS

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import asyncio, gc, json, sys
from app import cli, http_server

async def probe(self):
    print(json.dumps({
        "loop": type(asyncio.get_running_loop()).__module__,
        "switch": sys.getswitchinterval(),
        "thresholds": gc.get_threshold(),
        "frozen": gc.get_freeze_count(),
        "visible": len(gc.get_objects()),
        "loaded": all(name in sys.modules for name in ("fastapi", "uvicorn", "aiohttp")),
    }))

http_server.Listeners.serve = probe
sys.exit(cli.main(["sandbox", "--port", "0"]))
"""


def test_the_server_runs_on_uvloop_with_the_collector_off_the_request_path(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,  # the sandbox's database goes to ./data
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "LOG_LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["loop"].startswith("uvloop")
    assert seen["switch"] == SWITCH_INTERVAL_SECONDS
    assert tuple(seen["thresholds"]) == GC_THRESHOLDS
    # Frozen once FastAPI, uvicorn, aiohttp and the app were loaded and built: a full
    # collection then walks only what serving creates, not start-up's objects (it walked
    # them all, 35-50 ms per collection, about once a second under load).
    assert seen["loaded"]
    assert seen["frozen"] > 50_000
    assert seen["visible"] < seen["frozen"] / 10
