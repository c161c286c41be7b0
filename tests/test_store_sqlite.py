"""What is particular to the SQLite store: group commit, durability settings, migrations,
failure isolation inside a batch, lifecycle, and the DATABASE_URL forms."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import ConfigError, StoreError, StoreInUseError
from app.logs import configure_logging
from app.store import open_store, sql, sqlite_listed, sqlite_path
from app.store.base import DeadLetterFilter, NewSnapshot, Notification
from app.store.lock import lock_path
from app.store.postgres import PostgresStore
from app.store.sqlite import SqliteStore
from app.store.sqlite import _enqueue as sqlite_enqueue
from app.store.sqlite_writer import migrate, migration_scripts, split_statements
from tests.processes import child_pids, exited

T0 = 1_700_000_000.0
REPO = Path(__file__).resolve().parents[1]

# Enqueues forever, printing each notification id once its enqueue returned (the "ack").
CRASHING_WRITER = """
import asyncio, sys
from app.store.base import Notification
from app.store.sqlite import SqliteStore
from tests.test_store_sqlite import _wait_at_gate

async def main():
    store = SqliteStore(sys.argv[1], writer=sys.argv[3])
    await store.open()
    for i in range(1, 301):
        notice = Notification(brand="acme", order_id=i, received_at=float(i))
        print((await store.enqueue(notice)).notification_id, flush=True)
    # Then hold the writer inside an operation (up to 10 s) while more enqueues wait.
    folder = sys.argv[2]
    gate = asyncio.ensure_future(store.run(
        "gate", _wait_at_gate, folder + "/gate-entered", folder + "/gate-released"
    ))
    more = [asyncio.ensure_future(store.enqueue(Notification("acme", 301, 301.0)))]
    await asyncio.gather(gate, *more)

