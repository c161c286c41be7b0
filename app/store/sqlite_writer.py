"""One thread owns the SQLite connection; coroutines hand it work and await the commit.

Why one thread: SQLite allows one writer at a time, and ``sqlite3`` blocks. Serialising
every operation (reads too) on a dedicated thread keeps the event loop free and makes
the store trivially correct: no two operations ever interleave.

Group commit: the thread drains whatever is queued (up to ``batch_limit`` operations),
runs the batch in ONE transaction with each operation in its own SAVEPOINT, COMMITs
once, and only then resolves the callers' futures. So a caller's ``await`` returns
only when its data is durable, and a burst of N writes costs one fsync, not N.

* An operation that raises is rolled back to its savepoint and fails alone: its caller
  gets a :class:`~app.errors.StoreError` (whatever was raised, ``sqlite3.Error`` or
  e.g. an ``OverflowError`` binding an integer SQLite cannot hold, is its cause; a
  ``StoreError`` an operation raises on purpose passes as it is), the other operations
  of the batch still commit.
* If BEGIN or COMMIT fails, the whole batch is rolled back and every caller of that
  batch gets a :class:`~app.errors.StoreError`.
* An operation submitted with ``savepoint=False`` (the enqueue, the ingest hot path:
  two statements of savepoint bookkeeping cost a quarter of its time) skips the
  savepoint. If it raises before any of its writes completed, SQLite has already undone
  the failing statement, so it still fails alone; if it raises after a write, nothing
  can take back just its part, so the whole batch is rolled back as above.

The connection runs with ``journal_mode=WAL`` and ``synchronous=FULL``: a commit
survives a process kill and a power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

from app.errors import StoreError
from app.logs import get_logger
from app.store import sql

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]

log = get_logger("app.store.sqlite")

BUSY_TIMEOUT_MS = 5000
PRAGMAS = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)


@dataclass
class _Op:
    name: str
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    savepoint: bool = True


@dataclass
class _Stop:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class _BatchAborted(Exception):
    """The savepoint machinery itself failed: the transaction can no longer be trusted."""


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    """Resolve ``future`` on its own loop, from the writer thread."""

    def apply() -> None:
        if future.done():  # the caller was cancelled; the outcome stands regardless
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # RuntimeError: that loop is closed, so nobody is waiting for this answer any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(apply)


def _expire(future: asyncio.Future[Any], name: str, within: float) -> None:
    if not future.done():
        future.set_exception(StoreError(f"{name}: no answer within {within:g} s"))


def _settle_all(outcomes: list[tuple[_Op, Any, BaseException | None]]) -> None:
    """Resolve a whole batch's futures with one wake-up per event loop, not one per
    operation: each ``call_soon_threadsafe`` writes to the loop's self-pipe (a syscall
    on this thread and a wake-up on the loop's), which under load cost more than the
    operations themselves (docs/benchmarks.md)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, Any, BaseException | None]]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)

    def apply(group: list[tuple[_Op, Any, BaseException | None]]) -> None:
        for op, result, error in group:
            if op.future.done():  # the caller was cancelled; the outcome stands regardless
                continue
            if error is not None:
                op.future.set_exception(error)
            else:
                op.future.set_result(result)

    for loop, group in by_loop.items():
        # RuntimeError: that loop is closed, so nobody is waiting for these answers any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(apply, group)


