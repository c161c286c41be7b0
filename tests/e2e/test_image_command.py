"""What the image runs, run natively: the Dockerfile's ENTRYPOINT + CMD start the service,
its HEALTHCHECK command finds the port in use, and a SIGTERM to the service as PID 1 (as
in a container) ends it with exit status 143."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.service import ROOT, ServiceProcess, service_env, wait_until
from tests.processes import child_pids
from tests.servers import free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def exec_form(instruction: str) -> list[str]:
    """The JSON array of ``ENTRYPOINT``/``CMD`` or of ``HEALTHCHECK ... CMD``."""
    text = DOCKERFILE.replace("\\\n", " ")
    match = re.search(rf"^{instruction}\b.*?(\[.*\])\s*$", text, re.M)
    assert match, f"{instruction} must be in exec (JSON array) form"
    words: list[str] = json.loads(match.group(1))
    return words


def native(words: list[str]) -> list[str]:
    """The image's console script is this checkout's ``python -m app``."""
    assert words[0] == "clopos-hydrator"
    return [sys.executable, "-m", "app", *words[1:]]


def on_port(cmd: list[str], port: int) -> list[str]:
    """The CMD with its port swapped for a free one (tests never use a fixed port) and
    bound to loopback only."""
    swapped = list(cmd)
    swapped[swapped.index("--port") + 1] = str(port)
    swapped[swapped.index("--host") + 1] = "127.0.0.1"
    return swapped


def healthcheck(pid: int) -> subprocess.CompletedProcess[str]:
    words = exec_form("HEALTHCHECK")
    return subprocess.run(
        [*native(words), "--pid", str(pid)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_image_command_runs_natively_and_its_health_check_follows_the_port(
    tmp_path: Path,
) -> None:
    cmd = exec_form("CMD")
    assert exec_form("ENTRYPOINT") == ["clopos-hydrator"]
    assert cmd[0] == "serve"
    port = free_port()
    env = service_env("http://127.0.0.1:9/open-api", tmp_path / "hydrator.db")
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            native(["clopos-hydrator", *on_port(cmd, port)]),
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    service = ServiceProcess(env, log_path, port)
    service.proc = proc
    try:
        assert wait_until(lambda: healthcheck(proc.pid).returncode == 0, timeout=30), (
            healthcheck(proc.pid).stderr,
            service.tail(),
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM  # died of it, after a clean stop
    finally:
        service.stop()
    down = healthcheck(proc.pid)
    assert down.returncode == 1
    assert down.stderr.startswith("clopos-hydrator: healthcheck: "), down.stderr


def test_the_health_check_fails_when_nothing_listens_on_the_serving_port(tmp_path: Path) -> None:
    """A process whose command line says `serve --port N` while nothing answers on N."""
    port = free_port()
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "serve", "--port", str(port)]
    )
    try:
        result = healthcheck(stand_in.pid)
        assert result.returncode == 1
        assert f"http://127.0.0.1:{port}" in result.stderr, result.stderr
    finally:
        stand_in.kill()
        stand_in.wait()


def test_sigterm_to_the_service_as_pid_1_exits_143(tmp_path: Path) -> None:
    """In a container the service is PID 1, and the kernel drops a signal PID 1 has no
    handler for: the re-raised SIGTERM used to do nothing, and the exit status was 0. A new
    PID namespace (util-linux `unshare`) makes it PID 1 here, as Docker does."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr!r}")
    port = free_port()
    env = service_env("http://127.0.0.1:9/open-api", tmp_path / "hydrator.db")
    log_path = tmp_path / "service.log"
    cmd = on_port(exec_form("CMD"), port)
    with log_path.open("wb") as log_file:
        outer = subprocess.Popen(
            [unshare, "--pid", "--fork", *native(["clopos-hydrator", *cmd])],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    inner: int | None = None
    try:
        assert wait_until(lambda: bool(child_pids(outer.pid)), timeout=10)
        inner = child_pids(outer.pid)[0]
        assert wait_until(lambda: healthcheck(inner).returncode == 0, timeout=30), (
            log_path.read_text()
        )
        started = time.monotonic()
        # From outside the namespace, as `docker stop` does.
        subprocess.run(["kill", "-TERM", str(inner)], check=True)
        assert outer.wait(timeout=30) == 143, log_path.read_text()[-3000:]
        assert time.monotonic() - started < 20
        assert '"service.stopped"' in log_path.read_text()
    finally:
        # A PID 1 that ignored SIGTERM (the bug this tests) outlives `unshare`: kill it
        # first, by its pid (SIGKILL reaches a namespace's init from outside).
        if inner is not None and Path(f"/proc/{inner}").exists():
            subprocess.run(["kill", "-KILL", str(inner)], check=False)
        if outer.poll() is None:
            outer.kill()
        outer.wait(timeout=30)