asyncio.run(main())
"""


def notice(order_id: int, at: float = T0) -> Notification:
    return Notification(brand="acme", order_id=order_id, received_at=at)


@pytest.fixture(params=["process", "thread"])
async def sqlite_store(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[SqliteStore]:
    """The store with each writer (SQLITE_WRITER): they make the same promises."""
    store = SqliteStore(tmp_path / "store.db", writer=request.param)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def process_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """The store with its writer as a process (what can only go wrong on a wire)."""
    store = SqliteStore(tmp_path / "store.db", writer="process")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _wait_at_gate(conn: sqlite3.Connection, entered: str, release: str) -> None:
    """Run in the writer process: say so, then hold it until released (at most 10 s)."""
    Path(entered).touch()
    deadline = time.monotonic() + 10
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.005)


class Gate:
    """An operation that holds the writer process until released, so that the
    operations submitted meanwhile are queued and run together as the next batch. Two
    files are the signals: the writer is another process."""

    def __init__(self, folder: Path) -> None:
        self.entered = folder / "gate-entered"
        self.released = folder / "gate-released"

    async def hold(self, store: SqliteStore) -> asyncio.Task[None]:
        task = asyncio.create_task(
            store.run("gate", _wait_at_gate, str(self.entered), str(self.released))
        )
        deadline = time.monotonic() + 10
        while not self.entered.exists():
            assert time.monotonic() < deadline, "the gate was never entered"
            await asyncio.sleep(0.005)
        return task

    def release(self) -> None:
        self.released.touch()

    async def let_through(self, held: asyncio.Task[None]) -> None:
        """Release the held batch once every task created meanwhile has reached its
        await (all of them queued): they run together as the next batch."""
        await asyncio.sleep(0)
        self.release()
        await held


def _execute(conn: sqlite3.Connection, statement: str, params: Any = ()) -> None:
    conn.execute(statement, params)


def _count_notifications(conn: sqlite3.Connection) -> int:
    count: int = conn.execute("SELECT count(*) FROM notifications").fetchone()[0]
    return count


def _ids(conn: sqlite3.Connection) -> set[int]:
    return {row[0] for row in conn.execute("SELECT id FROM notifications")}


def _overflow(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT :n", {"n": 2**70})


def _refuse(conn: sqlite3.Connection) -> None:
    raise StoreError("the heartbeat row is missing")


def _violate_at_commit(conn: sqlite3.Connection) -> None:
    # A deferred foreign-key violation passes the statement and fails the COMMIT.
    conn.execute("PRAGMA defer_foreign_keys = ON")
    conn.execute(
        "INSERT INTO deliveries (snapshot_id, sink, brand, order_id, version, status,"
        " retry_at, created_at, updated_at, first_received_at)"
        " VALUES (999999, 'http', 'acme', 1, 1, 'pending', 0, 0, 0, 0)"
    )


_TRACED: list[str] = []  # in the writer process: the statements traced meanwhile


def _trace_on(conn: sqlite3.Connection) -> None:
    _TRACED.clear()
    conn.set_trace_callback(_TRACED.append)


def _trace_off(conn: sqlite3.Connection) -> list[str]:
    conn.set_trace_callback(None)
    return list(_TRACED)


async def test_concurrent_enqueues_are_group_committed(sqlite_store: SqliteStore) -> None:
    before = sqlite_store.commits
    results = await asyncio.gather(
        *(sqlite_store.enqueue(notice(i % 50, T0 + i)) for i in range(200))
    )
    commits = sqlite_store.commits - before
    assert len({r.notification_id for r in results}) == 200
    assert 1 <= commits < 200, f"{commits} commits for 200 enqueues"
    jobs = await sqlite_store.claim_hydrations(limit=100, now=T0 + 500, lease_seconds=60)
    assert len(jobs) == 50
    assert sum(len(job.notification_ids) for job in jobs) == 200


async def test_ops_queued_together_share_one_commit(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    before = sqlite_store.commits
    tasks = [asyncio.create_task(sqlite_store.enqueue(notice(i))) for i in range(20)]
    await gate.let_through(held)  # all 20 are queued
    await asyncio.gather(*tasks)
    assert sqlite_store.commits - before == 2, "the gate's batch, then one for all 20"


async def test_a_failing_op_rolls_back_alone(sqlite_store: SqliteStore, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    good = [asyncio.create_task(sqlite_store.enqueue(notice(i))) for i in range(10)]
    bad = asyncio.create_task(sqlite_store.run("half_then_fail", _write_then_fail))
    more = [asyncio.create_task(sqlite_store.enqueue(notice(i))) for i in range(10, 20)]
    await gate.let_through(held)

    with pytest.raises(StoreError, match="no_such_table"):
        await bad
    assert all(not r.duplicate for r in await asyncio.gather(*good, *more))
    assert (await sqlite_store.list_dead_letters(DeadLetterFilter())).total == 0, "rolled back"
    jobs = await sqlite_store.claim_hydrations(limit=50, now=T0, lease_seconds=60)
    assert len(jobs) == 20


async def test_any_exception_of_an_op_leaves_as_store_error(sqlite_store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="OverflowError") as info:
        await sqlite_store.run("overflow", _overflow)
    assert isinstance(info.value.__cause__, OverflowError)

    with pytest.raises(StoreError) as refused:
        await sqlite_store.run("refuse", _refuse)
    assert str(refused.value) == "the heartbeat row is missing", "passed untouched, not wrapped"
    await sqlite_store.ping()


async def test_an_op_that_cannot_be_sent_fails_alone(process_store: SqliteStore) -> None:
    """The writer is another process: a closure cannot be sent there. Its caller gets a
    StoreError at once; nothing reaches the writer, which carries on."""
    with pytest.raises(StoreError, match="cannot be sent to the store writer"):
        await process_store.run("closure", lambda conn: None)
    await process_store.enqueue(notice(1))
    assert await process_store.run("count", _count_notifications) == 1


async def test_a_failed_commit_fails_every_op_of_its_batch(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    victim = asyncio.create_task(sqlite_store.enqueue(notice(1)))
    culprit = asyncio.create_task(sqlite_store.run("violate", _violate_at_commit))
    await gate.let_through(held)
    for task in (victim, culprit):
        with pytest.raises(StoreError, match="not committed"):
            await task

    await sqlite_store.enqueue(notice(2))  # the store carries on
    jobs = await sqlite_store.claim_hydrations(limit=10, now=T0, lease_seconds=60)
    assert [job.order_id for job in jobs] == [2], "the failed batch left nothing behind"


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    first = SqliteStore(path)
    await first.open()
    await first.enqueue(notice(1))
    job = (await first.claim_hydrations(limit=1, now=T0, lease_seconds=60))[0]
    snapshot = NewSnapshot(key="k", body=b"{}", order_updated_at=None, hydrated_at=T0)
    await first.complete_hydration(job, snapshot, ["http"], now=T0)
    await first.enqueue(notice(2))
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.latest_snapshot_body("acme", 1) == b"{}"
        jobs = await second.claim_hydrations(limit=10, now=T0, lease_seconds=60)
        assert [j.order_id for j in jobs] == [2]
        claimed = await second.claim_deliveries(sink="http", limit=10, now=T0, lease_seconds=60)
        assert [d.order_id for d in claimed] == [1]
    finally:
        await second.close()


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_every_acknowledged_enqueue_survives_kill_9(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "store.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(path), str(tmp_path), writer],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    acked: set[int] = set()
    writers: list[int] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip().isdigit():
                acked.add(int(line))
            if len(acked) >= 300:
                break
        writers = child_pids(child.pid)
        deadline = time.monotonic() + 10
        while not (tmp_path / "gate-entered").exists():
            assert time.monotonic() < deadline, "the writer never entered the gate"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert len(acked) >= 300
    if writer == "thread":
        assert writers == [], "the writer is a thread of the service"
    else:
        assert len(writers) == 1, "the store's writer is a process of its own"
        # Inside an operation for up to 10 s more: only PR_SET_PDEATHSIG ends it this soon.
        assert exited(writers[0], within=3), "the writer died with the service: no orphan"

    store = SqliteStore(path)
    await store.open()
    try:
        stored = await store.run("ids", _ids)
    finally:
        await store.close()
    assert acked <= stored, f"lost {len(acked - stored)} acknowledged notifications"


async def test_a_dead_writer_fails_its_callers_and_the_store_refuses_work(
    tmp_path: Path,
) -> None:
    """The writer process killed under the service: whoever waits gets a StoreError (the
    webhook answers 503, readiness fails), never a hang; nothing new is accepted."""
    before = set(child_pids(os.getpid()))
    store = SqliteStore(tmp_path / "store.db", writer="process")
    await store.open()
    try:
        (writer,) = set(child_pids(os.getpid())) - before
        await store.enqueue(notice(1))
        gate = Gate(tmp_path)
        held = await gate.hold(store)
        waiting = asyncio.create_task(store.enqueue(notice(2)))
        await asyncio.sleep(0.05)
        os.kill(writer, signal.SIGKILL)
        for task in (held, waiting):
            with pytest.raises(StoreError, match="the store writer exited"):
                await asyncio.wait_for(task, 10)
        with pytest.raises(StoreError, match="closed"):
            await store.enqueue(notice(3))
        with pytest.raises(StoreError, match="closed"):
            await store.ping()
    finally:
        await store.close()


async def test_the_writer_watch_ends_in_an_error_only_when_the_writer_dies(
    tmp_path: Path,
) -> None:
    """``watch_work`` is what the runtime supervises: a dead writer ends it with an error
    (the service exits for a restart); a store closed on purpose ends it quietly."""
    closed = SqliteStore(tmp_path / "closed.db")
    await closed.open()
    watch = asyncio.create_task(closed.watch_work(lambda kind: None))
    await asyncio.sleep(0.05)
    await closed.close()
    assert await asyncio.wait_for(watch, 10) is None

    before = set(child_pids(os.getpid()))
    dying = SqliteStore(tmp_path / "dying.db", writer="process")
    await dying.open()
    try:
        (writer,) = set(child_pids(os.getpid())) - before
        watch = asyncio.create_task(dying.watch_work(lambda kind: None))
        await asyncio.sleep(0.05)
        assert not watch.done()
        os.kill(writer, signal.SIGKILL)
        with pytest.raises(StoreError, match="the store writer exited"):
            await asyncio.wait_for(watch, 10)
    finally:
        await dying.close()


def _die(conn: sqlite3.Connection) -> None:
    raise SystemExit(7)  # no operation's error: it escapes the batch and ends the writer


async def test_a_writer_that_dies_fails_its_batch_and_ends_the_watch(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    """Whatever ends the writer (a process or a thread): the callers of its batch get a
    StoreError, the batch is not committed, the store refuses work, and ``watch_work``
    ends in an error (the runtime exits 1 for a restart), with store.writer_crashed."""
    logs = io.StringIO()
    configure_logging(fmt="json", level="info", secrets=[], stream=logs)
    watch = asyncio.create_task(sqlite_store.watch_work(lambda kind: None))
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    dying = asyncio.create_task(sqlite_store.run("die", _die))
    beside = asyncio.create_task(sqlite_store.enqueue(notice(1)))
    await gate.let_through(held)
    for task in (dying, beside, watch):
        with pytest.raises(StoreError, match="the store writer exited"):
            await asyncio.wait_for(task, 10)
    with pytest.raises(StoreError, match="closed"):
        await sqlite_store.enqueue(notice(2))
    (crash,) = [
        e
        for e in map(json.loads, logs.getvalue().splitlines())
        if e["event"] == "store.writer_crashed"
    ]
    assert crash["level"] == "critical"
    if crash["writer"] == "process":
        assert crash["exit_code"] == 7, crash
    else:
        assert crash["writer"] == "thread", crash
        assert crash["error"] == "SystemExit(7)", crash
    await sqlite_store.close()

    again = SqliteStore(sqlite_store.path)
    await again.open()
    try:
        assert await again.run("count", _count_notifications) == 0, "that batch was not committed"
    finally:
        await again.close()


def _big(conn: sqlite3.Connection, size: int) -> bytes:
    return b"x" * size


async def test_answers_larger_than_the_socket_buffer_arrive_whole(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    """A batch's answer of many megabytes (a page of delivery bodies, a big snapshot)
    is sent in full: the writer's socket is in blocking mode whenever it answers."""
    assert len(await sqlite_store.run("big", _big, 8 << 20)) == 8 << 20
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    many = [asyncio.create_task(sqlite_store.run("big", _big, 100_000)) for _ in range(64)]
    await gate.let_through(held)
    assert [len(b) for b in await asyncio.gather(*many)] == [100_000] * 64
    await sqlite_store.ping()