def _store_error(message: str, cause: BaseException) -> StoreError:
    error = StoreError(message)
    error.__cause__ = cause
    return error


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` with the durability PRAGMAs in force; creates its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; BEGIN/COMMIT are ours.
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: cannot use WAL journal mode (got {mode})")
        for pragma in PRAGMAS:
            conn.execute(pragma)
    except BaseException:
        conn.close()
        raise
    return conn


def split_statements(script: str) -> Iterator[str]:
    """Cut an SQL script into complete statements (comments and triggers are safe)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    leftover = "\n".join(
        line for line in buffer.splitlines() if line.strip() and not line.strip().startswith("--")
    )
    if leftover:
        raise StoreError(f"migration ends with an incomplete statement: {leftover[:80]!r}")


def migration_scripts() -> list[tuple[str, str]]:
    """The packaged migrations as ``(name, sql)``, in the order they apply."""
    folder = resources.files("app.store").joinpath("migrations")
    scripts = [
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(scripts)


def migrate(conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> list[str]:
    """Apply the migrations not yet recorded in ``schema_migrations``; each one atomically."""
    conn.execute(sql.CREATE_SCHEMA_MIGRATIONS)
    applied: list[str] = []
    for name, script in migration_scripts():
        # IMMEDIATE: a second process migrating the same file waits instead of racing.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute(sql.MIGRATION_APPLIED, {"version": name}).fetchone() is None:
                for statement in split_statements(script):
                    conn.execute(statement)
                conn.execute(sql.RECORD_MIGRATION, {"version": name, "applied_at": clock()})
                applied.append(name)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    for name in applied:
        log.info("store.migration.applied", version=name)
    return applied


class GroupCommitWriter:
    """The writer thread and its queue. ``commits`` counts committed transactions.

    Single use: started once, stopped once (a store that reopens makes a new one).
    """

    def __init__(self, path: Path, *, batch_limit: int = 256) -> None:
        if batch_limit < 1:
            raise ValueError("batch_limit must be at least 1")
        self.path = path
        self.batch_limit = batch_limit
        self.commits = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Op | _Stop] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._started = False

    async def start(self) -> None:
        """Start the thread; returns once the database is open and migrated."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._started:
                raise StoreError("the store writer was already started")
            self._started = True
            self._accepting = True
            # A daemon thread: a process that dies without close() must still exit;
            # SQLite's journal makes an interrupted transaction harmless.
            self._thread = threading.Thread(
                target=self._main, args=(loop, ready), name="store-writer", daemon=True
            )
            self._thread.start()
        await ready

    async def stop(self) -> None:
        """Refuse new work, finish what is queued, close the connection."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
            self._queue.put(_Stop(loop, done))
        await done

    async def submit(
        self, name: str, fn: Operation[T], *, savepoint: bool = True, within: float | None = None
    ) -> T:
        """Run ``fn(connection)`` in the next batch; return once that batch committed.

        ``savepoint=False``: see the module docstring (for an operation whose failure
        after a write is not an expected outcome). ``within``: seconds after which the
        caller gets a StoreError instead of waiting on; the operation itself still runs
        (and may commit) when its turn comes.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if not self._accepting:
                raise StoreError(f"{name}: the store is closed")
            self._queue.put(_Op(name, fn, loop, future, savepoint))
        if within is None:
            return cast(T, await future)
        # A timer on the future rather than asyncio.timeout(): that one's task
        # cancellation machinery was 5% of the event loop's time on the ingest path.
        expiry = loop.call_later(within, _expire, future, name, within)
        try:
            return cast(T, await future)
        finally:
            expiry.cancel()

    # --- the thread -------------------------------------------------------------------

    def _main(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._open()
        # Whatever stops the opening must reach open()'s caller, who otherwise waits forever.
        except Exception as exc:  # noqa: BLE001
            self._refuse()
            error = exc if isinstance(exc, StoreError) else None
            _settle(loop, ready, error=error or _store_error(f"{self.path}: {exc}", exc))
            self._fail_queued(f"cannot open {self.path}")
            return
        _settle(loop, ready)
        stop: _Stop | None = None
        try:
            while stop is None:
                batch, stop = self._take()
                if batch:
                    self._run_batch(conn, batch)
        except BaseException as exc:
            log.critical("store.writer_crashed", error=repr(exc))
            raise
        finally:
            self._refuse()
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.warning("store.close_failed", error=str(exc))
            self._fail_queued("the store is closed")
            if stop is not None:
                _settle(stop.loop, stop.future)

    def _open(self) -> sqlite3.Connection:
        conn = connect(self.path)
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _refuse(self) -> None:
        with self._lock:
            self._accepting = False

    def _take(self) -> tuple[list[_Op], _Stop | None]:
        """Block for one item, then drain without blocking up to the batch limit."""
        items = [self._queue.get()]
        while len(items) < self.batch_limit and not isinstance(items[-1], _Stop):
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        ops = [item for item in items if isinstance(item, _Op)]
        stops = [item for item in items if isinstance(item, _Stop)]
        return ops, (stops[0] if stops else None)

    def _fail_queued(self, message: str) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Op):
                _settle(item.loop, item.future, error=StoreError(f"{item.name}: {message}"))
            else:
                _settle(item.loop, item.future)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [self._run_one(conn, op) for op in batch]
            conn.execute("COMMIT")
        except (sqlite3.Error, _BatchAborted) as exc:
            self._abort(conn, batch, exc)
            return
        except BaseException as exc:
            # The thread is going down: still answer this batch's callers first.
            self._abort(conn, batch, exc)
            raise
        self.commits += 1
        _settle_all(
            [(op, result, error) for op, (result, error) in zip(batch, outcomes, strict=True)]
        )

    def _run_one(self, conn: sqlite3.Connection, op: _Op) -> tuple[Any, BaseException | None]:
        if op.savepoint:
            try:
                conn.execute("SAVEPOINT op")
            except sqlite3.Error as exc:
                raise _BatchAborted(f"savepoint: {exc}") from exc
        changes = conn.total_changes  # counts completed writes only, not a failed statement
        try:
            result = op.fn(conn)
        # The writer must outlive a bug or a bad argument in one operation: that caller
        # alone gets the error, and as a StoreError (only StoreError leaves the store).
        except Exception as exc:
            if op.savepoint:
                self._rollback_savepoint(conn)
            elif conn.total_changes != changes or not conn.in_transaction:
                raise _BatchAborted(f"{op.name} failed after writing: {exc!r}") from exc
            return None, self._op_error(op, exc)
        if op.savepoint:
            try:
                conn.execute("RELEASE op")
            except sqlite3.Error as exc:
                raise _BatchAborted(f"release: {exc}") from exc
        return result, None

    @staticmethod
    def _op_error(op: _Op, exc: Exception) -> StoreError:
        if isinstance(exc, StoreError):  # raised on purpose by the operation: already ours
            log.warning("store.op_failed", op=op.name, error=str(exc))
            return exc
        if isinstance(exc, sqlite3.Error):
            log.warning("store.op_failed", op=op.name, error=str(exc))
            return _store_error(f"{op.name}: {exc}", exc)
        log.error("store.op_crashed", op=op.name, error=repr(exc))
        return _store_error(f"{op.name}: {type(exc).__name__}: {exc}", exc)

    @staticmethod
    def _rollback_savepoint(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
        except sqlite3.Error as exc:
            raise _BatchAborted(f"rollback to savepoint: {exc}") from exc

    @staticmethod
    def _abort(conn: sqlite3.Connection, batch: list[_Op], exc: BaseException) -> None:
        log.error("store.batch_failed", ops=len(batch), error=str(exc))
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                log.error("store.rollback_failed", error=str(rollback_exc))
        _settle_all(
            [(op, None, _store_error(f"{op.name}: not committed: {exc}", exc)) for op in batch]
        )
