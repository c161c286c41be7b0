"""One process per SQLite file, enforced with an OS lock (issue 8, item 7).

A second ``serve`` or ``sandbox`` on a database in use would void the first process's
leases when its store opened (duplicate fetches and deliveries). It must refuse: exit 2
and one line naming the file, while the first process keeps working. A process killed
with -9 leaves no stale lock: the next start succeeds at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import Clopos
from tests.e2e.service import (
    ROOT,
    ServiceProcess,
    log_events,
    logged,
    notify,
    service_env,
    wait_until,
)
from tests.processes import child_pids, open_files
from tests.servers import free_port


def second_process(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m app <command>`` on a free port; it must exit by itself."""
    argv = [sys.executable, "-m", "app", command, "--host", "127.0.0.1", "--port", str(free_port())]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"a second {command} on a database in use kept running") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def assert_refused(result: subprocess.CompletedProcess[str], db: Path) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(db) in lines[0], lines[0]
    assert "in use" in lines[0], lines[0]
    assert result.stdout == ""


def test_a_second_process_on_a_database_in_use_refuses_and_the_first_keeps_working(
    tmp_path: Path, clopos: Clopos
) -> None:
    db = tmp_path / "hydrator.db"
    env = service_env(clopos.url, db)
    first = ServiceProcess(env, tmp_path / "first.log").start()
    try:
        notify(first, 1001)
        assert wait_until(lambda: logged(first, 1001) == 1, timeout=15), first.tail()

        assert_refused(second_process("serve", env), db)
        # The sandbox command, on the same file (its own Clopos stand-in, same store).
        assert_refused(second_process("sandbox", env), db)

        # The first process still accepts and delivers, and nothing was fetched twice.
        notify(first, 1002)
        assert wait_until(lambda: logged(first, 1002) == 1, timeout=15), first.tail()
        assert logged(first, 1001) == 1
        assert clopos.state.count("/open-api/v2/orders/1001") == 1

        # kill -9: the kernel drops the lock with the process; the next start needs no wait.
        first.kill(signal.SIGKILL)
        started = time.monotonic()
        after = ServiceProcess(env, tmp_path / "after.log").start()
        try:
            startup = time.monotonic() - started
            notify(after, 1003)
            assert wait_until(lambda: logged(after, 1003) == 1, timeout=15), after.tail()
        finally:
            after.stop()
        assert startup < 15, startup
    finally:
        first.stop()


def test_the_lock_is_released_on_a_clean_stop(tmp_path: Path, clopos: Clopos) -> None:
    db = tmp_path / "hydrator.db"
    env = service_env(clopos.url, db)
    first = ServiceProcess(env, tmp_path / "first.log").start()
    first.stop()
    second = ServiceProcess(env, tmp_path / "second.log").start()
    try:
        assert second.proc is not None
        assert second.proc.poll() is None, "the second start, after a clean stop, is running"
    finally:
        second.stop()


def test_a_dead_store_writer_stops_the_service_for_a_restart(
    tmp_path: Path, clopos: Clopos
) -> None:
    """The SQLite writer is a process of its own: killed (the OOM killer's choice, say),
    the service cannot work, so it exits 1 at once for the orchestrator to restart it,
    rather than answering 503 for ever. The restart loses nothing."""
    db = tmp_path / "hydrator.db"
    env = {**service_env(clopos.url, db), "SQLITE_WRITER": "process"}
    first = ServiceProcess(env, tmp_path / "first.log").start()
    try:
        assert first.proc is not None
        notify(first, 1001)
        assert wait_until(lambda: logged(first, 1001) == 1, timeout=15), first.tail()
        (writer,) = child_pids(first.proc.pid)
        # Nothing of the service's but stdio: the socket to it and the database's files.
        others = {fd: f for fd, f in open_files(writer).items() if fd > 2}
        sockets = [f for f in others.values() if f.startswith("socket:")]
        assert len(sockets) == 1, others
        assert all(f in sockets or f.startswith(str(db)) for f in others.values()), others
        os.kill(writer, signal.SIGKILL)
        assert first.proc.wait(timeout=20) == 1, first.tail()
    finally:
        first.stop()
    crashed = log_events(first.log_path, "store.writer_crashed")
    assert [e["exit_code"] for e in crashed] == [-signal.SIGKILL], first.tail()
    assert log_events(first.log_path, "service.fatal"), first.tail()

    second = ServiceProcess(service_env(clopos.url, db), tmp_path / "second.log").start()
    try:
        notify(second, 1002)
        assert wait_until(lambda: logged(second, 1002) == 1, timeout=15), second.tail()
    finally:
        second.stop()


def test_on_one_cpu_the_writer_is_a_thread_and_nothing_is_lost_to_a_kill(
    tmp_path: Path, clopos: Clopos
) -> None:
    """SQLITE_WRITER=auto on one CPU (``taskset``; a container's limit reads the same way
    through its cgroup quota): no second core for a writer process to run on, so the
    writer is a thread. The service delivers, a kill -9 loses nothing acknowledged, and
    the restart (on one CPU again) delivers the rest."""
    db = tmp_path / "hydrator.db"
    one_cpu = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    first = ServiceProcess(service_env(clopos.url, db), tmp_path / "first.log", prefix=one_cpu)
    first.start()
    try:
        assert first.proc is not None
        notify(first, 1001)
        assert wait_until(lambda: logged(first, 1001) == 1, timeout=15), first.tail()
        assert child_pids(first.proc.pid) == [], "no writer process"
        clopos.state.inject("hang")  # 1002's fetch hangs: acknowledged, not delivered
        notify(first, 1002)
        assert wait_until(lambda: not clopos.state.pending_faults()["orders"], timeout=15)
        assert first.kill() == -signal.SIGKILL
    finally:
        first.stop()
    (started,) = log_events(first.log_path, "store.writer_started")
    assert (started["writer"], started["mode"]) == ("thread", "auto"), started

    second = ServiceProcess(service_env(clopos.url, db), tmp_path / "second.log", prefix=one_cpu)
    second.start()
    try:
        assert wait_until(lambda: logged(second, 1002) == 1, timeout=15), second.tail()
    finally:
        second.stop()