def _refuse_to_load() -> None:
    raise RuntimeError("this argument cannot be loaded")


class Unloadable:
    """Pickles in the service, but cannot be loaded in the writer process."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse_to_load, ())


async def test_an_op_the_writer_cannot_load_fails_alone(
    process_store: SqliteStore, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    held = await gate.hold(process_store)
    good = asyncio.create_task(process_store.enqueue(notice(1)))
    bad = asyncio.create_task(process_store.run("unloadable", _execute, "SELECT 1", Unloadable()))
    more = asyncio.create_task(process_store.enqueue(notice(2)))
    await gate.let_through(held)
    with pytest.raises(StoreError, match="unloadable: cannot be read by the store writer"):
        await bad
    assert not (await good).duplicate
    assert not (await more).duplicate
    assert await process_store.run("count", _count_notifications) == 2


def _sleep(conn: sqlite3.Connection, seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def _logged(logs: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, logs.getvalue().splitlines()) if e["event"] == event]


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_a_second_stop_waits_for_the_first(tmp_path: Path, writer: str) -> None:
    store = SqliteStore(tmp_path / "store.db", writer=writer)  # type: ignore[arg-type]
    await store.open()
    backend = store._writer
    assert backend is not None
    slow = asyncio.create_task(store.run("sleep", _sleep, 0.3))
    await asyncio.sleep(0.05)
    first = asyncio.create_task(backend.stop())
    await asyncio.sleep(0)
    await asyncio.wait_for(backend.stop(), 10)
    assert slow.done(), "the second stop returned while the writer still worked"
    assert await slow == "slept"
    await first
    await store.close()


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_the_batch_limit_bounds_each_transaction(tmp_path: Path, writer: str) -> None:
    store = SqliteStore(tmp_path / "store.db", writer=writer, batch_limit=2)  # type: ignore[arg-type]
    await store.open()
    try:
        gate = Gate(tmp_path)
        held = await gate.hold(store)
        before = store.commits
        queued = [asyncio.create_task(store.enqueue(notice(i))) for i in range(1, 6)]
        await gate.let_through(held)
        await asyncio.gather(*queued)
        assert store.commits - before == 1 + 3, "the gate's batch, then 5 in batches of 2"
    finally:
        await store.close()


async def test_a_failure_to_choose_the_writer_releases_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(mode: str) -> None:
        raise StoreError("no writer for you")

    monkeypatch.setattr("app.store.sqlite.choose_writer", broken)
    with pytest.raises(StoreError, match="no writer for you"):
        await SqliteStore(tmp_path / "store.db").open()
    # Released: another open file description may take it (as another process would).
    fd = os.open(lock_path(tmp_path / "store.db"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


async def test_a_thread_that_cannot_start_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    store = SqliteStore(tmp_path / "store.db", writer="thread")
    with pytest.raises(StoreError, match="cannot start the store writer"):
        await asyncio.wait_for(store.open(), 10)
    monkeypatch.undo()
    await asyncio.wait_for(store.close(), 10)
    await store.open()  # and nothing was left holding the file
    await store.close()


async def test_whatever_stops_the_thread_opening_reaches_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(conn: sqlite3.Connection) -> list[str]:
        raise SystemExit(3)

    monkeypatch.setattr("app.store.writer_thread.migrate", interrupted)
    store = SqliteStore(tmp_path / "store.db", writer="thread")
    with pytest.raises(StoreError, match="SystemExit"):
        await asyncio.wait_for(store.open(), 10)


async def test_a_thread_that_dies_while_stopping_is_logged(tmp_path: Path) -> None:
    logs = io.StringIO()
    configure_logging(fmt="json", level="info", secrets=[], stream=logs)
    store = SqliteStore(tmp_path / "store.db", writer="thread")
    await store.open()
    gate = Gate(tmp_path)
    held = await gate.hold(store)
    dying = asyncio.create_task(store.run("die", _die))
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.close())
    await gate.let_through(held)
    await asyncio.wait_for(closing, 10)
    with pytest.raises(StoreError):
        await dying
    (crash,) = _logged(logs, "store.writer_crashed")
    assert crash["error"] == "SystemExit(7)", crash


async def test_a_cancelled_thread_start_leaves_no_thread(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db", writer="thread")
    opening = asyncio.create_task(store.open())
    await asyncio.sleep(0)
    await asyncio.sleep(0.001)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(opening, 10)
    assert "store-writer" not in [t.name for t in threading.enumerate()]


class _Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("not this one")


def _raise_unpicklable(conn: sqlite3.Connection) -> None:
    raise _Unpicklable("why")


async def test_the_cause_of_a_failure_is_kept(sqlite_store: SqliteStore) -> None:
    """The thread passes the cause as it is; the process only if it pickles."""
    with pytest.raises(StoreError, match="why") as failed:
        await sqlite_store.run("unpicklable", _raise_unpicklable)
    if sqlite_store._writer_mode == "thread":
        assert isinstance(failed.value.__cause__, _Unpicklable)
    else:
        assert failed.value.__cause__ is None


async def test_a_start_given_up_on_leaves_no_writer_behind(tmp_path: Path) -> None:
    """Cancelled while the writer starts (a shutdown during start-up): start returns at
    once, and the writer process it had started exits."""
    before = set(child_pids(os.getpid()))
    store = SqliteStore(tmp_path / "store.db", writer="process")
    opening = asyncio.create_task(store.open())
    deadline = time.monotonic() + 10
    while not set(child_pids(os.getpid())) - before:
        assert time.monotonic() < deadline, "no writer was started"
        await asyncio.sleep(0.001)
    (writer,) = set(child_pids(os.getpid())) - before
    await asyncio.sleep(0.03)  # connected, the writer still loading: start awaits Ready
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(opening, 10)
    assert exited(writer, within=10)


async def test_durability_pragmas_are_in_force(sqlite_store: SqliteStore) -> None:
    assert await sqlite_store.pragmas() == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "busy_timeout": 5000,
    }


async def test_migrations_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    for _ in range(2):
        store = SqliteStore(path)
        await store.open()
        await store.close()
    names = [name for name, _ in migration_scripts()]
    assert names
    assert names == sorted(names)
    with sqlite3.connect(path) as conn:
        recorded = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
        assert sorted(recorded) == names
        assert migrate(conn) == [], "nothing left to apply"
    conn.close()


async def test_upgrade_from_0001_keys_duplicates_per_order(tmp_path: Path) -> None:
    """A database of the released schema (0001 only) upgrades in place, data kept."""
    path = tmp_path / "store.db"
    name, script = migration_scripts()[0]
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY, applied_at REAL)")
        for statement in split_statements(script):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (name,))
    conn.close()
    old = SqliteStore(path)
    await old.open()
    first = await old.enqueue(Notification("acme", 7, T0, dedup_key="m1", signed_at=5))
    await old.close()

    store = SqliteStore(path)
    await store.open()
    try:
        reused = await store.enqueue(Notification("acme", 8, T0, dedup_key="m1"))
        assert not reused.duplicate
        repeat = await store.enqueue(Notification("acme", 7, T0, dedup_key="m1", signed_at=5))
        assert (repeat.duplicate, repeat.job_id, repeat.previous_signed_at) == (
            True,
            first.job_id,
            5,
        )
    finally:
        await store.close()


async def test_prune_keeps_the_evidence_against_a_legacy_older_letter(
    sqlite_store: SqliteStore,
) -> None:
    """A letter of v1 that outlived the delivery of v2 (written before later deliveries
    resolved letters) must not be replayable over v2 once v2's record is old."""
    store = sqlite_store
    for version, at in ((1, T0), (2, T0 + 2)):
        await store.enqueue(Notification("acme", 7, at))
        (job,) = await store.claim_hydrations(limit=1, now=at, lease_seconds=60)
        snapshot = NewSnapshot(key=f"v{version}", body=b"{}", order_updated_at=None, hydrated_at=at)
        await store.complete_hydration(job, snapshot, ["http"], now=at)
        (delivery,) = await store.claim_deliveries(sink="http", limit=1, now=at, lease_seconds=60)
        if version == 1:
            await store.dead_letter_delivery(delivery, reason="rejected", error="400", now=at)
            v1 = delivery
        else:
            await store.complete_delivery(delivery, now=at)
    assert (await store.list_dead_letters(DeadLetterFilter())).total == 0, "resolved by v2"

    await store.run(
        "legacy_letter",
        _execute,
        "INSERT INTO dead_letters (kind, brand, order_id, sink, reason, last_error,"
        " attempts, created_at, delivery_id, snapshot_key)"
        " VALUES ('delivery', 'acme', 7, 'http', 'rejected', '400', 1, ?, ?, 'v1')",
        (T0, v1.id),
    )
    pruned = await store.prune(older_than=T0 + 10_000)
    assert pruned.deliveries == 0, "v2's delivered record is the evidence; v1 has a letter"
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert await store.replay_dead_letter(letter.id, mode="deliver", now=T0 + 10_000)
    claimed = await store.claim_deliveries(sink="http", limit=10, now=T0 + 10_000, lease_seconds=60)
    assert claimed == [], "v1 is superseded, not sent over v2"
    assert (await store.prune(older_than=T0 + 20_000)).deliveries == 2, "no letter: both go"


