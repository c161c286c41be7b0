"""The README's sandbox section, walked as a new user would: its commands pasted into a
shell (bash) against a real ``clopos-hydrator sandbox`` process, on a free port instead of
8000. What the README says they answer is what they answer."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.service import ROOT, log_events, wait_until
from tests.servers import free_port

README = ROOT / "README.md"


def sandbox_section() -> str:
    text = README.read_text()
    start = text.index("## Try it in the sandbox")
    return text[start : text.index("\n## ", start + 1)]


def shell_blocks(section: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", section, re.S)


class Sandbox:
    """``python -m app sandbox`` in its own directory (so ./data is there), JSON logs."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"sandbox-{self.port}.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "sandbox", "--port", str(self.port), *args],
                cwd=cwd,
                env={**env, "HOME": os.environ.get("HOME", "/tmp")},
                stdout=log_file,
                stderr=log_file,
            )
        assert wait_until(self._healthy, timeout=30), self.log()

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sandbox exited {self.proc.returncode}: {self.log()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory like a fresh clone after `make sandbox`: `.venv/bin/clopos-hydrator`
    runs this checkout's CLI (with the interpreter running the tests)."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "clopos-hydrator"
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m app "$@"\n')
    script.chmod(0o755)
    return tmp_path


@pytest.fixture
def sandbox(workdir: Path) -> Iterator[Sandbox]:
    box = Sandbox(workdir)
    yield box
    box.stop()


def paste(block: str, sandbox: Sandbox) -> subprocess.CompletedProcess[str]:
    """Run a README block in bash as pasted, aimed at the test's port."""
    script = block.replace("127.0.0.1:8000", f"127.0.0.1:{sandbox.port}").replace(
        "localhost:8000", f"127.0.0.1:{sandbox.port}"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "")}
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=sandbox.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_sandbox_command_of_the_readme_pastes_and_answers_as_shown(
    sandbox: Sandbox,
) -> None:
    blocks = shell_blocks(sandbox_section())
    runnable = [b for b in blocks if not b.lstrip().startswith("make sandbox")]
    assert len(runnable) >= 4, blocks
    # As a user who pastes once the banner is up: the first poll cycle has run (seconds;
    # the deadline is for a loaded machine).
    assert wait_until(lambda: log_events(sandbox.log_path, "list_hydration.stored"), timeout=60), (
        sandbox.log()[-3000:]
    )

    outputs = []
    for block in runnable:
        result = paste(block, sandbox)
        assert result.returncode == 0, (block, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        outputs.append(result.stdout)

    # The first answer is the one the README shows, notification id included.
    shown = re.search(r"# => (\{.*)", runnable[0])
    assert shown is not None
    expected = dict(re.findall(r'"(\w+)":(\w+|"\w+")', shown.group(1)))
    answer = json.loads(outputs[0])
    assert {key: json.dumps(answer[key]) for key in expected} == expected, (shown, answer)

    faults = next(out for block, out in zip(runnable, outputs, strict=True) if "faults" in block)
    assert json.loads(faults).get("success") is not False, faults

    cli_block = next(i for i, block in enumerate(runnable) if "clopos-hydrator status" in block)
    cli_out = outputs[cli_block]
    assert "poll watermark" in cli_out  # status
    assert "202 " in cli_out  # send-test accepted
    snapshot = json.loads(cli_out[cli_out.index('{\n  "id"') :])  # hydrate --sandbox
    assert (snapshot["order_id"], snapshot["order"]["receipt"]["id"]) == (1001, 5001)


def test_the_banner_names_the_store_by_its_absolute_path(sandbox: Sandbox) -> None:
    banner = sandbox.log()
    assert str((sandbox.cwd / "data" / "sandbox.db").resolve()) in banner, banner


def test_sandbox_reset_starts_from_an_empty_store(workdir: Path) -> None:
    def first_answer(box: Sandbox) -> int:
        response = httpx.post(
            f"{box.url}/webhooks/clopos",
            headers={"X-Webhook-Token": "sandbox-webhook-secret"},
            json={"data": {"id": 1001}},
        )
        assert response.status_code == 202, response.text
        return int(response.json()["notification_id"])

    box = Sandbox(workdir, "--reset")
    try:
        fresh = first_answer(box)
        assert first_answer(box) > fresh
    finally:
        box.stop()
    again = Sandbox(workdir, "--reset")
    try:
        assert "sandbox: reset, deleted" in again.log()
        # Poller ids may interleave; a store that was kept would count on from the last.
        assert first_answer(again) <= fresh + 1
    finally:
        again.stop()
