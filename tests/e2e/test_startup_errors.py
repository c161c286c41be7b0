"""Every unusable store location stops start-up with one line naming DATABASE_URL and the
reason, exit 2, through the real CLI (``serve`` and ``sandbox``). Before, these were a
traceback from the server's start-up and exit 3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.service import ROOT, SANDBOX_CREDENTIALS, wait_until
from tests.servers import free_port

PREFIX = "clopos-hydrator: configuration error: DATABASE_URL: "


def start(
    cwd: Path, database_url: str, *, command: str = "serve"
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "WEBHOOK_SECRET": "startup-secret",
        "DATABASE_URL": database_url,
        **SANDBOX_CREDENTIALS,
    }
    args = [sys.executable, "-m", "app", command, "--host", "127.0.0.1"]
    return subprocess.run(
        [*args, "--port", str(free_port())],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_config_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0][len(PREFIX) :]


@pytest.mark.parametrize("command", ["serve", "sandbox"])
def test_a_path_through_a_file(tmp_path: Path, command: str) -> None:
    reason = one_config_line(start(tmp_path, "sqlite:////etc/passwd/x.db", command=command))
    assert (
        reason == "cannot create the directory /etc/passwd: /etc/passwd is a file, not a directory"
    )


def test_a_path_deeper_through_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a directory")
    reason = one_config_line(start(tmp_path, f"sqlite:///{tmp_path}/plain/sub/x.db"))
    assert f"{tmp_path}/plain is a file, not a directory" in reason


def test_a_directory_where_the_file_should_be(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    reason = one_config_line(start(tmp_path, f"sqlite:///{tmp_path}/db"))
    assert reason == f"{tmp_path}/db is a directory, not a database file"


def test_a_directory_it_may_not_write_in(tmp_path: Path) -> None:
    """A directory without write permission for the service (in a container: a root-owned
    bind mount; `make container-check` runs that case in a real container). Root may write
    anywhere permissions allow, so as root the directory is one no one may write: /sys."""
    if os.geteuid() == 0:
        directory = Path("/sys/kernel")
    else:
        directory = tmp_path / "read-only"
        directory.mkdir(mode=0o555)
    reason = one_config_line(start(tmp_path, f"sqlite:///{directory}/hydrator.db"))
    mode = f"{directory.stat().st_mode & 0o777:o}"
    assert reason == (
        f"cannot write in the directory {directory}: permission denied for uid {os.geteuid()} "
        f"({directory} is owned by uid {directory.stat().st_uid}, mode {mode})"
    )


def test_a_database_file_it_may_not_write(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may write any file permissions allow; covered by the directory case")
    db = tmp_path / "hydrator.db"
    db.write_bytes(b"")
    db.chmod(0o444)
    reason = one_config_line(start(tmp_path, f"sqlite:///{db}"))
    assert reason.startswith(f"cannot open {db} for writing: permission denied"), reason


def test_a_usable_location_still_starts(tmp_path: Path) -> None:
    """The check does not refuse what works: a fresh nested directory is created."""
    db = tmp_path / "new" / "nested" / "hydrator.db"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "WEBHOOK_SECRET": "startup-secret",
        "DATABASE_URL": f"sqlite:///{db}",
        "POLL_INTERVAL_SECONDS": "0",
        **SANDBOX_CREDENTIALS,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: (db.parent / "hydrator.db-wal").exists(), timeout=30)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