async def test_parent_directories_are_created(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a" / "b" / "store.db")
    await store.open()
    await store.ping()
    await store.close()
    assert (tmp_path / "a" / "b" / "store.db").is_file()


async def test_an_unusable_path_fails_open_with_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path / "file" / "store.db").open()
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path).open()  # a directory, not a database file


async def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    with pytest.raises(StoreError):
        await store.ping()  # never opened
    await store.open()
    pending = [asyncio.create_task(store.enqueue(notice(i))) for i in range(20)]
    await asyncio.sleep(0)  # queued before close: they still commit
    await store.close()
    assert all(task.result().notification_id for task in pending)
    with pytest.raises(StoreError, match=r"closed|not open"):
        await store.enqueue(notice(99))
    await store.close()  # idempotent

    await store.open()  # and it can be opened again
    jobs = await store.claim_hydrations(limit=50, now=T0, lease_seconds=60)
    assert len(jobs) == 20
    await store.close()


def test_database_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sqlite_path("sqlite:///./data/hydrator.db") == Path("data/hydrator.db")
    assert sqlite_path("sqlite:///relative/x.db") == Path("relative/x.db")
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("sqlite:////abs/with%20space.db") == Path("/abs/with space.db")

    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///data/h.db")
    assert isinstance(store, SqliteStore)
    assert store.path == Path("data/h.db")
    assert not (tmp_path / "data").exists(), "building the store touches no disk"

    for url in ("postgresql://u@h/db", "postgres://u@h/db", "postgresql:///db?host=/run/pg"):
        assert isinstance(open_store(url), PostgresStore), "built, not connected"
    for url in ("sqlite:///:memory:", "sqlite://host/x.db", "sqlite:///", "mysql://x", "x.db"):
        with pytest.raises(ConfigError):
            open_store(url)
    with pytest.raises(ConfigError):
        open_store("sqlite:///x.db?mode=ro")


async def test_leases_of_a_dead_process_are_void_at_open(tmp_path: Path) -> None:
    """One process per SQLite file: at open, work a crashed process held is due at once."""
    from app.store.base import Notification
    from app.store.sqlite import SqliteStore

    path = tmp_path / "orphans.db"
    first = SqliteStore(path)
    await first.open()
    await first.enqueue(Notification(brand="b", order_id=7, received_at=1000.0))
    claimed = await first.claim_hydrations(limit=1, now=1000.0, lease_seconds=600)
    assert len(claimed) == 1
    await first.close()  # the process "dies" holding a lease until 1600

    second = SqliteStore(path)
    await second.open()
    again = await second.claim_hydrations(limit=1, now=1001.0, lease_seconds=600)
    assert [job.order_id for job in again] == [7]
    await second.close()


# Opens the store and holds it until stdin closes.
HOLDING_STORE = """
import asyncio, sys
from app.store.sqlite import SqliteStore

async def main():
    store = SqliteStore(sys.argv[1])
    await store.open()
    print("open", flush=True)
    sys.stdin.read()

asyncio.run(main())
"""


async def test_a_store_in_use_by_another_process_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDING_STORE, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert "open" in (line.strip() for line in holder.stdout), "the holder never opened"
        with pytest.raises(StoreInUseError) as refused:
            await SqliteStore(path).open()
        assert f"{path} is in use by another process (pid {holder.pid})" in str(refused.value)
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait(10)
    store = SqliteStore(path)
    await store.open()
    await store.ping()
    await store.close()


# --- operations without a savepoint (the enqueue hot path) ------------------------------


def _write_then_fail(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO dead_letters (kind, brand, order_id, reason, last_error, attempts,"
        " created_at) VALUES ('hydration', 'acme', 1, 'x', 'x', 1, 0)"
    )
    conn.execute("SELECT * FROM no_such_table")


def _fail_before_writing(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT * FROM no_such_table")


async def test_an_op_without_savepoint_failing_before_any_write_fails_alone(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    good = [asyncio.create_task(sqlite_store.enqueue(notice(i))) for i in range(5)]
    bad = asyncio.create_task(sqlite_store.run("fail_early", _fail_before_writing, savepoint=False))
    more = [asyncio.create_task(sqlite_store.enqueue(notice(i))) for i in range(5, 10)]
    await gate.let_through(held)

    with pytest.raises(StoreError, match="no_such_table"):
        await bad
    assert all(not r.duplicate for r in await asyncio.gather(*good, *more))
    jobs = await sqlite_store.claim_hydrations(limit=50, now=T0, lease_seconds=60)
    assert len(jobs) == 10, "the rest of the batch committed"


async def test_an_op_without_savepoint_failing_after_a_write_fails_its_whole_batch(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    """Nothing can take back just its part, so nothing of its batch is committed."""
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    victims = [asyncio.create_task(sqlite_store.enqueue(notice(i))) for i in range(5)]
    culprit = asyncio.create_task(
        sqlite_store.run("write_then_fail", _write_then_fail, savepoint=False)
    )
    await gate.let_through(held)
    for task in (*victims, culprit):
        with pytest.raises(StoreError, match="not committed"):
            await task

    await sqlite_store.enqueue(notice(99))  # the store carries on
    assert (await sqlite_store.list_dead_letters(DeadLetterFilter())).total == 0
    jobs = await sqlite_store.claim_hydrations(limit=50, now=T0, lease_seconds=60)
    assert [job.order_id for job in jobs] == [99], "the failed batch left nothing behind"


async def test_enqueue_runs_without_a_savepoint(sqlite_store: SqliteStore) -> None:
    await sqlite_store.run("trace", _trace_on, savepoint=False)
    try:
        await sqlite_store.enqueue(notice(1))
        await sqlite_store.enqueue(notice(1, T0 + 1))
    finally:
        statements = await sqlite_store.run("untrace", _trace_off, savepoint=False)
    assert any(s.lstrip().startswith("INSERT INTO notifications") for s in statements)
    assert not [s for s in statements if "SAVEPOINT" in s.upper()], statements


async def test_claims_state_their_preconditions_in_sql(tmp_path: Path) -> None:
    """Two claimers on two connections (as two replicas would be) both read the same
    candidate before either claims it. The second claim must change nothing: the claim
    statements carry their status and lease conditions, so this does not depend on one
    thread running every statement."""
    path = tmp_path / "store.db"
    store = SqliteStore(path)
    await store.open()
    await store.enqueue(notice(7))
    job = (await store.claim_hydrations(limit=1, now=T0, lease_seconds=60))[0]
    snapshot = NewSnapshot(key="k", body=b"{}", order_updated_at=None, hydrated_at=T0)
    await store.complete_hydration(job, snapshot, ["http"], now=T0)
    await store.enqueue(notice(8))
    await store.close()

    first, second = (sqlite3.connect(path, isolation_level=None) for _ in range(2))
    for conn in (first, second):
        conn.row_factory = sqlite3.Row
    params = {"now": T0 + 1, "limit": 10, "exclude": "[]", "sink": "http"}
    seen_by_both = [
        [row["id"] for row in conn.execute(sql.DUE_PENDING_JOBS, params)]
        for conn in (first, second)
    ]
    assert seen_by_both[0] == seen_by_both[1] != []
    delivery_seen = [
        [row["id"] for row in conn.execute(sql.DUE_PENDING_DELIVERIES, params)]
        for conn in (first, second)
    ]
    assert delivery_seen[0] == delivery_seen[1] != []

    def claim_job(conn: sqlite3.Connection, token: str) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            sql.CLAIM_JOB,
            {
                "id": seen_by_both[0][0],
                "lease_until": T0 + 61,
                "lease_token": token,
                "max_id": 0,
                "now": T0 + 1,
            },
        ).fetchone()
        conn.execute("COMMIT")
        return row is not None

    def claim_delivery(conn: sqlite3.Connection, token: str) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            sql.CLAIM_DELIVERY,
            {
                "id": delivery_seen[0][0],
                "lease_until": T0 + 61,
                "lease_token": token,
                "now": T0 + 1,
            },
        ).fetchone()
        conn.execute("COMMIT")
        return row is not None

    assert [claim_job(first, "a"), claim_job(second, "b")] == [True, False]
    assert [claim_delivery(second, "c"), claim_delivery(first, "d")] == [True, False]
    tokens = first.execute("SELECT lease_token FROM hydration_jobs WHERE status = 'running'")
    assert [row[0] for row in tokens] == ["a"], "the first claim keeps its lease"
    first.close()
    second.close()


async def test_an_enqueue_without_an_answer_in_time_is_a_store_error(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The webhook's 503 for a stalled store: the caller stops waiting at the deadline;
    the operation itself still runs when the writer gets to it, and commits."""
    monkeypatch.setattr("app.store.sqlite.ENQUEUE_TIMEOUT_SECONDS", 0.2)
    gate = Gate(tmp_path)
    held = await gate.hold(sqlite_store)
    started = asyncio.get_running_loop().time()
    with pytest.raises(StoreError, match=r"enqueue: no answer within 0\.2 s"):
        await sqlite_store.enqueue(notice(1))
    assert asyncio.get_running_loop().time() - started < 5
    gate.release()
    await held
    later = await sqlite_store.enqueue(notice(1, T0 + 1))
    assert later.coalesced, "the late enqueue committed: this one joined its job"
    counted = await sqlite_store.run("count", _count_notifications)
    assert counted == 2


def _vm_steps(conn: sqlite3.Connection, statement: str, params: dict[str, object]) -> int:
    """How many SQLite virtual-machine instructions ``statement`` takes (a count that does
    not depend on the machine's speed)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    conn.set_progress_handler(count, 1)
    try:
        conn.execute(statement, params).fetchall()
    finally:
        conn.set_progress_handler(None, 1)
    return steps


@pytest.mark.parametrize("history", [20, 2000])
def test_reading_what_waits_does_not_walk_the_orders_history(tmp_path: Path, history: int) -> None:
    """What a claim, a completion and a list page read of an order's waiting notices costs
    the same whatever the order's history: a busy order's covered notices are not walked
    (they were, through notifications_job: 30-80 ms per list page under load)."""
    conn = sqlite3.connect(tmp_path / "h.db", isolation_level=None)
    conn.row_factory = sqlite3.Row
    migrate(conn)
    conn.execute("BEGIN")
    for i in range(history + 3):
        sqlite_enqueue(conn, notice(1001, at=T0 + i))
    snapshot = conn.execute(
        "INSERT INTO snapshots (brand, order_id, key, version, body, hydrated_at) "
        "VALUES ('acme', 1001, 'k', 1, x'7b7d', :at)",
        {"at": T0},
    ).lastrowid
    covered = conn.execute(
        "UPDATE notifications SET snapshot_id = :s WHERE id <= :n", {"s": snapshot, "n": history}
    ).rowcount
    conn.execute("COMMIT")
    assert covered == history
    params = {"job_id": 1, "max_id": history + 3, "after_id": 0, "limit": 32, "read_at": T0 + 10**6}
    for statement in (
        sql.UNCOVERED_SUMMARY,
        sql.RECENT_UNCOVERED_IDS,
        sql.OLDEST_UNCOVERED,
        sql.OLDEST_AFTER_CLAIM,
        sqlite_listed.NOTICES_BEFORE_READ,
    ):
        # Three notices wait: a few dozen instructions each, not one walk per notice ever had.
        assert _vm_steps(conn, statement, params) < 100, statement
    conn.close()
